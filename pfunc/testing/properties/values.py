"""Values: forward runs, keeps shape and dtype, is deterministic, leaves its inputs alone, satisfies the
constraint, and equals a reference.

``forward_runs``
    binding, ``init`` and forward (eval, and training when there is state) run and return a tensor.
``keeps_shape_and_dtype``
    forward's output has the input's shape (one original), dtype and device (skipped if ``unsafe``).
``deterministic``
    two identical calls give identical outputs and new states.
``does_not_modify_inputs``
    forward and right_inverse leave their inputs (originals, params, state, ``Y``) untouched,
    values and version counters alike.
``constraint_holds``
    every given constraint holds on forward's output (eval and training).
``matches_reference``
    forward equals a reference implementation (and its new state, if it returns one).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

from ..report import describe
from ..subject import Case
from ..tolerance import compare
from .base import InputError, NotApplicable, Spec, Violation, call, forward, mode, modes, same, same_state

__all__ = [
    "forward_runs",
    "keeps_shape_and_dtype",
    "deterministic",
    "does_not_modify_inputs",
    "constraint_holds",
    "matches_reference",
    "takes_state",
]


def forward_runs(spec: Spec, case: Case, data: Any) -> None:
    for training in modes(case):
        Y, _ = call(f"forward ({mode(training)})", case.forward, training=training)
        if not isinstance(Y, Tensor):
            raise Violation(f"forward ({mode(training)}) returned a {type(Y).__name__}, not a Tensor")


def keeps_shape_and_dtype(spec: Spec, case: Case, data: Any) -> None:
    if spec.subject.unsafe:
        raise NotApplicable("declared unsafe=True (forward may change shape and dtype)", structural=True)
    X = case.originals
    for training in modes(case):
        Y, _ = forward(case, training=training)
        where = f"forward(X) ({mode(training)})"
        if len(X) == 1 and Y.shape != X[0].shape:
            raise Violation(
                f"{where} has shape {tuple(Y.shape)}, X has {tuple(X[0].shape)} "
                "(declare unsafe=True if the parametrization changes shape)"
            )
        if Y.dtype != X[0].dtype:
            raise Violation(f"{where} has dtype {Y.dtype}, X has {X[0].dtype}")
        if Y.device != X[0].device:
            raise Violation(f"{where} is on {Y.device}, X on {X[0].device}")


def deterministic(spec: Spec, case: Case, data: Any) -> None:
    for training in modes(case):
        Y1, S1 = forward(case, training=training)
        Y2, S2 = forward(case, training=training)
        if not same(Y1, Y2):
            raise Violation(
                f"two identical forward calls ({mode(training)}) differ: {compare(Y2, Y1)}\n"
                f"first:  {describe(Y1)}\nsecond: {describe(Y2)}"
            )
        if (diff := same_state(S1, S2)) is not None:
            raise Violation(f"two identical forward calls ({mode(training)}) return different states: {diff}")


def _snapshot(named: Sequence[tuple[str, Tensor]]) -> list[tuple[str, Tensor, Tensor, int]]:
    return [(n, t, t.detach().clone(), t._version) for n, t in named if isinstance(t, Tensor)]


def _check_untouched(snapshot: Sequence[tuple[str, Tensor, Tensor, int]], who: str) -> None:
    for name, t, before, version in snapshot:
        changed = not same(t.detach(), before)
        if changed or t._version != version:
            what = f"max change {compare(t.detach(), before).error:.3g}" if changed else "values unchanged"
            raise Violation(
                f"{who} modified its input {name} in place ({what}; version counter {version} -> {t._version})\n"
                f"before: {describe(before)}\nafter:  {describe(t)}"
            )


def _inputs_of(case: Case) -> list[tuple[str, Tensor]]:
    named = [("X" if len(case.originals) == 1 else f"original{i}", x) for i, x in enumerate(case.originals)]
    for i, p in enumerate(case.params):
        named += [(f"params[{i}].{k}", v) for k, v in p.items()]
    for i, s in enumerate(case.state):
        named += [(f"state[{i}].{k}", v) for k, v in s.items()]
    return named


def does_not_modify_inputs(spec: Spec, case: Case, data: Any) -> None:
    for training in modes(case):
        snap = _snapshot(_inputs_of(case))
        Y, _ = forward(case, training=training)
        _check_untouched(snap, f"forward ({mode(training)})")
    if spec.subject.has_right_inverse:
        Y = Y.detach()
        snap = _snapshot([("Y", Y)] + [(n, t) for n, t in _inputs_of(case) if n.startswith(("state", "params"))])
        try:
            case.right_inverse(Y)
        except Exception:
            return  # a failing right_inverse is right_inverse_round_trips' to report
        _check_untouched(snap, "right_inverse")


def constraint_holds(spec: Spec, case: Case, data: Any) -> None:
    if not spec.constraints:
        raise NotApplicable("no constraint given", structural=True)
    for training in modes(case):
        Y, _ = forward(case, training=training)
        tol = spec.tolerance_for(Y.dtype)
        for c in spec.constraints:
            problem = call(f"constraint {c.name}", c.violation, Y, tol)
            if problem is not None:
                raise Violation(f"forward(X) ({mode(training)}) is not {c.name}: {problem}\nY = {describe(Y)}")


def takes_state(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts ``state=`` and ``training=`` keywords (named, or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in params}
    return any(p.kind is p.VAR_KEYWORD for p in params) or {"state", "training"} <= names


def _reference_output(spec: Spec, case: Case, training: bool) -> tuple[Tensor, Optional[Any]]:
    if case.stateful and takes_state(spec.reference):
        out = call("reference", spec.reference, *case.originals, state=case.user_state(), training=training)
    else:
        out = call("reference", spec.reference, *case.originals)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and not isinstance(out[1], Tensor):
        return out[0], out[1]
    if not isinstance(out, Tensor):
        raise InputError(f"reference must return a Tensor or (Tensor, state), got {type(out).__name__}")
    return out, None


def matches_reference(spec: Spec, case: Case, data: Any) -> None:
    if spec.reference is None:
        raise NotApplicable("no reference given", structural=True)
    for training in modes(case):
        Y, S = forward(case, training=training)
        R, RS = _reference_output(spec, case, training)
        if not (d := compare(Y, R.to(Y.device), spec.tolerance_for(Y.dtype))).ok:
            raise Violation(
                f"forward(X) ({mode(training)}) differs from the reference: {d}\n"
                f"forward:   {describe(Y)}\nreference: {describe(R)}"
            )
        if RS is not None:
            mine = case.user_state(S)
            pairs = list(zip(mine, RS)) if isinstance(mine, list) else [(mine, RS)]
            for a, b in pairs:
                for k in a:
                    if k in b and not (d := compare(a[k], b[k].to(a[k].device), spec.tolerance_for(a[k].dtype))).ok:
                        raise Violation(f"new state {k} ({mode(training)}) differs from the reference's: {d}")
