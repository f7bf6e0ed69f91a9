"""A new folder per run: ``<results_dir>/<YYYY-mm-dd_HH-MM-SS>[_<label>]``, never one a previous run wrote.

>>> import tempfile
>>> parent = tempfile.mkdtemp()
>>> a, b = new_run_folder(parent, "ring8"), new_run_folder(parent, "ring8")   # the same second
>>> a != b and a.is_dir() and b.is_dir() and a.name.endswith("_ring8")
True
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path
from typing import Callable, TypeVar, Union

__all__ = ["new_run_folder", "run_in_new_folder", "RunFolderError"]

T = TypeVar("T")

_LABEL = re.compile(r"[A-Za-z0-9._-]*")


class RunFolderError(OSError):
    """The run folder cannot be made; the message says why and names the folder."""


def new_run_folder(results_dir: Union[str, os.PathLike], label: str = "") -> Path:
    """Make and return ``results_dir/<now>_<label>`` (``_2``, ``_3``... appended when a run of the
    same second exists). ``results_dir`` is created if missing.

    ``label`` is a short tag (letters, digits, ``.``, ``_``, ``-``). The folder is made with
    ``exist_ok=False``, so two runs started at once never share one. Raises :class:`RunFolderError`
    when ``results_dir`` is empty, is a file (or under one), or is not writable.
    """
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ValueError(f"new_run_folder: label must be letters, digits, '.', '_' or '-', got {label!r}")
    if not os.fspath(results_dir):
        raise RunFolderError("the results folder is an empty string")
    parent = Path(results_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunFolderError(f"the results folder {parent} is a file, not a folder") from None
    except NotADirectoryError:
        raise RunFolderError(f"the results folder {parent} is under a file, not a folder") from None
    except OSError as e:
        raise RunFolderError(f"cannot make the results folder {parent}: {e.strerror or e}") from None
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = f"{stamp}_{label}" if label else stamp
    for i in range(1, 10_000):
        folder = parent / (base if i == 1 else f"{base}_{i}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise RunFolderError(f"cannot make a run folder in {parent}: {e.strerror or e}") from None
        if not os.access(folder, os.W_OK):
            folder.rmdir()
            raise RunFolderError(f"cannot write in the run folder {folder}")
        return folder
    raise RunFolderError(f"too many runs named {base} in {parent}")


def run_in_new_folder(results_dir: Union[str, os.PathLike], label: str, run: Callable[[Path], T]) -> T:
    """A command's body in a new run folder: ``run(new_run_folder(results_dir, label))``.

    For a command line: a folder that cannot be made exits with status 1 and one line naming
    it (``error: --results-dir: ...``); Ctrl-C exits with status 130 and one line, after removing
    the run folder if nothing was written in it yet.
    """
    try:
        folder = new_run_folder(results_dir, label)
    except RunFolderError as e:
        raise SystemExit(f"error: --results-dir: {e}") from None
    try:
        return run(folder)
    except KeyboardInterrupt:
        try:
            empty = not any(folder.iterdir())
            if empty:
                folder.rmdir()
        except OSError:
            empty = False
        what = "it was empty and is removed" if empty else "it holds what was written before the interrupt"
        print(f"\ninterrupted; run folder {folder}: {what}", file=sys.stderr)
        raise SystemExit(130) from None
