"""A warning for a CPU that other processes already keep busy, where torch's threads stall.

On a small shared machine, torch's default of one thread per core competes with the other
processes for every core, and its OpenMP threads wait on each other: small ops became 100 times
slower in this project's measurements, where one thread kept its speed.

>>> busy_machine_advice(threads=1) is None          # the user chose: no advice
True
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["busy_machine_advice"]


def busy_machine_advice(threads: Optional[int]) -> Optional[str]:
    """One line of advice when ``threads`` was not chosen, torch uses several threads and the
    1-minute load average is above the core count; ``None`` otherwise (or where the load is unknown)."""
    if threads is not None or torch.get_num_threads() < 2:
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"note: this machine is busy (load {load:.1f} on {cores} cores) and torch uses {torch.get_num_threads()} "
            f"threads, which stall when other processes hold the cores; --threads 1 is often much faster then")
