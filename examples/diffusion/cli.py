"""What the diffusion commands share at the command line: short errors, the device choice, memory checks.

A bad flag prints the error and one line saying where the help is, not the whole usage
(exit status 2, as argparse). A flag is never guessed from its beginning (``--step 3`` is not
``--steps 3``: argparse's prefix matching is off), and a misspelt one gets a "did you mean".
:func:`resolve_device` follows the training script's convention: ``auto`` is the first CUDA
device when there is one, else the CPU.

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

from examples.arguments import suggest_flags

from .config import ConfigError

__all__ = ["ShortErrorParser", "resolve_device", "check_compile_backend", "check_memory", "physical_memory"]


class ShortErrorParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose error is the message and one line of usage hint (exit status 2), without
    prefix matching of flags, and with the closest flag suggested for an unknown one (:func:`suggest_flags`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {suggest_flags(self, message)}\n({self.prog} --help explains every flag)\n")


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
