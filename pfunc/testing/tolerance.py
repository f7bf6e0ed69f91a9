"""Tolerances that scale with the dtype, and the one comparison every check uses.

Two tensors ``actual`` and ``expected`` agree when

    max |actual - expected|  <=  atol + rtol * max |expected|

(a norm-wise relative test, the right one for matrix functions whose entries
differ in magnitude). By default ``rtol = sqrt(eps)`` and ``atol = eps ** 0.75``
of the dtype, i.e. half (and three quarters) of its digits:

============  ===========  ===========
dtype         rtol         atol
============  ===========  ===========
float64       1.5e-08      1.8e-12
float32       3.5e-04      6.4e-06
bfloat16      8.8e-02      2.6e-02
float16       3.1e-02      5.5e-03
============  ===========  ===========

>>> import torch
>>> round(Tolerance.for_dtype(torch.float32).allowed(torch.tensor([2.0])), 6)
0.000697
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Tolerance", "Discrepancy", "compare"]


@dataclass(frozen=True)
class Tolerance:
    """``rtol`` and ``atol`` of the comparison ``max|a - b| <= atol + rtol * max|b|``."""

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"Tolerance: rtol and atol must be >= 0, got rtol={self.rtol!r}, atol={self.atol!r}")

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, scale: float = 1.0) -> "Tolerance":
        """The default tolerance of ``dtype`` (``rtol = scale * sqrt(eps)``, ``atol = scale * eps**0.75``)."""
        if not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"Tolerance.for_dtype: dtype must be floating point or complex, got {dtype}")
        eps = torch.finfo(dtype).eps
        return cls(rtol=scale * eps**0.5, atol=scale * eps**0.75)

    def allowed(self, expected: Tensor) -> float:
        """The largest allowed absolute error against ``expected``."""
        magnitude = expected.detach().abs()
        magnitude = magnitude[magnitude.isfinite()]
        scale = float(magnitude.max()) if magnitude.numel() else 0.0
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        return f"rtol={self.rtol:.2g}, atol={self.atol:.2g}"


@dataclass(frozen=True)
class Discrepancy:
    """How far ``actual`` is from ``expected``: ``error`` (max abs) against ``allowed``."""

    error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    def __str__(self) -> str:
        relation = "<=" if self.ok else ">"
        return f"max abs error {self.error:.3g} {relation} allowed {self.allowed:.3g}"


def compare(actual: Tensor, expected: Tensor, tolerance: Optional[Tolerance] = None) -> Discrepancy:
    """The :class:`~pfunc.testing.tolerance.Discrepancy` of ``actual`` against ``expected`` (same shape), NaN-aware.

    A NaN or infinity where ``expected`` is finite, or a shape mismatch, is an
    infinite error. ``tolerance=None`` uses the default of ``expected``'s dtype.
    """
    if tolerance is None:
        tolerance = Tolerance.for_dtype(expected.dtype)
    allowed = tolerance.allowed(expected)
    if actual.shape != expected.shape:
        return Discrepancy(float("inf"), allowed)
    if actual.numel() == 0:
        return Discrepancy(0.0, allowed)
    a = actual.detach().to(torch.promote_types(actual.dtype, expected.dtype))
    b = expected.detach().to(a.dtype)
    same = (a == b) | (a.isnan() & b.isnan())
    diff = (a - b).abs()
    error = float(torch.where(same, torch.zeros_like(diff), diff).max())
    if error != error:  # NaN against a number
        error = float("inf")
    return Discrepancy(error, allowed)
