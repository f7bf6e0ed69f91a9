"""examples/atomic.py: a failed write (read-only folder, full disk, Ctrl-C) leaves the old file and no temp file."""

from __future__ import annotations

import errno
import os

import pytest

from examples import atomic
from examples.atomic import write_atomically


def test_writes_the_bytes_with_the_usual_permissions(tmp_path):
    write_atomically(tmp_path / "a.bin", lambda f: f.write(b"abc"), what="test")
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), RuntimeError("the writer broke")],
    ids=["disk-full", "ctrl-c", "writer-error"],
)
def test_a_failed_write_keeps_the_previous_file_and_removes_its_temp_file(tmp_path, error):
    (tmp_path / "a.bin").write_bytes(b"old")

    def write(f):
        f.write(b"half of the new")
        raise error

    with pytest.raises(type(error)) as caught:
        write_atomically(tmp_path / "a.bin", write, what="test")
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    if isinstance(error, OSError):
        assert caught.value.errno == errno.ENOSPC
        assert "test: could not write" in str(caught.value) and "No space left" in str(caught.value)


def test_a_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    # as root a chmod'ed folder stays writable, so the refusal of open() is simulated
    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(atomic, "open", refuse, raising=False)
    with pytest.raises(PermissionError, match=r"test: cannot write in .*: Permission denied"):
        write_atomically(tmp_path / "a.bin", lambda f: f.write(b"x"), what="test")
    assert list(tmp_path.iterdir()) == []
