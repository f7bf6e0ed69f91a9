"""Ctrl-C as a request to stop cleanly: the loop finishes its step, saves, and says how to resume.

Inside ``with StopRequest() as stop:`` the first SIGINT (Ctrl-C) or SIGTERM only sets
``stop.signal``; the loop checks ``stop.requested`` between steps, so it never stops
half-way through an optimizer step and always has a consistent state to save. A second
Ctrl-C raises ``KeyboardInterrupt`` at once (for a user who does not want to wait; the last
checkpoint written is intact, as every checkpoint is written atomically). Outside the main
thread, where Python cannot install handlers, it does nothing.

>>> import os, signal
>>> with StopRequest() as stop:
...     os.kill(os.getpid(), signal.SIGINT)
...     stop.requested, stop.signal_name
(True, 'SIGINT')
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

__all__ = ["StopRequest", "Stopped"]


class Stopped(Exception):
    """Raised by :meth:`StopRequest.check` inside work (sampling, scoring) that should end early."""


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag (see the module docstring)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signal is not None

    @property
    def signal_name(self) -> Optional[str]:
        """``"SIGINT"`` or ``"SIGTERM"`` once a stop was asked for."""
        return None if self.signal is None else signal.Signals(self.signal).name

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by the signal: ``128 + signal number`` (130 for Ctrl-C)."""
        return 128 + (self.signal or signal.SIGINT)

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop was asked for (call it between units of work)."""
        if self.requested:
            raise Stopped(self.signal_name)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
