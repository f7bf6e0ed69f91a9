"""A dependency-free progress bar: step, loss, images/s and time left, on one line.

On a terminal the line is redrawn in place (at most 10 times a second); otherwise
(logs, CI) a full line is printed every ``log_every`` steps.

>>> import io
>>> out = io.StringIO()
>>> bar = ProgressBar(total=4, start=0, images_per_step=8, stream=out, log_every=2)
>>> for step in range(1, 5):
...     bar.update(step, loss=1.0 / step)
>>> bar.close()
>>> out.getvalue().count("step")
2
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["ProgressBar", "format_seconds"]


def format_seconds(s: float) -> str:
    """``"1:02:03"`` or ``"2:03"``."""
    s = max(int(s), 0)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressBar:
    """Progress of steps ``start+1 .. total``, each ``images_per_step`` images."""

    def __init__(self, total: int, start: int, images_per_step: int, stream: Optional[TextIO] = None, log_every: int = 50, width: int = 24):
        self.total, self.start, self.images_per_step = total, start, images_per_step
        self.stream = stream if stream is not None else sys.stderr
        self.log_every, self.width = log_every, width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self.images_per_second = 0.0

    def line(self, step: int, loss: float) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        self.images_per_second = done * self.images_per_step / elapsed if elapsed > 0 else 0.0
        left = (self.total - step) * elapsed / done if done else 0.0
        filled = int(self.width * step / self.total) if self.total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        return (
            f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} "
            f"{self.images_per_second:.0f} img/s elapsed {format_seconds(elapsed)} left {format_seconds(left)}"
        )

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= 0.1 or step == self.total:
                self.stream.write("\r" + self.line(step, loss))
                self.stream.flush()
                self._last_draw = now
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(self.line(step, loss) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
