"""The edge of the domain: zero, tiny and large inputs, reported as warnings, never as failures.

``edge_of_domain``
    forward (eval) is run on originals that are all zero, all ``+-1e-30``, all ``+-1e4``, and the drawn
    example rescaled to a largest entry of ``1e-30`` and ``1e4``; a probe that raises, gives a non-finite
    output or gradient, or leaves a constraint is listed in ``report.warnings`` with the input. Some
    correct parametrizations are genuinely singular there (a unit-norm row of a zero row, QR's gradient
    of a rank-deficient matrix), so these never fail the check: read them, and guard what your training
    can reach. Costly: the first ``costly_examples`` examples.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..report import CheckWarning, describe
from ..subject import Case
from .base import NotApplicable, Spec, cotangent, describe_originals, raised

__all__ = ["edge_of_domain", "PROBES"]

TINY = 1e-30
LARGE = 1e4


def _fill(value: float) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.full_like(x, value)


def _rescaled(magnitude: float) -> Callable[[Tensor], Tensor]:
    def scale(x: Tensor) -> Tensor:
        top = x.abs().max() if x.numel() else torch.zeros((), dtype=x.dtype)
        return x * (magnitude / top) if bool(top > 0) else torch.full_like(x, magnitude)

    return scale


PROBES: dict[str, Callable[[Tensor], Tensor]] = {
    "zero": _fill(0.0),
    "+tiny": _fill(TINY),
    "-tiny": _fill(-TINY),
    "+large": _fill(LARGE),
    "-large": _fill(-LARGE),
    "tiny-rescaled": _rescaled(TINY),
    "large-rescaled": _rescaled(LARGE),
}
"""Probe name -> how it turns a drawn original into the probed one."""


def _probe(spec: Spec, case: Case, name: str, originals: tuple[Tensor, ...]) -> list[tuple[str, str]]:
    """``(kind, message)`` of what goes wrong at this probe."""
    xs = tuple(x.detach().clone().requires_grad_() for x in originals)
    try:
        Y, _ = case.forward(xs, training=False)
    except Exception:  # perhaps only with autograd on (finite_output_and_gradients reports that): try without
        try:
            Y, _ = case.forward(originals, training=False)
        except Exception as error:
            return [("raised", raised("forward", error))]
    if not isinstance(Y, Tensor) or not Y.is_floating_point():
        return []
    found = []
    if not bool(Y.detach().isfinite().all()):
        found.append(("non-finite output", f"forward has {int((~Y.detach().isfinite()).sum())} non-finite entries: {describe(Y)}"))
    else:
        tol = spec.tolerance_for(Y.dtype)
        for c in spec.constraints:
            try:
                problem = c.violation(Y.detach(), tol)
            except Exception as error:
                problem = raised(f"constraint {c.name}", error)
            if problem is not None:
                found.append(("off the constraint", f"forward is not {c.name}: {problem}"))
    if Y.requires_grad:
        try:
            grads = torch.autograd.grad((Y * cotangent(Y.detach())).sum(), xs, allow_unused=True)
        except Exception as error:
            return found + [("raised", raised("autograd backward", error))]
        if any(g is not None and not bool(g.isfinite().all()) for g in grads):
            found.append(("non-finite gradient", "the gradient of sum(G * Y) has non-finite entries"))
    return found


def edge_of_domain(spec: Spec, case: Case, data: Any) -> None:
    if not all(x.is_floating_point() for x in case.originals):
        raise NotApplicable("an original is not floating point")
    spec.spend("edge_of_domain")
    for name, make in PROBES.items():
        if name.endswith("tiny") and TINY < torch.finfo(case.dtype).tiny:
            continue  # not representable: it would be zero again
        originals = tuple(make(x) for x in case.originals)
        for kind, message in _probe(spec, case, name, originals):
            spec.warn(CheckWarning("edge_of_domain", name, kind, message, describe_originals(originals)))
