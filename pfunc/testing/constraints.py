"""Predicates on a parametrization's output: what "the constraint holds" means, with a readable discrepancy.

A :class:`Constraint` has a ``name`` and a ``violation(Y, tolerance)`` that
returns ``None`` when ``Y`` satisfies it and otherwise a sentence saying by how
much it does not (``"max |Y - Y^T| 0.5 > allowed 1.5e-08"``). Matrix constraints
act on the last two dims, so batches work. Tolerances are those of
:class:`~pfunc.testing.Tolerance`: errors are compared with ``atol + rtol * scale``
where ``scale`` is the natural magnitude (``max|Y|``, or 1 for orthogonality).

>>> import torch
>>> symmetric().violation(torch.eye(2), Tolerance.for_dtype(torch.float64)) is None
True
>>> print(symmetric().violation(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), Tolerance.for_dtype(torch.float32)))
max |Y - Y^T| = 1 > allowed 0.000352

Any callable ``Y -> bool`` (or a boolean tensor) becomes a constraint with
:func:`predicate`; :func:`as_constraints` accepts a constraint, a callable or a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .tolerance import Tolerance

__all__ = [
    "Constraint",
    "predicate",
    "as_constraints",
    "finite",
    "symmetric",
    "skew",
    "orthogonal",
    "special_orthogonal",
    "spd",
    "unit_spectral_norm",
    "spectral_norm_at_most",
    "positive",
    "in_interval",
    "zero_where",
    "standardized",
]

Violation = Optional[str]


@dataclass(frozen=True)
class Constraint:
    """A named property of a parametrization's output.

    ``check(Y, tolerance)`` returns ``None`` if it holds, else a sentence with the discrepancy.
    """

    name: str
    check: Callable[[Tensor, Tolerance], Violation]

    def violation(self, Y: Tensor, tolerance: Optional[Tolerance] = None) -> Violation:
        """``None`` if ``Y`` satisfies the constraint, else what is wrong (with numbers)."""
        if not isinstance(Y, Tensor):
            return f"expected a Tensor, got {type(Y).__name__}"
        return self.check(Y.detach(), tolerance or Tolerance.for_dtype(Y.dtype))

    def __repr__(self) -> str:
        return self.name


def predicate(fn: Callable[[Tensor], Any], name: Optional[str] = None) -> Constraint:
    """A constraint from a user function ``Y -> bool`` (or a boolean tensor, all of which must be true)."""
    label = name or getattr(fn, "__name__", None) or repr(fn)

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        result = fn(Y)
        if isinstance(result, Tensor):
            if result.dtype != torch.bool:
                raise TypeError(f"constraint {label}: expected a bool or a boolean tensor, got a {result.dtype} tensor")
            if result.ndim > 0:
                bad = int((~result).sum())
                return None if bad == 0 else f"{label} is false for {bad} of {result.numel()} entries"
        return None if bool(result) else f"{label} is false"

    return Constraint(label, check)


def as_constraints(spec: Union[None, Constraint, Callable[[Tensor], Any], Sequence[Any]]) -> tuple[Constraint, ...]:
    """Normalise ``None``, one constraint or predicate, or a sequence of them, to a tuple of :class:`Constraint`."""
    if spec is None:
        return ()
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for item in items:
        if isinstance(item, Constraint):
            out.append(item)
        elif callable(item):
            out.append(predicate(item))
        else:
            raise TypeError(f"constraint: expected a Constraint or a callable Y -> bool, got {type(item).__name__}")
    return tuple(out)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _matrix(Y: Tensor, who: str) -> Violation:
    if Y.ndim < 2:
        return f"{who} needs a matrix (or batch), got shape {tuple(Y.shape)}"
    return None


def _square(Y: Tensor, who: str) -> Violation:
    if Y.ndim < 2 or Y.shape[-1] != Y.shape[-2]:
        return f"{who} needs square matrices, got shape {tuple(Y.shape)}"
    return None


def finite() -> Constraint:
    """Every entry is finite."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        bad = int((~Y.isfinite()).sum())
        return None if bad == 0 else f"{bad} of {Y.numel()} entries are not finite"

    return Constraint("finite", check)


