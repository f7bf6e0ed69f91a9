"""Transforms: the same values under ``vmap``, on a batch, on non-contiguous inputs and compiled.

``vmap_matches_loop``
    ``vmap(forward)(stack(x_i)) == stack(forward(x_i))`` (outputs and new states, eval and training).
``batched_forward_matches_per_item``
    for a parametrization that accepts leading batch dims (``batched=True``, or inferred: the inputs were
    drawn by one of :mod:`pfunc.testing.strategies`' matrix strategies with a ``batch_shape``), a plain call
    on ``stack(x_i)`` equals ``stack(forward(x_i))``: a reduction over ``dim=1`` that should be over ``-1``
    passes on 2-D inputs and fails here. Stateless parametrizations only (a state has no batch dim).
``non_contiguous_inputs_give_the_same_output``
    originals handed over as strided views (as a chain, a transpose or a vmapped slice hands them: every
    other entry of a buffer, matrices stored transposed) give the same output as contiguous ones: a
    ``.view`` that needs contiguity fails it.
``compiled_matches_eager``
    ``torch.compile(forward, backend="aot_eager")`` gives eager's output and gradient; graph breaks are
    reported as notes, not failures. Costly: the first example of a search only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..report import describe
from ..subject import Case
from ..tolerance import compare
from .base import NotApplicable, Spec, Violation, call, call_with_grad, cotangent, describe_batch, draw_batch, forward, mode, modes, raised

__all__ = [
    "vmap_matches_loop",
    "batched_forward_matches_per_item",
    "non_contiguous_inputs_give_the_same_output",
    "compiled_matches_eager",
]


def vmap_matches_loop(spec: Spec, case: Case, data: Any) -> None:
    batch = draw_batch(spec, case, data)
    details = describe_batch(batch)
    xs = tuple(torch.stack([c.originals[j] for c in batch]) for j in range(len(case.originals)))
    ss = tuple({k: torch.stack([c.state[i][k] for c in batch]) for k in case.state[i]} for i in range(len(case.state)))
    for training in modes(case):
        loop = [forward(c, training=training) for c in batch]
        Ys = torch.stack([Y for Y, _ in loop])

        def f(xs: tuple[Tensor, ...], ss: tuple[dict[str, Tensor], ...]) -> tuple[Tensor, tuple[dict[str, Tensor], ...]]:
            return case.forward(xs, ss, training=training)

        Yv, Sv = call(f"torch.func.vmap(forward) ({mode(training)})", torch.func.vmap(f), xs, ss)
        if not (d := compare(Yv, Ys, spec.tolerance_for(Ys.dtype))).ok:
            raise Violation(
                f"vmap(forward)(stack(x_i)) != stack(forward(x_i)) ({mode(training)}): {d}\n"
                f"vmap: {describe(Yv)}\nloop: {describe(Ys)}",
                details,
            )
        for i, s in enumerate(Sv):
            for k, v in s.items():
                expected = torch.stack([S[i][k] for _, S in loop])
                if not (d := compare(v, expected, spec.tolerance_for(expected.dtype))).ok:
                    raise Violation(
                        f"vmap(forward) returns a new state[{i}].{k} that differs from the loop's ({mode(training)}): {d}",
                        details,
                    )


def batched_forward_matches_per_item(spec: Spec, case: Case, data: Any) -> None:
    if spec.batched is False or (spec.batched is None and not case.batched):
        raise NotApplicable(
            "batch dims not declared (batched=True) nor drawn by a strategy with batch_shape"
            if spec.batched is None
            else "declared batched=False",
            structural=spec.batched is False,
        )
    if case.stateful:
        raise NotApplicable("stateful: a state has no batch dim")
    batch = draw_batch(spec, case, data)
    details = describe_batch(batch)
    loop = torch.stack([forward(c)[0] for c in batch])
    xs = tuple(torch.stack([c.originals[j] for c in batch]) for j in range(len(case.originals)))
    why = "batched=True" if spec.batched else "batched: inferred from the strategy's batch_shape"
    Yb, _ = call(f"forward on a batch, stack(x_i) ({why})", case.forward, xs)
    if not (d := compare(Yb, loop, spec.tolerance_for(loop.dtype))).ok:
        raise Violation(
            f"forward(stack(x_i)) != stack(forward(x_i)) ({why}): {d} (an axis counted from the front, e.g. dim=1 "
            f"for -1, or a 2-D-only op?)\nbatched:  {describe(Yb)}\nper item: {describe(loop)}",
            details,
        )


def _strided(x: Tensor) -> Tensor:
    """``x``'s values as a non-contiguous view: every other entry of a buffer twice as long, and for a
    matrix (batch) the last two dims stored transposed, so that no ``.view`` merging dims works on it."""
    if x.ndim >= 2:
        base = torch.zeros(x.shape[:-2] + (x.shape[-1], x.shape[-2], 2), dtype=x.dtype, device=x.device)
        base[..., 0] = x.mT
        return base[..., 0].mT
    base = torch.zeros(x.shape + (2,), dtype=x.dtype, device=x.device)
    base[..., 0] = x
    return base[..., 0]


def non_contiguous_inputs_give_the_same_output(spec: Spec, case: Case, data: Any) -> None:
    if all(x.numel() < 2 for x in case.originals):
        raise NotApplicable("a tensor of fewer than 2 entries is always contiguous")
    Y, _ = forward(case)
    views = tuple(_strided(x) if x.numel() >= 2 else x for x in case.originals)
    Yv, _ = call("forward on non-contiguous originals (strided views of the same values)", case.forward, views)
    if not isinstance(Yv, Tensor) or not (d := compare(Yv, Y, spec.tolerance_for(Y.dtype))).ok:
        got = describe(Yv) if isinstance(Yv, Tensor) else repr(Yv)
        raise Violation(
            f"forward on non-contiguous originals differs from forward on contiguous ones: {d if isinstance(Yv, Tensor) else got}\n"
            f"non-contiguous: {got}\ncontiguous:     {describe(Y)}"
        )


def compiled_matches_eager(spec: Spec, case: Case, data: Any) -> None:
    Y, _ = forward(case)
    if not Y.is_floating_point():
        raise NotApplicable(f"forward returns {Y.dtype}")
    if not bool(Y.isfinite().all()):
        raise NotApplicable("forward's output is not finite here (reported by finite_output_and_gradients)")
    spec.spend("compiled_matches_eager", limit=1)
    import torch._dynamo as dynamo

    G = cotangent(Y.detach())
    xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in case.originals)
    eager_Y, _ = call_with_grad(spec, "forward on inputs that require grad", case.forward, xs)
    wrt = [x for x in xs if x.requires_grad]
    eager_grads = (
        call_with_grad(spec, "autograd backward", torch.autograd.grad, (eager_Y * G).sum(), wrt, allow_unused=True)
        if eager_Y.requires_grad and wrt
        else ()
    )

    def f(*originals: Tensor) -> Tensor:
        return case.forward(originals)[0]

    dynamo.reset()  # a fresh cache: otherwise this closure's earlier compilations are reused or hit the recompile limit
    breaks_before = sum(dynamo.utils.counters["graph_break"].values())
    compiled = torch.compile(f, backend="aot_eager", dynamic=False)
    cxs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in case.originals)
    try:
        cY = compiled(*cxs)
        cwrt = [x for x in cxs if x.requires_grad]
        c_grads = torch.autograd.grad((cY * G).sum(), cwrt, allow_unused=True) if cY.requires_grad and cwrt else ()
    except Exception as error:
        spec.failed_costly.add("compiled_matches_eager")
        raise Violation(raised("torch.compile(forward, backend='aot_eager')", error)) from error
    finally:
        dynamo.reset()
    breaks = sum(dynamo.utils.counters["graph_break"].values()) - breaks_before
    if breaks:
        spec.note(f"compiled_matches_eager: torch.compile(forward) has {breaks} graph break(s) (runs, more slowly)")
    tol = spec.tolerance_for(Y.dtype)
    problems = []
    if not (d := compare(cY, eager_Y, tol)).ok:
        problems.append(f"output: {d}\ncompiled: {describe(cY)}\neager:    {describe(eager_Y)}")
    for i, (a, b) in enumerate(zip(c_grads, eager_grads)):
        if (a is None) != (b is None) or (a is not None and not (d := compare(a, b, tol)).ok):
            problems.append(f"gradient w.r.t. original {i}: {d if a is not None and b is not None else 'None on one side'}")
    if problems:
        spec.failed_costly.add("compiled_matches_eager")
        raise Violation("torch.compile(forward) differs from eager, " + "\n".join(problems))
