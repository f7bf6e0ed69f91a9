"""Commands the examples print for a user to copy (how to resume, how to sample), runnable as printed.

A hint that says ``python -m ...`` fails for a user who ran ``.venv/bin/python -m ...`` without
activating the venv, and a torchrun hint without the ``--standalone`` the job was started with
fails too. So the interpreter is the one running this process (:data:`sys.executable`, written
relative to the working directory when it lies under it, as the README's ``.venv/bin/python``),
and under torchrun the launcher's own command line is read back from the parent process
(``/proc/<ppid>/cmdline`` on Linux) up to the module it started.

>>> python_command("examples.diffusion.sample", executable="/repo/.venv/bin/python", cwd="/repo")
'.venv/bin/python -m examples.diffusion.sample'
>>> launcher_command(["/repo/.venv/bin/python", "/repo/.venv/bin/torchrun", "--standalone", "--nproc_per_node=2",
...                   "-m", "examples.diffusion.train", "--steps", "9"], "examples.diffusion.train", cwd="/repo")
'.venv/bin/torchrun --standalone --nproc_per_node=2 -m examples.diffusion.train'
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Optional, Sequence

__all__ = ["shown_path", "python_command", "launcher_command", "parent_launcher_command"]


def shown_path(path: str, cwd: Optional[str] = None) -> str:
    """``path`` relative to ``cwd`` (default: the working directory) when it lies under it, else as it is; shell-quoted."""
    cwd = os.getcwd() if cwd is None else cwd
    if os.path.isabs(path):
        rel = os.path.relpath(path, cwd)
        if not rel.startswith(os.pardir):
            path = rel
    return shlex.quote(path)


def python_command(module: str, *, executable: Optional[str] = None, cwd: Optional[str] = None) -> str:
    """``<this interpreter> -m <module>``, the interpreter as :func:`shown_path` writes it."""
    return f"{shown_path(executable or sys.executable or 'python', cwd)} -m {module}"


def launcher_command(argv: Sequence[str], module: str, *, cwd: Optional[str] = None) -> Optional[str]:
    """The launcher part of a command line ``argv`` that ran ``-m module`` (torchrun's, with its own flags), up to
    and including ``-m module``; ``None`` when ``argv`` did not run ``module``. A Python interpreter running a
    launcher script (``python .../torchrun``) is written as the script alone."""
    argv = list(argv)
    end = next((i for i in range(len(argv) - 1) if argv[i] == "-m" and argv[i + 1] == module), None)
    if end is None or end == 0:
        return None
    head = argv[:end]
    if len(head) >= 2 and os.path.basename(head[0]).startswith("python") and os.path.basename(head[1]).startswith("torchrun"):
        head = head[1:]  # the script's shebang line runs the interpreter: `torchrun` is what was typed
    return " ".join([shown_path(head[0], cwd), *(shlex.quote(a) for a in head[1:]), "-m", module])


def parent_launcher_command(module: str) -> Optional[str]:
    """:func:`launcher_command` of the parent process's command line (torchrun's, for one of its workers), or ``None``
    where it cannot be read (not Linux) or did not run ``module``."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    return launcher_command(argv, module)
