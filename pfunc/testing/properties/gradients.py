"""Gradients: finite, reaching every original, right (against finite differences), the same under
``torch.func`` as under autograd, and the same in forward mode as in reverse mode.

``finite_output_and_gradients``
    for finite inputs, the output and the gradients of ``sum(G * Y)`` are finite.
``gradient_reaches_every_original``
    autograd reaches every floating original from forward's output: a ``.detach()``, ``.data``,
    ``torch.no_grad()`` or a trip through Python numbers inside forward fails it, naming the original
    (``non_differentiable=`` exempts an original meant to be constant).
``func_grad_matches_autograd``
    ``torch.func.grad`` of ``sum(G * Y)`` equals eager autograd.
``gradient_matches_finite_differences``
    autograd's gradient agrees with finite differences (``torch.autograd.gradcheck``'s fast mode: one
    random directional derivative, in float64, eval mode) at the drawn point, or, if not there (a kink),
    at one of two nearby points. Fast mode costs a few forward calls: it runs on the first
    ``5 * costly_examples`` (10) examples of a search (the first ones are often trivial: a 1 x 1 matrix).
``forward_mode_matches_reverse_mode``
    ``<G, jvp(V)> == <vjp(G), V>`` for fixed tangents ``V`` (``torch.func.jvp`` against autograd), eval
    mode: a custom ``autograd.Function`` without a ``jvp``, or with a wrong one, fails it.

``G`` is a fixed, non-degenerate cotangent (``cos(0.7 k + 0.3)`` over the entries), ``V`` a fixed tangent
(``sin(1.3 k + 0.5 + i)`` for the ``i``-th input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from ..report import describe
from ..subject import Case
from ..tolerance import compare
from .base import NotApplicable, Spec, Violation, call, call_with_grad, cotangent, exempt, mode, original_names, raised, tangent

__all__ = [
    "finite_output_and_gradients",
    "gradient_reaches_every_original",
    "func_grad_matches_autograd",
    "gradient_matches_finite_differences",
    "forward_mode_matches_reverse_mode",
]


@dataclass(frozen=True)
class _Grads:
    Y: Tensor
    names: tuple[str, ...]
    leaves: tuple[Tensor, ...]
    grads: tuple[Optional[Tensor], ...]
    training: bool


def _leaves(case: Case, dtype: Optional[torch.dtype] = None) -> tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]:
    def leaf(t: Tensor) -> Tensor:
        t = t.detach().clone()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.requires_grad_(t.is_floating_point())

    xs = tuple(leaf(x) for x in case.originals)
    ps = tuple({k: leaf(v) for k, v in p.items()} for p in case.params)
    return xs, ps


def _names(case: Case, ps: tuple[dict[str, Tensor], ...]) -> tuple[str, ...]:
    return original_names(case) + tuple(f"params[{i}].{k}" for i, p in enumerate(ps) for k in p)


def _eager_grads(case: Case, training: Optional[bool] = None) -> _Grads:
    training = case.stateful if training is None else training
    xs, ps = _leaves(case)
    Y, _ = call(f"forward ({mode(training)}) on inputs that require grad", case.forward, xs, training=training, params=ps)
    if not isinstance(Y, Tensor):
        raise NotApplicable("forward does not return a Tensor (reported by forward_runs)")
    leaves = xs + tuple(v for p in ps for v in p.values())
    wrt = [t for t in leaves if t.requires_grad]
    if not Y.requires_grad or not wrt or not Y.is_floating_point():
        return _Grads(Y, _names(case, ps), leaves, (None,) * len(leaves), training)
    out = call("autograd backward of sum(G * forward(X))", torch.autograd.grad, (Y * cotangent(Y)).sum(), wrt, allow_unused=True)
    it = iter(out)
    grads = tuple(next(it) if t.requires_grad else None for t in leaves)
    return _Grads(Y, _names(case, ps), leaves, grads, training)


def _grads_or_defer(spec: Spec, case: Case, training: Optional[bool] = None) -> _Grads:
    """Eager gradients; if autograd itself fails, that is ``finite_output_and_gradients``' to report."""
    try:
        return _eager_grads(case, training)
    except Violation as v:
        if not spec.checks("finite_output_and_gradients"):
            raise
        raise NotApplicable(f"eager autograd fails (reported by finite_output_and_gradients): {v.message}") from v


