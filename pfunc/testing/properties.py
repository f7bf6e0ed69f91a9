"""The invariants a parametrization must keep, one function each, run on one drawn :class:`Case`.

Each property either returns (it holds on this example), raises :class:`Violation`
(a readable sentence with the observed discrepancy) or raises
:class:`NotApplicable` (it says nothing about this example, e.g. a stateless
parametrization and a state property). :data:`PROPERTIES` lists them in order:

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
``finite_output_and_gradients``
    for finite inputs, the output and the gradients of ``sum(G * Y)`` are finite.
``right_inverse_round_trips``
    for ``Y`` in the image, ``forward(right_inverse(Y)) == Y``; right_inverse's outputs have the
    originals' number, shapes and dtypes; a second round trip stays at ``Y``; and through
    :func:`pfunc.parametrize` ``assign(Y)`` then ``materialize`` gives ``Y``.
``func_grad_matches_autograd``
    ``torch.func.grad`` of ``sum(G * Y)`` equals eager autograd.
``vmap_matches_loop``
    ``vmap(forward)(stack(x_i)) == stack(forward(x_i))`` (outputs and new states, eval and training).
``matches_reference``
    forward equals a reference implementation (and its new state, if it returns one).
``eval_keeps_state``
    an eval-mode call returns the state unchanged.
``state_stays_finite``
    repeated training-mode calls keep the state finite with the same keys, shapes and dtypes.
``training_converges``
    repeated training-mode calls settle (the last two outputs agree) and, if given, reach ``converges_to``.

``G`` is a fixed, non-degenerate cotangent (``cos(0.7 k + 0.3)`` over the entries).
"""

from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor

from ..tree import step_key
from .constraints import Constraint
from .report import describe
from .subject import TENSOR_NAME, Case, Subject
from .tolerance import Tolerance, compare

__all__ = ["Spec", "Violation", "NotApplicable", "InputError", "BindError", "PROPERTIES", "build_case", "cotangent"]


class Violation(Exception):
    """A property does not hold: ``message`` says how, ``details`` adds inputs beyond the case."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.message = message
        self.details = details


class NotApplicable(Exception):
    """The property says nothing about this example (``reason`` says why)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class InputError(Exception):
    """A strategy given to the check drew something unusable (a configuration error, not a violation)."""


