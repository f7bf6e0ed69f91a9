"""Interleaved timing of several variants of one computation: medians, IQRs and ratios.

The machines this runs on are noisy (shared VMs: a call that takes 50 us may take
4 ms once in a hundred). So every variant of a comparison is timed in the same
loop, one sample of each per round and the order rotated every round, so slow
spells hit all variants alike; the statistics are medians and interquartile
ranges, never means or single runs.

On a loaded CPU another process takes the core for a whole scheduler slice
(~4 ms) in the middle of most samples of a few milliseconds (measured here at load
6 on 2 cores: CPU time 3.5 ms, wall time 7.5 ms, sample after sample), and how
often that happens depends on the sample's length, so wall-clock ratios of a short
and a long variant are biased. With ``clock="cpu"`` a sample is the process CPU
time (``time.process_time``: user + system, page faults included, time spent
descheduled excluded); that is the right clock for one-threaded CPU work, where
CPU time equals wall time whenever nothing interferes. Wall time is recorded too.

>>> import torch
>>> a = torch.randn(32, 32)
>>> t = measure({"mm": lambda: a @ a, "add": lambda: a + a}, budget_s=0.05, min_repeats=5)
>>> sorted(t.medians) == ["add", "mm"] and t.repeats >= 5
True
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = ["Timing", "measure", "synchronizer"]

Thunk = Callable[[], Any]


@dataclass(frozen=True)
class Timing:
    """Seconds per call of each variant by ``clock`` (``"wall"`` or ``"cpu"``): ``medians``,
    ``q1`` and ``q3`` (quartiles), from ``repeats`` interleaved rounds of ``numbers[name]``
    calls each; ``wall_medians`` are the wall-clock medians whatever the clock."""

    medians: Mapping[str, float]
    q1: Mapping[str, float]
    q3: Mapping[str, float]
    repeats: int
    numbers: Mapping[str, int]
    clock: str = "wall"
    wall_medians: Mapping[str, float] = field(default_factory=dict)

    def ratio(self, numerator: str, denominator: str) -> float:
        """``median(numerator) / median(denominator)``: below 1 means ``numerator`` is faster."""
        return self.medians[numerator] / self.medians[denominator]

    def iqr_fraction(self, name: str) -> float:
        """The interquartile range of ``name`` relative to its median (the noise level)."""
        return (self.q3[name] - self.q1[name]) / self.medians[name]


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (``torch.cuda.synchronize`` on cuda)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def measure(
    variants: Mapping[str, Thunk],
    *,
    budget_s: float = 1.0,
    min_repeats: int = 10,
    max_repeats: int = 500,
    warmup: int = 3,
    min_sample_s: float = 2e-4,
    sync: Callable[[], None] = lambda: None,
    clock: str = "wall",
) -> Timing:
    """Time every thunk in ``variants``, interleaved, within about ``budget_s`` seconds.

    After ``warmup`` calls of each, one call estimates its cost; a sample is
    ``numbers[name]`` back-to-back calls (enough to last ``min_sample_s``, so timer
    resolution does not matter), and ``repeats`` rounds (between ``min_repeats``
    and ``max_repeats``, as the budget allows) take one sample of every variant, the
    starting variant rotating each round. ``sync`` is called before and after each
    sample (pass :func:`synchronizer` of the device). The garbage collector is off
    while timing. ``clock="cpu"`` takes the process CPU time of each sample instead of
    its wall time (see the module docstring; only for one-threaded CPU work).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"measure: clock must be 'wall' or 'cpu', got {clock!r}")
    if not variants:
        raise ValueError("measure: variants is empty")
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"measure: need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
        sync()
    estimate = {}
    for name in names:
        sync()
        t0 = time.perf_counter()
        variants[name]()
        sync()
        estimate[name] = max(time.perf_counter() - t0, 1e-7)
    numbers = {n: max(1, math.ceil(min_sample_s / estimate[n])) for n in names}
    round_s = sum(estimate[n] * numbers[n] for n in names)
    repeats = max(min_repeats, min(max_repeats, int(budget_s / round_s)))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, number = variants[name], numbers[name]
                sync()
                c0 = time.process_time()
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                sync()
                t1 = time.perf_counter()
                c1 = time.process_time()
                wall[name].append((t1 - t0) / number)
                cpu[name].append((c1 - c0) / number)
    finally:
        if enabled:
            gc.enable()
    samples = cpu if clock == "cpu" else wall
    q1, med, q3 = {}, {}, {}
    for name, xs in samples.items():
        q1[name], med[name], q3[name] = _quartiles(xs)
    wall_medians = {name: statistics.median(xs) for name, xs in wall.items()}
    return Timing(medians=med, q1=q1, q3=q3, repeats=repeats, numbers=numbers, clock=clock, wall_medians=wall_medians)