def finite_output_and_gradients(spec: Spec, case: Case, data: Any) -> None:
    if not all(bool(x.isfinite().all()) for x in case.originals):
        raise NotApplicable("the inputs are not finite")
    g = _eager_grads(case)
    bad = ~g.Y.detach().isfinite()
    if bool(bad.any()):
        raise Violation(
            f"forward(X) ({mode(g.training)}) has {int(bad.sum())} non-finite of {g.Y.numel()} entries for finite X\n"
            f"Y = {describe(g.Y)}"
        )
    for name, grad in zip(g.names, g.grads):
        if grad is not None and not bool(grad.isfinite().all()):
            n = int((~grad.isfinite()).sum())
            raise Violation(
                f"the gradient of sum(G * forward(X)) ({mode(g.training)}) w.r.t. {name} has {n} non-finite "
                f"entries for finite X (G = cos(0.7 k + 0.3))\ngradient = {describe(grad)}"
            )


def gradient_reaches_every_original(spec: Spec, case: Case, data: Any) -> None:
    names = original_names(case)
    wanted = [i for i, x in enumerate(case.originals) if x.is_floating_point() and not exempt(spec, i, names[i])]
    if not wanted:
        raise NotApplicable("every original is declared non_differentiable")
    g = _grads_or_defer(spec, case)
    if not g.Y.is_floating_point():
        raise NotApplicable(f"forward returns {g.Y.dtype}, which has no gradient")
    cut = [names[i] for i in wanted if g.grads[i] is None]
    if cut:
        which = ", ".join(cut)
        raise Violation(
            f"no gradient reaches {which}: forward's output ({mode(g.training)}) does not depend on it through "
            f"autograd (a .detach(), .data, torch.no_grad() or a trip through Python numbers in forward cuts it; "
            f"if it is meant to be constant, pass non_differentiable=[{', '.join(repr(c) for c in cut)}])"
        )


def func_grad_matches_autograd(spec: Spec, case: Case, data: Any) -> None:
    g = _grads_or_defer(spec, case)
    if all(grad is None for grad in g.grads):
        raise NotApplicable("forward's output does not depend on differentiable inputs")
    G = cotangent(g.Y.detach())
    xs, ps = _leaves(case)
    xs = tuple(x.detach() for x in xs)
    ps = tuple({k: v.detach() for k, v in p.items()} for p in ps)

    def loss(xs: tuple[Tensor, ...], ps: tuple[dict[str, Tensor], ...]) -> Tensor:
        Y, _ = case.forward(xs, training=g.training, params=ps)
        return (Y * G).sum()

    gx, gp = call("torch.func.grad(sum(G * forward(X)))", torch.func.grad(loss, argnums=(0, 1)), xs, ps)
    func = tuple(gx) + tuple(v for p in gp for v in p.values())
    for name, leaf, eager, functional in zip(g.names, g.leaves, g.grads, func):
        if not leaf.requires_grad:
            continue
        expected = torch.zeros_like(leaf) if eager is None else eager
        if not (d := compare(functional, expected, spec.tolerance_for(leaf.dtype))).ok:
            raise Violation(
                f"torch.func.grad w.r.t. {name} differs from autograd ({mode(g.training)}): {d}\n"
                f"autograd:   {describe(expected)}\nfunc.grad:  {describe(functional)}"
            )


def _differentiable(spec: Spec, case: Case, dtype: Optional[torch.dtype] = None) -> tuple[list[str], list[Tensor], Any]:
    """``(names, leaves, f)``: the floating originals (not exempt) and params as leaves, and ``f(*leaves) -> Y``
    in eval mode with the other inputs held fixed (cast to ``dtype`` if given)."""
    xs, ps = _leaves(case, dtype)
    state = tuple({k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in s.items()} for s in case.state)
    names = original_names(case)
    slots = [("x", i, None) for i, x in enumerate(xs) if x.requires_grad and not exempt(spec, i, names[i])]
    slots += [("p", i, k) for i, p in enumerate(ps) for k, v in p.items() if v.requires_grad]
    leaves = [xs[i] if kind == "x" else ps[i][k] for kind, i, k in slots]
    labels = [names[i] if kind == "x" else f"params[{i}].{k}" for kind, i, k in slots]

    def f(*values: Tensor) -> Tensor:
        xs_now, ps_now = list(xs), [dict(p) for p in ps]
        for (kind, i, k), v in zip(slots, values):
            if kind == "x":
                xs_now[i] = v
            else:
                ps_now[i][k] = v
        Y, _ = case.forward(tuple(xs_now), state, training=False, params=tuple(ps_now))
        return Y

    return labels, leaves, f


