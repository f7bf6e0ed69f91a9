"""What the diffusion commands share at the command line: short errors, the device choice, a busy-machine note.

A bad flag prints the error and one line saying where the help is, not the whole usage
(exit status 2, as argparse). :func:`resolve_device` follows the training script's
convention: ``auto`` is the first CUDA device when there is one, else the CPU.
:func:`choose_threads` keeps torch's threads to the idle cores when other processes keep some
busy, the case where torch's default of one thread per core runs ten times slower, and says so.

>>> p = ShortErrorParser(prog="python -m examples.diffusion.sample")
>>> _ = p.add_argument("--seed", type=int)
>>> import contextlib, io
>>> err = io.StringIO()
>>> with contextlib.redirect_stderr(err):
...     try:
...         p.parse_args(["--seed", "x"])
...     except SystemExit as e:
...         print(e.code)
2
>>> print(err.getvalue().strip())
error: argument --seed: invalid int value: 'x'
(python -m examples.diffusion.sample --help explains every flag)
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn, Optional

import torch

from .config import ConfigError

__all__ = ["ShortErrorParser", "resolve_device", "choose_threads", "check_compile_backend", "check_memory", "physical_memory"]


class ShortErrorParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose error is the message and one line of usage hint (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n({self.prog} --help explains every flag)\n")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; anything else is checked to exist here.

    :class:`~.config.ConfigError` naming ``--device`` when it is not a device or this machine lacks it.
    """
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {spec!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {spec}: MPS is not available on this machine")
        return device
    if device.type != "cpu":
        raise ConfigError(f"--device {spec!r}: unsupported device type {device.type!r}; expected cpu, cuda or mps")
    return device


def check_compile_backend(name: str) -> None:
    """:class:`~.config.ConfigError` naming ``--compile-backend`` unless ``name`` is a registered ``torch.compile`` backend."""
    import torch._dynamo  # imported here: it takes a second, and only --compile needs it

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        shown = [b for b in torch._dynamo.list_backends()] + ["aot_eager", "eager"]
        raise ConfigError(
            f"--compile-backend {name!r} is not a registered torch.compile backend; this torch has e.g. {', '.join(sorted(set(shown)))}"
        )


def choose_threads(requested: Optional[int]) -> Optional[str]:
    """Set torch's CPU threads: ``requested`` (``--threads``) when given; else no more than the idle cores.

    The idle cores are the core count less the 1-minute load average, rounded (at least 1). torch's
    default, one OpenMP thread per core, stalls at every barrier waiting for a thread that another
    process preempted: measured on this project's 2-core machine, the CPU preset trained at 6.5
    images/s with 2 threads against 70 with 1 at load 5-7, and sampling ran 10x slower with 2 threads
    while a single other process kept one core busy (load 1.7); on idle cores 2 threads are 1.5x faster
    than 1. Returns the note to print when it chose fewer threads than torch's default, else ``None``.
    """
    if requested is not None:
        torch.set_num_threads(requested)
        return None
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return None
    cores = os.cpu_count() or 1
    default = torch.get_num_threads()
    idle = max(1, int(cores - load + 0.5))
    if idle >= default:
        return None
    torch.set_num_threads(idle)
    return (
        f"note: this machine is busy (load average {load:.1f} on {cores} cores): running on {idle} "
        f"thread{'s' if idle > 1 else ''} instead of torch's {default}, which is many times faster when other "
        f"processes compete for the cores (--threads {default} to use them anyway)"
    )


def physical_memory() -> Optional[int]:
    """This machine's physical memory in bytes, or ``None`` where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(what: str, nbytes: int) -> None:
    """:class:`~.config.ConfigError` when ``nbytes`` (what ``what``, a flag and its value, needs) exceed half of
    this machine's memory: a clear error at the start instead of an out-of-memory kill minutes later."""
    have = physical_memory()
    if have is not None and nbytes > have // 2:
        raise ConfigError(
            f"{what} needs {nbytes / 2**30:.1f} GiB for its images alone, more than half of this machine's "
            f"{have / 2**30:.1f} GiB"
        )
