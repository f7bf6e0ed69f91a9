"""CPU threads for a machine that other processes may keep busy.

torch's default, one OpenMP thread per core, is fastest on idle cores and many times slower when
other processes hold some of them: every parallel region waits at its barrier for the thread that
was preempted. :func:`choose_threads` keeps torch to the idle cores unless ``--threads`` says
otherwise, and returns the note to print when it chose fewer threads than torch's default.

>>> choose_threads(1) is None and torch.get_num_threads() == 1     # --threads given: obeyed, no note
True
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["choose_threads"]


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
