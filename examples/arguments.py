"""``argparse`` types that refuse what would make a run fail later or silently: NaN, infinities,
zero or negative counts, seeds torch cannot take.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--lr", type=positive_float)
>>> _ = p.add_argument("--steps", type=positive_int)
>>> p.parse_args(["--lr", "3e-4", "--steps", "10"])
Namespace(lr=0.0003, steps=10)
"""

from __future__ import annotations

import argparse
import difflib
import math
from typing import NoReturn

import torch

__all__ = ["ArgumentParser", "suggest_flags", "device", "positive_int", "non_negative_int", "seed", "finite_float", "positive_float", "non_negative_float", "unit_interval"]


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless the help already speaks of one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are two lines (the error and where the help is),
    not the whole usage (exit status 2, as argparse's), with the closest flag suggested for an unknown one and no
    prefix matching (``--step`` is not ``--steps``), and whose help shows each flag's default.
    A description in reStructuredText (````code````) is shown with single backticks."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        kwargs.setdefault("allow_abbrev", False)  # --step is not --steps
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = kwargs["description"].replace("``", "`")
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {suggest_flags(self, message)}\n(see {self.prog} --help)\n")


def suggest_flags(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's ``message``, with ``(did you mean --steps?)`` after an unrecognized flag that is close to a known one."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for token in message[len(prefix):].split():
        if token.startswith("--"):
            close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{token.split('=', 1)[0]}: did you mean {close[0]}?")
    return message + (f" ({'; '.join(hints)})" if hints else "")


def device(text: str) -> torch.device:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:0, mps...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: the examples run on cpu, cuda or mps")
    return dev


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def seed(text: str) -> int:
    """A seed ``torch.Generator.manual_seed`` takes, with room for the examples' ``seed + k``: ``[0, 2**62)``."""
    value = _int(text)
    if not 0 <= value < 2**62:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**62), got {value}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (no NaN, no infinity)."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value:g}")
    return value


def unit_interval(text: str) -> float:
    """A number in ``[0, 1)`` (Adam's betas)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value
