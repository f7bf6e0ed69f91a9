"""Output folders: checked for writing before any work, and new timestamped ones that never reuse a name.

A command checks where it will write (:func:`check_writable`, :func:`check_can_create`)
before it trains or samples anything, so a read-only file system, a file standing where a
folder should be, or a missing permission is one clear line at the start instead of a
traceback after minutes of work. The check really writes (and removes) a small file: that
is the only test that sees a read-only mount, an immutable folder, a full quota or ACLs the
same way the later write will.

>>> import tempfile
>>> parent = tempfile.mkdtemp()
>>> a, b = new_timestamped_folder(parent, "steps5"), new_timestamped_folder(parent, "steps5")   # the same second
>>> a != b and a.is_dir() and b.is_dir() and a.name.endswith("_steps5")
True
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ["FolderError", "check_writable", "check_can_create", "new_timestamped_folder", "timestamp"]

PathLike = Union[str, os.PathLike]


class FolderError(OSError):
    """A folder that cannot be written or created; the message names it and says why."""


def check_writable(folder: PathLike, what: str) -> None:
    """Raise :class:`FolderError` unless a file can be created in the existing folder ``folder``.

    ``what`` names the folder in the message (``"--results-dir"``, ``"the run folder"``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{what} {str(folder)!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    except OSError as e:
        raise FolderError(f"{what} {str(folder)!r} is not writable: {e.strerror or e}") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def check_can_create(path: PathLike, what: str) -> None:
    """Raise :class:`FolderError` unless the folder ``path`` exists and is writable, or can be created.

    Walks up to the nearest existing ancestor: a file there (``--results-dir`` naming a file, or
    a path under one) or a folder that cannot be written is an error naming ``what``.
    """
    if str(path) == "" or not str(path).strip():
        raise FolderError(f"{what} must name a folder, got {str(path)!r}")
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        which = "is a file" if probe == path else f"is under {str(probe)!r}, which is a file"
        raise FolderError(f"{what} {str(path)!r} {which}, not a folder")
    check_writable(probe, what if probe == path else f"{what} {str(path)!r}: its parent")


def timestamp() -> str:
    """The local time as ``YYYY-mm-dd_HH-MM-SS``, the prefix of every run and sample folder."""
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def new_timestamped_folder(parent: PathLike, suffix: str, *, stamp: Optional[str] = None) -> Path:
    """Create and return ``parent/<stamp>_<suffix>`` (``_1``, ``_2`` ... appended when it exists).

    ``stamp`` defaults to :func:`timestamp` now. ``parent`` is created if missing. Made with
    ``exist_ok=False``: two commands started in the same second never share a folder.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{stamp or timestamp()}_{suffix}"
    for i in range(10_000):
        path = parent / (base if i == 0 else f"{base}_{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FolderError(f"cannot find a free folder name like {str(parent / base)!r}")