@dataclass(frozen=True)
class Spec:
    """Everything a check needs besides the drawn data."""

    subject: Subject
    inputs: SearchStrategy[Any]
    constraints: tuple[Constraint, ...] = ()
    image: Optional[SearchStrategy[Tensor]] = None
    reference: Optional[Callable[..., Any]] = None
    states: Optional[Callable[[tuple[Tensor, ...]], SearchStrategy[Any]]] = None
    warmup: int = 0
    converges_to: Optional[Callable[..., Tensor]] = None
    convergence_steps: int = 50
    tolerance: Optional[Tolerance] = None
    batch_size: int = 3
    selected: Optional[frozenset] = None  # the properties the caller chose (None: all)

    def checks(self, name: str) -> bool:
        """Whether property ``name`` is part of this check (so it will report what it finds)."""
        return self.selected is None or name in self.selected

    def tolerance_for(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerance or Tolerance.for_dtype(dtype)


# ---------------------------------------------------------------------- helpers
def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"


def _raised(what: str, error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{what} raised {type(error).__name__}: {first}{_where(error)}"


def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with any exception turned into a :class:`Violation` naming ``what``."""
    try:
        return fn(*args, **kwargs)
    except (Violation, NotApplicable):
        raise
    except Exception as error:  # the user's code failed: that is the finding
        raise Violation(_raised(what, error)) from error


def _forward(case: Case, *, training: bool = False, **kwargs: Any) -> tuple[Tensor, tuple[dict[str, Tensor], ...]]:
    """Forward for properties other than ``forward_runs``: a failure there is that property's to report."""
    try:
        Y, state = case.forward(training=training, **kwargs)
    except Exception as error:
        raise NotApplicable(f"forward fails (reported by forward_runs): {_raised('forward', error)}") from error
    if not isinstance(Y, Tensor):
        raise NotApplicable("forward does not return a Tensor (reported by forward_runs)")
    return Y, state


def _modes(case: Case) -> tuple[bool, ...]:
    return (False, True) if case.stateful else (False,)


def _mode(training: bool) -> str:
    return "training" if training else "eval"


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "cpu":
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return compare(a, b).ok  # accelerator kernels may reorder sums


def _same_state(a: Sequence[dict[str, Tensor]], b: Sequence[dict[str, Tensor]]) -> Optional[str]:
    """``None`` if equal, else the first difference."""
    for i, (sa, sb) in enumerate(zip(a, b)):
        if sa.keys() != sb.keys():
            return f"state[{i}] keys {sorted(sa)} became {sorted(sb)}"
        for k in sa:
            if not isinstance(sb[k], Tensor) or not _same(sa[k], sb[k]):
                return f"state[{i}].{k}: {describe(sa[k])} became {describe(sb[k])}"
    return None


def cotangent(Y: Tensor) -> Tensor:
    """The fixed cotangent ``G`` with ``G_k = cos(0.7 k + 0.3)`` over ``Y``'s entries."""
    k = torch.arange(Y.numel(), dtype=torch.float64, device=Y.device)
    return torch.cos(0.7 * k + 0.3).reshape(Y.shape).to(Y.dtype)


def _as_originals(value: Any) -> tuple[Tensor, ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not items:
        raise InputError("inputs drew an empty tuple; draw a Tensor or a tuple of tensors (the originals)")
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise InputError(f"inputs must draw a Tensor or a tuple of tensors; item {i} is a {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise InputError(f"inputs must draw floating point tensors; item {i} has dtype {t.dtype}")
    return tuple(t.detach() for t in items)


def _as_state(value: Any, n_steps: int) -> tuple[dict[str, Tensor], ...]:
    items = [value] if isinstance(value, dict) else list(value)
    if len(items) != n_steps or not all(isinstance(s, dict) for s in items):
        raise InputError(
            f"states must draw one dict of tensors per parametrization ({n_steps}), "
            f"or one dict for a single parametrization; got {type(value).__name__}"
        )
    return tuple({k: v.detach() for k, v in s.items()} for s in items)


class BindError(Exception):
    """Binding, ``init`` or warm-up of the chain failed on a drawn example (``example`` describes it)."""

    def __init__(self, message: str, example: str):
        super().__init__(message)
        self.message = message
        self.example = example


def _describe_originals(originals: tuple[Tensor, ...]) -> str:
    if len(originals) == 1:
        return f"X = {describe(originals[0])}"
    return "\n".join(f"original{i} = {describe(x)}" for i, x in enumerate(originals))


def build_case(spec: Spec, data: Any, originals: Optional[tuple[Tensor, ...]] = None) -> Case:
    """Draw (or take) originals and a seed, bind the chain, apply drawn ``states`` and ``warmup``."""
    if originals is None:
        originals = _as_originals(data.draw(spec.inputs, label="inputs"))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    try:
        case = spec.subject.bind(originals, seed)
    except Exception as error:
        message = _raised("binding and initialising the chain (for_tensor, init)", error)
        raise BindError(message, _describe_originals(originals)) from error
    if spec.states is not None:
        state = _as_state(data.draw(spec.states(originals), label="state"), len(case.chain))
        case = replace(case, state=state)
    for step in range(spec.warmup):
        try:
            _, state = case.forward(training=True)
        except Exception as error:
            raise BindError(_raised(f"warm-up training call {step + 1}", error), case.describe()) from error
        case = replace(case, state=tuple({k: v.detach() for k, v in s.items()} for s in state))
    return case.recorded()


# ---------------------------------------------------------------------- the properties
def forward_runs(spec: Spec, case: Case, data: Any) -> None:
    for training in _modes(case):
        Y, _ = call(f"forward ({_mode(training)})", case.forward, training=training)
        if not isinstance(Y, Tensor):
            raise Violation(f"forward ({_mode(training)}) returned a {type(Y).__name__}, not a Tensor")


def keeps_shape_and_dtype(spec: Spec, case: Case, data: Any) -> None:
    if spec.subject.unsafe:
        raise NotApplicable("declared unsafe=True (forward may change shape and dtype)")
    X = case.originals
    for training in _modes(case):
        Y, _ = _forward(case, training=training)
        where = f"forward(X) ({_mode(training)})"
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
    for training in _modes(case):
        Y1, S1 = _forward(case, training=training)
        Y2, S2 = _forward(case, training=training)
        if not _same(Y1, Y2):
            raise Violation(
                f"two identical forward calls ({_mode(training)}) differ: {compare(Y2, Y1)}\n"
                f"first:  {describe(Y1)}\nsecond: {describe(Y2)}"
            )
        if (diff := _same_state(S1, S2)) is not None:
            raise Violation(f"two identical forward calls ({_mode(training)}) return different states: {diff}")


def _snapshot(named: Sequence[tuple[str, Tensor]]) -> list[tuple[str, Tensor, Tensor, int]]:
    return [(n, t, t.detach().clone(), t._version) for n, t in named if isinstance(t, Tensor)]


def _check_untouched(snapshot: Sequence[tuple[str, Tensor, Tensor, int]], who: str) -> None:
    for name, t, before, version in snapshot:
        changed = not _same(t.detach(), before)
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
    for training in _modes(case):
        snap = _snapshot(_inputs_of(case))
        Y, _ = _forward(case, training=training)
        _check_untouched(snap, f"forward ({_mode(training)})")
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
        raise NotApplicable("no constraint given")
    for training in _modes(case):
        Y, _ = _forward(case, training=training)
        tol = spec.tolerance_for(Y.dtype)
        for c in spec.constraints:
            problem = call(f"constraint {c.name}", c.violation, Y, tol)
            if problem is not None:
                raise Violation(f"forward(X) ({_mode(training)}) is not {c.name}: {problem}\nY = {describe(Y)}")


@dataclass(frozen=True)
class _Grads:
    Y: Tensor
    names: tuple[str, ...]
    leaves: tuple[Tensor, ...]
    grads: tuple[Optional[Tensor], ...]
    training: bool


def _leaves(case: Case) -> tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]:
    xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in case.originals)
    ps = tuple({k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in p.items()} for p in case.params)
    return xs, ps


def _eager_grads(case: Case) -> _Grads:
    training = case.stateful
    xs, ps = _leaves(case)
    Y, _ = call(f"forward ({_mode(training)}) on inputs that require grad", case.forward, xs, training=training, params=ps)
    if not isinstance(Y, Tensor):
        raise NotApplicable("forward does not return a Tensor (reported by forward_runs)")
    names = tuple("X" if len(xs) == 1 else f"original{i}" for i in range(len(xs)))
    names += tuple(f"params[{i}].{k}" for i, p in enumerate(ps) for k in p)
    leaves = xs + tuple(v for p in ps for v in p.values())
    wrt = [t for t in leaves if t.requires_grad]
    if not Y.requires_grad or not wrt or not Y.is_floating_point():
        return _Grads(Y, names, leaves, (None,) * len(leaves), training)
    out = call("autograd backward of sum(G * forward(X))", torch.autograd.grad, (Y * cotangent(Y)).sum(), wrt, allow_unused=True)
    it = iter(out)
    grads = tuple(next(it) if t.requires_grad else None for t in leaves)
    return _Grads(Y, names, leaves, grads, training)


def finite_output_and_gradients(spec: Spec, case: Case, data: Any) -> None:
    if not all(bool(x.isfinite().all()) for x in case.originals):
        raise NotApplicable("the inputs are not finite")
    g = _eager_grads(case)
    bad = ~g.Y.detach().isfinite()
    if bool(bad.any()):
        raise Violation(
            f"forward(X) ({_mode(g.training)}) has {int(bad.sum())} non-finite of {g.Y.numel()} entries for finite X\n"
            f"Y = {describe(g.Y)}"
        )
    for name, grad in zip(g.names, g.grads):
        if grad is not None and not bool(grad.isfinite().all()):
            n = int((~grad.isfinite()).sum())
            raise Violation(
                f"the gradient of sum(G * forward(X)) ({_mode(g.training)}) w.r.t. {name} has {n} non-finite "
                f"entries for finite X (G = cos(0.7 k + 0.3))\ngradient = {describe(grad)}"
            )


def _check_originals(X: tuple[Tensor, ...], reference: tuple[Tensor, ...], unsafe: bool) -> None:
    if len(X) != len(reference):
        raise Violation(f"right_inverse(Y) gives {len(X)} tensors, forward takes {len(reference)} originals")
    for i, (x, r) in enumerate(zip(X, reference)):
        name = "right_inverse(Y)" if len(X) == 1 else f"right_inverse(Y)[{i}]"
        if not isinstance(x, Tensor):
            raise Violation(f"{name} is a {type(x).__name__}, not a Tensor")
        if x.dtype != r.dtype:
            raise Violation(f"{name} has dtype {x.dtype}, the original {r.dtype}")
        if x.shape != r.shape and not unsafe:
            raise Violation(f"{name} has shape {tuple(x.shape)}, the original {tuple(r.shape)}")


def _image(spec: Spec, case: Case, data: Any) -> tuple[Case, Tensor, str]:
    """``(case, Y, details)``: a point ``Y`` of the image and the case (state) it belongs to."""
    if spec.image is None:
        Y, _ = _forward(case)
        return case, Y.detach(), f"Y = forward(X) = {describe(Y)}"
    Y = data.draw(spec.image, label="image")
    if not isinstance(Y, Tensor):
        raise InputError(f"image must draw a Tensor, got {type(Y).__name__}")
    net, params, state = call("registering the chain on Y with pfunc.parametrize", spec.subject.registered, Y.detach(), case.seed)
    return spec.subject.case_of(net, params, state, case.seed), Y.detach(), f"Y (drawn from image) = {describe(Y)}"


def right_inverse_round_trips(spec: Spec, case: Case, data: Any) -> None:
    if not spec.subject.has_right_inverse:
        raise NotApplicable(f"no right_inverse ({', '.join(spec.subject.missing_right_inverse)})")
    case, Y, details = _image(spec, case, data)
    tol = spec.tolerance_for(Y.dtype)
    try:
        X1, S1 = case.right_inverse(Y)
    except NotImplementedError as error:
        raise NotApplicable(f"right_inverse raises NotImplementedError: {str(error).strip()}") from error
    except Exception as error:
        raise Violation(_raised("right_inverse(Y)", error), details) from error
    _check_originals(X1, case.originals, spec.subject.unsafe)
    Y1, _ = call("forward(right_inverse(Y))", case.forward, X1, S1)
    if not (d := compare(Y1, Y, tol)).ok:
        raise Violation(f"forward(right_inverse(Y)) != Y: {d}\nforward(right_inverse(Y)) = {describe(Y1)}", details)
    X2, S2 = call("right_inverse(forward(right_inverse(Y)))", case.right_inverse, Y1, S1, 2)
    Y2, _ = call("forward of a second right_inverse", case.forward, X2, S2)
    if not (d := compare(Y2, Y, tol)).ok:
        raise Violation(f"a second round trip drifts from Y: {d}\nafter two round trips: {describe(Y2)}", details)
    _round_trip_through_pfunc(spec, case, Y, tol, details)


def _round_trip_through_pfunc(spec: Spec, case: Case, Y: Tensor, tol: Tolerance, details: str) -> None:
    """``pf.parametrize(holder, {"weight": chain})``, the case's state put in, ``assign(Y)``, ``materialize``."""
    net, params, state = call("registering the chain on Y with pfunc.parametrize", spec.subject.registered, Y, case.seed)
    for i, (p, s) in enumerate(zip(case.params, case.state)):
        for tree, own in ((params, p), (state, s)):
            for k, v in own.items():
                if step_key(TENSOR_NAME, i, k) in tree:
                    tree[step_key(TENSOR_NAME, i, k)] = v
    params, state = call("Parametrized.assign(params, state, {'weight': Y})", net.assign, params, state, {TENSOR_NAME: Y}, generator=case.generator(3))
    values, _ = call("Parametrized.materialize after assign", net.materialize, params, state, training=False)
    if not (d := compare(values[TENSOR_NAME], Y, tol)).ok:
        raise Violation(
            f"through pfunc.parametrize, materialize(assign(Y)) != Y: {d}\n"
            f"materialized: {describe(values[TENSOR_NAME])}",
            details,
        )


def func_grad_matches_autograd(spec: Spec, case: Case, data: Any) -> None:
    try:
        g = _eager_grads(case)
    except Violation as v:
        if not spec.checks("finite_output_and_gradients"):
            raise
        raise NotApplicable(f"eager autograd fails (reported by finite_output_and_gradients): {v.message}") from v
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
                f"torch.func.grad w.r.t. {name} differs from autograd ({_mode(g.training)}): {d}\n"
                f"autograd:   {describe(expected)}\nfunc.grad:  {describe(functional)}"
            )


def _stackable(a: Case, b: Case) -> bool:
    if len(a.originals) != len(b.originals) or len(a.state) != len(b.state):
        return False
    if any(x.shape != y.shape or x.dtype != y.dtype or x.device != y.device for x, y in zip(a.originals, b.originals)):
        return False
    for sa, sb in zip(a.state, b.state):
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or sa[k].dtype != sb[k].dtype for k in sa):
            return False
    return True


