"""Round trips: ``right_inverse`` gives back originals that forward maps to the same point.

``right_inverse_round_trips``
    for ``Y`` in the image (``forward(X)``, or drawn from ``image=``): right_inverse returns as many
    tensors as forward takes, with their dtypes and (when ``Y`` has ``forward(X)``'s shape) their shapes,
    checked *before* anything is registered or run on them, with or without ``unsafe``; then
    ``forward(right_inverse(Y)) == Y``; a second round trip stays at ``Y``; and through
    :func:`pfunc.parametrize`, ``assign(Y)`` then ``materialize`` gives ``Y``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...tree import step_key
from ..report import describe
from ..subject import TENSOR_NAME, Case
from ..tolerance import Tolerance, compare
from .base import InputError, NotApplicable, Spec, Violation, call, forward, raised

__all__ = ["right_inverse_round_trips"]


def _check_originals(X: tuple[Any, ...], reference: tuple[Tensor, ...], check_shapes: bool) -> None:
    if len(X) != len(reference):
        raise Violation(f"right_inverse(Y) gives {len(X)} tensor(s), forward takes {len(reference)} original(s)")
    for i, (x, r) in enumerate(zip(X, reference)):
        name = "right_inverse(Y)" if len(X) == 1 else f"right_inverse(Y)[{i}]"
        original = "the original" if len(X) == 1 else f"original{i}"
        if not isinstance(x, Tensor):
            raise Violation(f"{name} is a {type(x).__name__}, not a Tensor")
        if x.dtype != r.dtype:
            raise Violation(f"{name} has dtype {x.dtype}, {original} {r.dtype}")
        if check_shapes and x.shape != r.shape:
            raise Violation(f"{name} has shape {tuple(x.shape)}, {original} {tuple(r.shape)} (forward takes that shape)")


def _image(spec: Spec, case: Case, data: Any) -> tuple[Case, Tensor, str]:
    """``(case, Y, details)``: a point ``Y`` of the image and the case (state) it belongs to. A drawn ``Y``
    goes through right_inverse on the drawn case first, so a wrong count, dtype or shape is reported as
    such, not as a crash inside registration."""
    Y0, _ = forward(case)
    if spec.image is None:
        return case, Y0.detach(), f"Y = forward(X) = {describe(Y0)}"
    Y = data.draw(spec.image, label="image")
    if not isinstance(Y, Tensor):
        raise InputError(f"image must draw a Tensor, got {type(Y).__name__}")
    Y = Y.detach()
    details = f"Y (drawn from image) = {describe(Y)}"
    if Y.shape == Y0.shape:  # the drawn case's originals, params and state fit this Y: check what comes back first
        try:
            X, _ = case.right_inverse(Y)
        except NotImplementedError as error:
            raise NotApplicable(f"right_inverse raises NotImplementedError: {str(error).strip()}") from error
        except Exception as error:
            raise Violation(raised("right_inverse(Y)", error), details) from error
        try:
            _check_originals(X, case.originals, check_shapes=True)
        except Violation as v:
            raise Violation(v.message, details) from None
    net, params, state = call("registering the chain on Y with pfunc.parametrize", spec.subject.registered, Y, case.seed)
    return spec.subject.case_of(net, params, state, case.seed), Y, details


def right_inverse_round_trips(spec: Spec, case: Case, data: Any) -> None:
    if not spec.subject.has_right_inverse:
        raise NotApplicable(f"no right_inverse ({', '.join(spec.subject.missing_right_inverse)})", structural=True)
    case, Y, details = _image(spec, case, data)
    tol = spec.tolerance_for(Y.dtype)
    try:
        X1, S1 = case.right_inverse(Y)
    except NotImplementedError as error:
        raise NotApplicable(f"right_inverse raises NotImplementedError: {str(error).strip()}") from error
    except Exception as error:
        raise Violation(raised("right_inverse(Y)", error), details) from error
    try:
        _check_originals(X1, case.originals, check_shapes=True)
    except Violation as v:
        raise Violation(v.message, details) from None
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
    params, state = call(
        "Parametrized.assign(params, state, {'weight': Y})", net.assign, params, state, {TENSOR_NAME: Y}, generator=case.generator(3)
    )
    values, _ = call("Parametrized.materialize after assign", net.materialize, params, state, training=False)
    if not (d := compare(values[TENSOR_NAME], Y, tol)).ok:
        raise Violation(
            f"through pfunc.parametrize, materialize(assign(Y)) != Y: {d}\n" f"materialized: {describe(values[TENSOR_NAME])}",
            details,
        )
