"""Ctrl-C and SIGTERM as a request to stop cleanly: the loop finishes its step, saves, and says how to resume.

Batch schedulers (SLURM, Kubernetes, torchrun's own shutdown) stop a job with SIGTERM some
seconds before they kill it, so SIGTERM is handled exactly like the first Ctrl-C (SIGINT).
Inside ``with StopRequest() as stop:`` the first SIGINT or SIGTERM

* is **acknowledged at once** on standard error, whatever the process is doing: a watcher thread
  woken by :func:`signal.set_wakeup_fd` prints what will happen (``stop.doing``), even while the
  main thread sits in a long C++ call (a collective waiting for another rank, a convolution);
* sets ``stop.signal``; the training loop reads ``stop.requested`` between steps, so it never
  stops half-way through an optimizer step and always has a consistent state to save;
* inside ``with stop.phase(..., at_once=True):`` (start-up, compilation: work that cannot reach a
  step boundary soon and whose loss costs nothing) raises :class:`StopNow` in the main thread
  instead, so the process stops as soon as Python regains control.

A second Ctrl-C raises ``KeyboardInterrupt`` at once (for a user who does not want to wait; the
last checkpoint written is intact, as every checkpoint is written atomically); a second SIGTERM
changes nothing. Outside the main thread, where Python cannot install handlers, it does nothing.

>>> import os, signal
>>> with StopRequest(announce=False) as stop:
...     os.kill(os.getpid(), signal.SIGTERM)
...     stop.requested, stop.signal_name, stop.exit_status
(True, 'SIGTERM', 143)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator, Optional

__all__ = ["StopRequest", "Stopped", "StopNow", "TRAINING"]

#: What the first signal does during training steps (the default ``doing``).
TRAINING = "finishing the current step, then saving a checkpoint and stopping (a second Ctrl-C stops at once)"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Raised by :meth:`StopRequest.check` inside work (sampling, scoring) that should end early."""


class StopNow(BaseException):
    """Raised in the main thread by the first signal inside an ``at_once`` phase; ``.signum`` is the signal.

    A ``BaseException`` (as ``KeyboardInterrupt``), so that no ``except Exception`` inside the work it
    interrupts (a compiler wrapping its errors) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag, acknowledged at once (see the module docstring).

    ``announce``: print the acknowledgement (``False`` on a rank that is not the one that speaks).
    """

    def __init__(self, *, announce: bool = True) -> None:
        self.signal: Optional[int] = None
        self.doing = TRAINING
        self.announce = announce
        self._at_once = False
        self._previous: dict[int, Any] = {}
        self._previous_wakeup: Optional[int] = None
        self._pipe: Optional[tuple[int, int]] = None
        self._watcher: Optional[threading.Thread] = None
        self._acknowledged = threading.Lock()

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
        """The shell's convention for a process ended by the signal: ``128 + signal number`` (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + (self.signal or signal.SIGINT)

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop was asked for (call it between units of work)."""
        if self.requested:
            raise Stopped(self.signal_name)

    @contextlib.contextmanager
    def phase(self, doing: str, *, at_once: bool = False) -> Iterator["StopRequest"]:
        """Within the block the acknowledgement says ``doing``; with ``at_once`` the first signal raises
        :class:`StopNow` (at once if one already came)."""
        saved = self.doing, self._at_once
        self.doing, self._at_once = doing, at_once
        try:
            if at_once and self.signal is not None:
                raise StopNow(self.signal)
            yield self
        finally:
            self.doing, self._at_once = saved

    # ---------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            return
        self.signal = signum
        self._acknowledge(signum)  # here, if the watcher was not first: the main thread knows what it is doing
        if self._at_once:
            raise StopNow(signum)

    def _acknowledge(self, signum: int) -> None:
        """Print what the first signal does, once: the main thread's handler or the watcher, whichever comes first
        (a non-blocking lock, never released: safe inside a signal handler)."""
        if not self.announce or not self._acknowledged.acquire(blocking=False):
            return
        text = f"\n{signal.Signals(signum).name} received: {self.doing}\n"
        try:
            os.write(2, text.encode())  # not sys.stderr: its buffer may be mid-write in the main thread
        except OSError:
            pass

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in _SIGNALS:
                    self._acknowledge(signum)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (OSError, ValueError):
            return self
        self._pipe = (read_fd, write_fd)
        self._watcher = threading.Thread(target=self._watch, args=(read_fd,), name="stop-request-watcher", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
            read_fd, write_fd = self._pipe
            os.close(write_fd)  # the watcher reads the end of the pipe and returns
            if self._watcher is not None:
                self._watcher.join(timeout=1.0)
            os.close(read_fd)
            self._pipe = self._watcher = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
