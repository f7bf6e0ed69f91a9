"""Progress of a long loop, shown with tqdm: a live bar on a terminal, plain lines in a log.

On a terminal, :func:`progress` is tqdm's own bar (percentage, count, elapsed and
time left, rate) with the values given to :meth:`Progress.update` after it (loss,
images/s ...). When the output is not a terminal (a log file, CI, a pipe), redrawing
a bar would fill the log with carriage returns, so one plain line, formatted by
tqdm, is printed every ``log_every`` steps and at the last one.

>>> import io
>>> out = io.StringIO()                         # not a terminal: plain lines
>>> bar = progress(4, desc="train", log_every=2, stream=out)
>>> for step in range(4):
...     bar.update(loss=1.0 / (step + 1), **{"img/s": 128})
>>> bar.close()
>>> lines = out.getvalue().splitlines()
>>> len(lines), lines[-1].startswith("train: 100% 4/4 ["), lines[-1].endswith("loss=0.25, img/s=128]")
(2, True, True)
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from typing import Any, Optional, TextIO

from tqdm import tqdm

__all__ = ["Progress", "progress"]


def _format_value(value: Any) -> str:
    """A postfix value as shown: floats to 4 significant digits (plain for rates above 100), others as ``str``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (0 when unknown)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class Progress:
    """A running progress display; make one with :func:`progress`.

    ``update(n, **postfix)`` advances by ``n`` steps and shows ``postfix`` (``loss=0.04``;
    keys that are not identifiers go through a dict: ``**{"img/s": 450}``). ``write(text)``
    prints a message without breaking the bar. ``close()`` ends the display (also on
    ``with`` exit); further updates are refused.
    """

    def __init__(self, total: int, initial: int, desc: str, unit: str, log_every: int, stream: TextIO):
        self.total, self.n, self.desc, self.unit, self.log_every, self.stream = total, initial, desc, unit, log_every, stream
        self.initial = initial
        self.postfix: dict[str, str] = {}
        self.closed = False
        self.is_terminal = bool(getattr(stream, "isatty", lambda: False)())
        self._start = time.perf_counter()
        self._last_logged = initial
        self._bar: Optional[tqdm] = None
        if self.is_terminal:
            # a terminal that reports 0x0 (a pty nobody sized) would get an empty or hidden bar from tqdm
            width = dict(dynamic_ncols=True) if _columns(stream) > 0 else dict(ncols=100, nrows=24)
            self._bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit, file=stream,
                             mininterval=0.1, leave=True, **width)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps (``n >= 0``) and show ``postfix`` (it replaces the previous values)."""
        if self.closed:
            raise ValueError("Progress.update: the progress display is closed")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"Progress.update: n must be a non-negative integer, got {n!r}")
        self.n += n
        if postfix:
            self.postfix = {str(k): _format_value(v) for k, v in postfix.items()}
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self._postfix_text(), refresh=False)
            self._bar.update(n)
        elif self.n - self._last_logged >= self.log_every or (self.n >= self.total and self._last_logged < self.n):
            self._log_line()

    def write(self, text: str) -> None:
        """Print ``text`` on its own line, above the bar on a terminal (the bar is redrawn below it)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        """Seconds since the display started."""
        return time.perf_counter() - self._start

    def close(self) -> None:
        """End the display: the bar stays on screen as it last was; in a log the last step is printed if it was not."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.n > self._last_logged:
            self._log_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _postfix_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.postfix.items())

    def _log_line(self) -> None:
        line = tqdm.format_meter(self.n, self.total, self.elapsed, ncols=0, prefix=self.desc, unit=self.unit,
                                 postfix=self._postfix_text() or None, initial=self.initial)
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_logged = self.n


def progress(
    total: int,
    *,
    initial: int = 0,
    desc: str = "",
    unit: str = "step",
    log_every: int = 50,
    stream: Optional[TextIO] = None,
) -> Progress:
    """A progress display for steps ``initial+1 .. total`` on ``stream`` (default: standard error).

    Args:
        total: the step count at the end (``>= 0``).
        initial: steps already done (a resumed run), ``0 <= initial <= total``; rates and
            time left count only the steps done from here.
        desc: a short label before the bar (``"train"``, ``"sample"``).
        unit: what a step is, shown in the rate (``step/s``, ``batch/s``).
        log_every: when ``stream`` is not a terminal, print one line every this many steps (``>= 1``).
        stream: where to write; a terminal gets tqdm's live bar, anything else plain lines.
    """
    for name, value in (("total", total), ("initial", initial), ("log_every", log_every)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"progress: {name} must be an integer, got {value!r}")
    if total < 0:
        raise ValueError(f"progress: total must be non-negative, got {total}")
    if not 0 <= initial <= total:
        raise ValueError(f"progress: initial must be in [0, total={total}], got {initial}")
    if log_every < 1:
        raise ValueError(f"progress: log_every must be at least 1, got {log_every}")
    return Progress(total, initial, desc, unit, log_every, sys.stderr if stream is None else stream)