def _gradcheck(f: Any, point: tuple[Tensor, ...], seed: int) -> Optional[str]:
    """``None`` if autograd agrees with finite differences at ``point``, else gradcheck's finding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            torch.autograd.gradcheck(
                f, point, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True, check_undefined_grad=False, raise_exception=True
            )
        except GradcheckError as error:
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            return " ".join(lines[:3])
        except Exception as error:
            return raised("torch.autograd.gradcheck", error)
    return None


def _defer_non_finite(spec: Spec, Y: Tensor, leaves: list[Tensor]) -> None:
    """A non-finite output or gradient is ``finite_output_and_gradients``' to report, not a mismatch."""
    if not bool(Y.detach().isfinite().all()):
        raise NotApplicable("forward's output is not finite here (reported by finite_output_and_gradients)")
    grads = torch.autograd.grad((Y * cotangent(Y.detach())).sum(), leaves, allow_unused=True, retain_graph=True)
    if spec.checks("finite_output_and_gradients") and any(g is not None and not bool(g.isfinite().all()) for g in grads):
        raise NotApplicable("the gradient is not finite here (reported by finite_output_and_gradients)")


def gradient_matches_finite_differences(spec: Spec, case: Case, data: Any) -> None:
    labels, leaves, f = _differentiable(spec, case, torch.float64)
    if not leaves:
        raise NotApplicable("no floating input to differentiate")
    Y = call_with_grad(spec, "forward (eval, float64)", f, *leaves)
    if not (isinstance(Y, Tensor) and Y.is_floating_point() and Y.requires_grad):
        raise NotApplicable("forward's output (float64, eval) does not depend on its inputs through autograd")
    if Y.dtype != torch.float64:
        raise NotApplicable(f"forward returns {Y.dtype} for float64 inputs (reported by keeps_shape_and_dtype)")
    _defer_non_finite(spec, Y, leaves)
    spec.spend("gradient_matches_finite_differences", limit=5 * spec.costly_examples)
    points = [tuple(leaves)]
    for k in (1, 2):  # near a kink autograd and finite differences may rightly disagree: look nearby
        points.append(tuple((x + 1e-4 * tangent(x, k) * (1 + x.abs())).detach().requires_grad_() for x in leaves))
    first = None
    for point in points:
        finding = _gradcheck(f, point, case.seed)
        if finding is None:
            return
        first = first or finding
    spec.failed_costly.add("gradient_matches_finite_differences")
    raise Violation(
        f"autograd's gradient (eval, float64) disagrees with finite differences at X and at two nearby points, "
        f"w.r.t. {', '.join(labels)}: {first}"
    )


def forward_mode_matches_reverse_mode(spec: Spec, case: Case, data: Any) -> None:
    labels, leaves, f = _differentiable(spec, case)
    if not leaves:
        raise NotApplicable("no floating input to differentiate")
    Y = call_with_grad(spec, "forward (eval)", f, *leaves)
    if not (isinstance(Y, Tensor) and Y.is_floating_point() and Y.requires_grad):
        raise NotApplicable("forward's output (eval) does not depend on its inputs through autograd")
    _defer_non_finite(spec, Y, leaves)
    G = cotangent(Y.detach())
    V = tuple(tangent(x.detach(), i) for i, x in enumerate(leaves))
    primals = tuple(x.detach() for x in leaves)
    try:
        _, jv = torch.func.jvp(f, primals, V)
    except Exception as error:
        raise Violation(
            raised("forward-mode AD, torch.func.jvp(forward)", error)
            + " (a custom autograd.Function needs a jvp staticmethod, or generate_vmap_rule and setup_context)"
        ) from error
    grads = call("autograd backward of sum(G * forward(X))", torch.autograd.grad, (Y * G).sum(), leaves, allow_unused=True)
    forward_value = (G.to(torch.float64) * jv.detach().to(torch.float64)).sum()
    reverse_terms = [(v.to(torch.float64) * g.detach().to(torch.float64)) for v, g in zip(V, grads) if g is not None]
    reverse_value = sum((t.sum() for t in reverse_terms), torch.zeros((), dtype=torch.float64))
    scale = float((G.abs() * jv.detach().abs()).sum()) + sum(float(t.abs().sum()) for t in reverse_terms)
    tol = spec.tolerance_for(Y.dtype)
    allowed = tol.atol + tol.rtol * max(scale, 1.0)
    error = abs(float(forward_value) - float(reverse_value))
    if not error <= allowed:  # NaN fails too
        raise Violation(
            f"forward mode disagrees with reverse mode (eval) w.r.t. {', '.join(labels)}: <G, jvp(V)> = "
            f"{float(forward_value):.6g}, <vjp(G), V> = {float(reverse_value):.6g} (|difference| {error:.3g} > "
            f"allowed {allowed:.3g}; V_k = sin(1.3 k + 0.5 + i))"
        )