def vmap_matches_loop(spec: Spec, case: Case, data: Any) -> None:
    batch = [case]
    for _ in range(spec.batch_size - 1):
        try:
            other = build_case(spec, data)
        except BindError:
            continue
        if _stackable(case, other):
            batch.append(other)
    if len(batch) == 1:
        batch.append(case)  # no other drawn input had this shape: vmap still has to run and agree
    details = "\n".join(f"batch[{i}]: " + c.describe().replace("\n", "\n          ") for i, c in enumerate(batch))
    xs = tuple(torch.stack([c.originals[j] for c in batch]) for j in range(len(case.originals)))
    ss = tuple({k: torch.stack([c.state[i][k] for c in batch]) for k in case.state[i]} for i in range(len(case.state)))
    for training in _modes(case):
        loop = [_forward(c, training=training) for c in batch]
        Ys = torch.stack([Y for Y, _ in loop])

        def f(xs: tuple[Tensor, ...], ss: tuple[dict[str, Tensor], ...]) -> tuple[Tensor, tuple[dict[str, Tensor], ...]]:
            return case.forward(xs, ss, training=training)

        Yv, Sv = call(f"torch.func.vmap(forward) ({_mode(training)})", torch.func.vmap(f), xs, ss)
        if not (d := compare(Yv, Ys, spec.tolerance_for(Ys.dtype))).ok:
            raise Violation(
                f"vmap(forward)(stack(x_i)) != stack(forward(x_i)) ({_mode(training)}): {d}\n"
                f"vmap: {describe(Yv)}\nloop: {describe(Ys)}",
                details,
            )
        for i, s in enumerate(Sv):
            for k, v in s.items():
                expected = torch.stack([S[i][k] for _, S in loop])
                if not (d := compare(v, expected, spec.tolerance_for(expected.dtype))).ok:
                    raise Violation(
                        f"vmap(forward) returns a new state[{i}].{k} that differs from the loop's ({_mode(training)}): {d}",
                        details,
                    )


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
        raise NotApplicable("no reference given")
    for training in _modes(case):
        Y, S = _forward(case, training=training)
        R, RS = _reference_output(spec, case, training)
        if not (d := compare(Y, R.to(Y.device), spec.tolerance_for(Y.dtype))).ok:
            raise Violation(
                f"forward(X) ({_mode(training)}) differs from the reference: {d}\n"
                f"forward:   {describe(Y)}\nreference: {describe(R)}"
            )
        if RS is not None:
            mine = case.user_state(S)
            pairs = list(zip(mine, RS)) if isinstance(mine, list) else [(mine, RS)]
            for i, (a, b) in enumerate(pairs):
                for k in a:
                    if k in b and not (d := compare(a[k], b[k].to(a[k].device), spec.tolerance_for(a[k].dtype))).ok:
                        raise Violation(f"new state {k} ({_mode(training)}) differs from the reference's: {d}")