def _max_abs(x: Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def symmetric() -> Constraint:
    """``Y == Y^T`` (last two dims) within ``atol + rtol * max|Y|``."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        if (bad := _square(Y, "symmetric")) is not None:
            return bad
        error, allowed = _max_abs(Y - Y.mT), tolerance.allowed(Y)
        return None if error <= allowed else f"max |Y - Y^T| = {_fmt(error)} > allowed {_fmt(allowed)}"

    return Constraint("symmetric", check)


def skew() -> Constraint:
    """``Y == -Y^T`` (last two dims) within ``atol + rtol * max|Y|``."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        if (bad := _square(Y, "skew")) is not None:
            return bad
        error, allowed = _max_abs(Y + Y.mT), tolerance.allowed(Y)
        return None if error <= allowed else f"max |Y + Y^T| = {_fmt(error)} > allowed {_fmt(allowed)}"

    return Constraint("skew", check)


def orthogonal(det: Optional[int] = None) -> Constraint:
    """Orthonormal columns (tall or square) or rows (wide): ``max|Q^T Q - I| <= atol + rtol``;
    with ``det=+1``/``-1`` (square) also ``|det Q - det| <= atol + rtol``."""
    if det not in (None, 1, -1):
        raise ValueError(f"orthogonal: det must be None, 1 or -1, got {det!r}")
    name = "orthogonal" if det is None else f"orthogonal with det {det:+d}"

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        if (bad := _matrix(Y, name)) is not None:
            return bad
        Q = Y.to(torch.float64)
        G = Q.mH @ Q if Q.shape[-2] >= Q.shape[-1] else Q @ Q.mH
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        error, allowed = _max_abs(G - eye), tolerance.atol + tolerance.rtol
        if error > allowed:
            which = "Q^T Q" if Q.shape[-2] >= Q.shape[-1] else "Q Q^T"
            return f"max |{which} - I| = {_fmt(error)} > allowed {_fmt(allowed)}"
        if det is not None:
            if (bad := _square(Y, name)) is not None:
                return bad
            d = torch.linalg.det(Q)
            error = _max_abs(d - det)
            if error > allowed:
                return f"det Q = {_fmt(float(d.flatten()[(d - det).abs().flatten().argmax()]))}, expected {det:+d}"
        return None

    return Constraint(name, check)


def special_orthogonal() -> Constraint:
    """Orthogonal with determinant +1 (rotations): ``orthogonal(det=+1)``."""
    return orthogonal(det=1)


def spd() -> Constraint:
    """Symmetric (as :func:`symmetric`) and positive definite: the smallest eigenvalue is ``> 0``
    in the output's own dtype (strict: an SPD parametrization promises it; choose inputs whose
    image has a condition number below ``1 / eps`` of the dtype)."""
    sym = symmetric()

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        if (bad := sym.check(Y, tolerance)) is not None:
            return bad.replace("symmetric", "spd")
        eig = torch.linalg.eigvalsh((Y + Y.mT) / 2)
        smallest = float(eig.min()) if eig.numel() else 1.0
        if not smallest > 0:
            return f"smallest eigenvalue {_fmt(smallest)} <= 0 (largest {_fmt(float(eig.max()))})"
        return None

    return Constraint("spd", check)


def _spectral_norm(Y: Tensor, dim: int) -> Tensor:
    if Y.ndim == 1:
        return torch.linalg.vector_norm(Y.to(torch.float64))
    d = dim % Y.ndim
    M = Y.movedim(d, 0).flatten(1).to(torch.float64)
    return torch.linalg.matrix_norm(M, ord=2)


def unit_spectral_norm(dim: int = 0) -> Constraint:
    """The largest singular value of ``Y`` viewed as a matrix with ``dim`` first (torch's spectral
    norm view; a vector's 2-norm) is 1 within ``atol + rtol``."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        sigma = float(_spectral_norm(Y, dim))
        error, allowed = abs(sigma - 1.0), tolerance.atol + tolerance.rtol
        return None if error <= allowed else f"spectral norm {sigma:.6g}, |sigma - 1| = {_fmt(error)} > allowed {_fmt(allowed)}"

    return Constraint("unit spectral norm", check)


def spectral_norm_at_most(bound: float, dim: int = 0) -> Constraint:
    """The largest singular value (as :func:`unit_spectral_norm`) is at most ``bound * (1 + rtol) + atol``."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        sigma = float(_spectral_norm(Y, dim))
        allowed = bound * (1 + tolerance.rtol) + tolerance.atol
        return None if sigma <= allowed else f"spectral norm {sigma:.6g} > {bound} (allowed {allowed:.6g})"

    return Constraint(f"spectral norm <= {bound}", check)


def positive() -> Constraint:
    """Every entry is ``> 0`` (strictly, in the output's dtype)."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        bad = ~(Y > 0)
        if not bool(bad.any()):
            return None
        return f"{int(bad.sum())} of {Y.numel()} entries are not > 0 (smallest {_fmt(float(Y.min()))})"

    return Constraint("positive", check)


def in_interval(low: float, high: float, *, closed: bool = False) -> Constraint:
    """Every entry is in ``(low, high)`` (``closed=True``: ``[low, high]``), exactly, in the output's dtype."""
    if not low < high:
        raise ValueError(f"in_interval: need low < high, got {low!r}, {high!r}")
    name = f"in [{low}, {high}]" if closed else f"in ({low}, {high})"

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        inside = (Y >= low) & (Y <= high) if closed else (Y > low) & (Y < high)
        if bool(inside.all()):
            return None
        outside = Y[~inside]
        return f"{outside.numel()} of {Y.numel()} entries are not {name} (e.g. {float(outside[0])!r})"

    return Constraint(name, check)


def zero_where(mask: Tensor) -> Constraint:
    """``Y`` is exactly zero where ``mask`` is zero (pruning)."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        m = mask.to(Y.device)
        if m.shape != Y.shape[Y.ndim - m.ndim :]:
            return f"mask has shape {tuple(m.shape)}, Y {tuple(Y.shape)}"
        leaked = (Y != 0) & (m == 0)
        if not bool(leaked.any()):
            return None
        return f"{int(leaked.sum())} pruned entries are nonzero (largest |value| {_fmt(_max_abs(Y[leaked]))})"

    return Constraint("zero where masked", check)


def standardized(dim: int = 0) -> Constraint:
    """Each slice along ``dim`` (an output channel) has mean 0 within ``atol + rtol * max|Y|``
    and (biased) variance at most ``1 + rtol``: weight standardization's output."""

    def check(Y: Tensor, tolerance: Tolerance) -> Violation:
        if Y.ndim < 2:
            return f"standardized needs at least 2 dims, got shape {tuple(Y.shape)}"
        Z = Y.movedim(dim % Y.ndim, 0).flatten(1).to(torch.float64)
        var, mean = torch.var_mean(Z, dim=1, correction=0)
        error, allowed = _max_abs(mean), tolerance.allowed(Y)
        if error > allowed:
            return f"max |channel mean| = {_fmt(error)} > allowed {_fmt(allowed)}"
        biggest = float(var.max())
        if biggest > 1 + tolerance.rtol:
            return f"largest channel variance {biggest:.6g} > 1"
        return None

    return Constraint("standardized", check)
