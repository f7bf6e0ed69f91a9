"""CPU threads for a machine that other processes may keep busy.

torch's default, one OpenMP thread per core, is fastest on idle cores and many times slower when
other processes hold some of them: every parallel region waits at its barrier for the thread that
was preempted. :func:`choose_threads` keeps torch to the cores that are idle *now*, measured over a
short window at start-up (:func:`idle_cores`), unless ``--threads`` says otherwise, and returns
the note to print when it chose fewer threads than torch's default.

The load average is not that measurement: it decays over minutes, so right after a
``pip install`` the 1-minute figure still counted pip's work, and the README's own
install-then-train command trained on 1 thread of 2 idle cores (6 min 55 s instead of 5.5 min).

>>> choose_threads(1) is None and torch.get_num_threads() == 1     # --threads given: obeyed, no note
True
>>> idle_cores(window_s=0.05) <= (os.cpu_count() or 1)
True
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

__all__ = ["choose_threads", "idle_cores", "cpu_times", "WINDOW_S"]

#: How long :func:`choose_threads` watches the cores at start-up.
WINDOW_S = 0.5


def cpu_times(path: str = "/proc/stat") -> Optional[tuple[int, int]]:
    """``(idle, total)`` CPU time of all cores since boot, in clock ticks, from Linux's ``/proc/stat`` (idle counts
    ``idle`` and ``iowait``; time stolen by the hypervisor is busy); ``None`` where there is no such file."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest time is in user)
    return ticks[3] + ticks[4], sum(ticks)


def idle_cores(window_s: float = WINDOW_S, *, read: Optional[Callable[[], Optional[tuple[int, int]]]] = None,
               cores: Optional[int] = None) -> float:
    """How many cores were idle over the next ``window_s`` seconds (this process sleeps meanwhile): the idle share of
    the CPU time (:func:`cpu_times`) times the core count. Where that cannot be read, the core count less the
    1-minute load average (a slower, older figure), or all cores when neither is known."""
    cores = cores or os.cpu_count() or 1
    read = read or cpu_times
    before = read()
    if before is not None:
        time.sleep(window_s)
        after = read()
        if after is not None and after[1] > before[1]:
            return cores * (after[0] - before[0]) / (after[1] - before[1])
    try:
        return max(0.0, cores - os.getloadavg()[0])
    except (OSError, AttributeError):
        return float(cores)


def choose_threads(requested: Optional[int]) -> Optional[str]:
    """Set torch's CPU threads: ``requested`` (``--threads``) when given; else no more than the idle cores.

    The idle cores are :func:`idle_cores` (measured over :data:`WINDOW_S` seconds), rounded, at least 1.
    torch's default, one OpenMP thread per core, stalls at every barrier waiting for a thread that another
    process preempted: measured on this project's 2-core machine, the CPU preset trained at 6.5
    images/s with 2 threads against 70 with 1 at load 5-7, and sampling ran 10x slower with 2 threads
    while a single other process kept one core busy (load 1.7); on idle cores 2 threads are 1.5x faster
    than 1. Returns the note to print when it chose fewer threads than torch's default, else ``None``.
    """
    if requested is not None:
        torch.set_num_threads(requested)
        return None
    default = torch.get_num_threads()
    if default <= 1:
        return None
    idle = idle_cores()
    threads = max(1, int(idle + 0.5))
    if threads >= default:
        return None
    torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    return (
        f"note: this machine is busy ({idle:.1f} of {cores} cores idle over the last {WINDOW_S:g} s): running on {threads} "
        f"thread{'s' if threads > 1 else ''} instead of torch's {default}, which is many times slower when other "
        f"processes compete for the cores (--threads {default} to use them anyway)"
    )
