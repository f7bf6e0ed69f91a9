"""Training: what a few optimizer steps through :func:`pfunc.parametrize` leave behind.

``constraint_holds_after_training_steps``
    ``training_steps`` (3) ``AdamW`` steps (learning rate 0.1, weight decay 0.1) on the originals of a
    :class:`pfunc.Parametrized` holding the drawn example, minimising ``sum(G * Y)`` (then, if there is a
    state, ``max(warmup, convergence_steps)`` training calls: a power iteration's constraint holds once its
    state has converged on the new weights), keep the output on every constraint (so a parametrization right only where it was initialised, like a householder
    diagonal that must stay ``+-1``, fails), and a ``state_dict`` round trip (``torch.save``/``load``,
    :func:`pfunc.split_state_dict`) afterwards gives the same values. Costly: the first
    ``costly_examples`` examples.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ...interop import split_state_dict
from ...tree import original_key, step_key
from ..report import describe
from ..subject import TENSOR_NAME, Case
from ..tolerance import compare
from .base import NotApplicable, Spec, Violation, call, call_with_grad, cotangent, forward

__all__ = ["constraint_holds_after_training_steps"]


def constraint_holds_after_training_steps(spec: Spec, case: Case, data: Any) -> None:
    if not all(x.is_floating_point() for x in case.originals):
        raise NotApplicable("an original is not floating point")
    Y0, _ = forward(case)
    tol0 = spec.tolerance_for(Y0.dtype)
    if any(c.violation(Y0, tol0) is not None for c in spec.constraints) and spec.checks("constraint_holds"):
        raise NotApplicable("the constraint does not hold before the steps either (reported by constraint_holds)")
    try:
        net, params, state = spec.subject.registered(Y0.detach(), case.seed)
    except Exception as error:
        raise NotApplicable(f"pfunc.parametrize fails on forward(X) (reported by right_inverse_round_trips): {error}") from error
    chain = net.chains[TENSOR_NAME]
    keys = [original_key(TENSOR_NAME, o) for o in chain.original_names]
    if len(keys) != len(case.originals) or any(params[k].shape != x.shape for k, x in zip(keys, case.originals)):
        raise NotApplicable("registration stores originals of other shapes than drawn (reported by right_inverse_round_trips)")
    spec.spend("constraint_holds_after_training_steps")
    params = dict(params)
    for k, x in zip(keys, case.originals):
        params[k] = x.detach().clone().requires_grad_()
    for i, s in enumerate(case.state):
        for k, v in s.items():
            state[step_key(TENSOR_NAME, i, k)] = v
    leaves = [params[k] for k in keys]
    optimizer = torch.optim.AdamW(leaves, lr=0.1, weight_decay=0.1)
    for step in range(1, spec.training_steps + 1):
        values, state = call_with_grad(
            spec, f"materialize (training) at optimizer step {step}", net.materialize, params, state, training=True
        )
        state = {k: v.detach() for k, v in state.items()}
        Y = values[TENSOR_NAME]
        if not Y.requires_grad:
            raise NotApplicable("the output does not require grad (reported by gradient_reaches_every_original)")
        optimizer.zero_grad()
        call_with_grad(spec, f"backward at optimizer step {step}", (Y * cotangent(Y.detach())).sum().backward)
        optimizer.step()
    settle = max(spec.warmup, spec.convergence_steps) if state else 0
    with torch.no_grad():  # a state that is right once converged (power iteration) settles on the new originals first
        for step in range(1, settle + 1):
            _, state = call(f"training call {step} after the optimizer steps", net.materialize, params, state, training=True)
    values, _ = call("materialize (eval) after the optimizer steps", net.materialize, params, state, training=False)
    Y = values[TENSOR_NAME].detach()
    after = f"after {spec.training_steps} AdamW steps (lr 0.1, weight decay 0.1) on sum(G * Y)"
    originals = "\n".join(f"{k.rsplit('.', 1)[-1]} = {describe(params[k])}" for k in keys)
    tol = spec.tolerance_for(Y.dtype)
    for c in spec.constraints:
        problem = call(f"constraint {c.name}", c.violation, Y, tol)
        if problem is not None:
            raise Violation(f"{after}, forward (eval) is not {c.name}: {problem}\nY = {describe(Y)}", f"originals then:\n{originals}")
    buffer = io.BytesIO()
    torch.save(net.state_dict(params, state), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    params2, state2 = call("pfunc.split_state_dict of the saved state_dict", split_state_dict, net, loaded)
    values2, _ = call("materialize (eval) after the state_dict round trip", net.materialize, params2, state2, training=False)
    if not (d := compare(values2[TENSOR_NAME], Y, tol)).ok:
        raise Violation(f"{after}, a state_dict round trip changes the values: {d}", f"originals then:\n{originals}")
