"""Fixtures shared by the examples' tests."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP threads stall badly on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _can_write(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.fixture
def make_read_only():
    """``make_read_only(folder)`` makes an existing folder refuse new files for the rest of the test.

    ``chmod 0o555`` does it for a normal user; root ignores mode bits, so there the folder gets the
    immutable attribute (``chattr +i``, which stops root too). The test is skipped, with the reason,
    only when neither works here. Everything is undone at teardown.
    """
    chmodded, immutable = [], []

    def make(folder: Path) -> Path:
        folder = Path(folder)
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        chmodded.append((folder, mode))
        if _can_write(folder):  # root: mode bits do not stop it
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
                pytest.skip("cannot make a folder read-only here: running as root, and chattr +i is not available")
            immutable.append(folder)
            if _can_write(folder):
                pytest.skip("cannot make a folder read-only here: even chattr +i does not stop writes on this file system")
        return folder

    yield make
    for folder in immutable:
        subprocess.run([shutil.which("chattr"), "-i", str(folder)], capture_output=True)
    for folder, mode in chmodded:
        folder.chmod(mode)
