"""What a benchmark ran on: CPU, threads, GPU, and the versions of everything measured.

>>> info = describe("cpu")
>>> sorted(info)[:3]
['cpu', 'cpu cores', 'date']
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import optree
import torch

import pfunc

__all__ = ["describe", "cpu_model", "git_commit"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str) -> str:
    """Short commit hash of the repository at ``path`` (``"+dirty"`` with uncommitted changes), or ``"unknown"``."""
    try:
        rev = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def describe(device: torch.device | str) -> dict[str, str]:
    """Machine and versions, as ``{field: value}`` for the report."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu cores": str(os.cpu_count()),
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "optree": optree.__version__,
        "pfunc": f"{pfunc.__version__} (git {git_commit(os.path.dirname(os.path.dirname(os.path.abspath(pfunc.__file__))))})",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"] = str(torch.version.cuda)
    return info