def _require_state(case: Case) -> None:
    if not case.stateful:
        raise NotApplicable("stateless (no state tensors for this input)")


def eval_keeps_state(spec: Spec, case: Case, data: Any) -> None:
    _require_state(case)
    _, S = _forward(case, training=False)
    if (diff := _same_state(case.state, S)) is not None:
        raise Violation(f"an eval-mode call changed the state: {diff}")


def _trajectory(spec: Spec, case: Case) -> list[tuple[int, Tensor, tuple[dict[str, Tensor], ...]]]:
    """``(step, Y, new_state)`` of ``convergence_steps`` training calls from the drawn state
    (computed once per example: both state properties read it)."""
    if "trajectory" not in case.memo:
        state, steps = case.state, []
        for step in range(1, spec.convergence_steps + 1):
            Y, state = call(f"training call {step}", case.forward, state=state, training=True)
            steps.append((step, Y.detach(), state))
        case.memo["trajectory"] = steps
    return case.memo["trajectory"]


def state_stays_finite(spec: Spec, case: Case, data: Any) -> None:
    _require_state(case)
    for step, _, state in _trajectory(spec, case):
        for i, (s0, s) in enumerate(zip(case.state, state)):
            if s0.keys() != s.keys():
                raise Violation(f"after training call {step}, state[{i}] keys {sorted(s0)} became {sorted(s)}")
            for k, v in s.items():
                if v.shape != s0[k].shape or v.dtype != s0[k].dtype:
                    raise Violation(
                        f"after training call {step}, state[{i}].{k} is {describe(v)[:40]}..., "
                        f"was {v.dtype} {tuple(s0[k].shape)}"
                    )
                if not bool(v.isfinite().all()):
                    raise Violation(f"after training call {step}, state[{i}].{k} is not finite: {describe(v)}")


