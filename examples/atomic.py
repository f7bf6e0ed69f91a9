"""Write a file so that a reader never sees half of it: a temp file in the same folder, then ``os.replace``.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "hello.txt")
>>> write_atomically(path, lambda f: f.write(b"hello"), what="example")
>>> open(path, "rb").read()
b'hello'
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["write_atomically"]


def write_atomically(path: Union[str, os.PathLike], write: Callable[[BinaryIO], object], *, what: str) -> None:
    """Call ``write(f)`` on a new temp file beside ``path``, fsync it, then move it over ``path``.

    ``what`` names the caller in error messages. The folder must exist. Whatever happens in
    ``write`` (an exception, a full disk, Ctrl-C) the temp file is removed and a previous file at
    ``path`` is left as it was. OS errors come back as ``OSError`` (of the same errno subclass:
    ``PermissionError``, ``FileNotFoundError``...) whose message names ``what`` and the path.
    The file gets the usual permissions (the umask applies, as for ``open``).
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(2, f"{what}: cannot write {path}: the folder {folder} {reason}")
    if path.is_dir():
        raise IsADirectoryError(21, f"{what}: cannot write {path}: it is a folder")
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        f = open(tmp, "xb")
    except OSError as e:
        raise OSError(e.errno, f"{what}: cannot write in {folder}: {e.strerror}") from None
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise OSError(e.errno, f"{what}: could not write {path}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)