def training_converges(spec: Spec, case: Case, data: Any) -> None:
    _require_state(case)
    if spec.convergence_steps < 2:
        raise NotApplicable("convergence_steps < 2")
    outputs: list[Tensor] = []
    state = case.state
    for _, Y, state in _trajectory(spec, case):
        outputs = [outputs[-1], Y] if outputs else [Y]
    last, Y = outputs
    tol = spec.tolerance_for(Y.dtype)
    if not (d := compare(Y, last, tol)).ok:
        raise Violation(
            f"after {spec.convergence_steps} training calls the output still moves: last two differ by {d}\n"
            f"last: {describe(Y)}"
        )
    if spec.converges_to is not None:
        Y_eval, _ = call("forward (eval) after training", case.forward, state=state, training=False)
        target = call("converges_to", spec.converges_to, *case.originals)
        if not (d := compare(Y_eval, target, tol)).ok:
            raise Violation(
                f"after {spec.convergence_steps} training calls, forward(X) (eval) is not converges_to(X): {d}\n"
                f"forward:   {describe(Y_eval)}\nconverged: {describe(target)}"
            )


PROPERTIES: dict[str, Callable[[Spec, Case, Any], None]] = {
    "forward_runs": forward_runs,
    "keeps_shape_and_dtype": keeps_shape_and_dtype,
    "deterministic": deterministic,
    "does_not_modify_inputs": does_not_modify_inputs,
    "constraint_holds": constraint_holds,
    "finite_output_and_gradients": finite_output_and_gradients,
    "right_inverse_round_trips": right_inverse_round_trips,
    "func_grad_matches_autograd": func_grad_matches_autograd,
    "vmap_matches_loop": vmap_matches_loop,
    "matches_reference": matches_reference,
    "eval_keeps_state": eval_keeps_state,
    "state_stays_finite": state_stays_finite,
    "training_converges": training_converges,
}
"""Every property, by name, in the order they are checked."""
