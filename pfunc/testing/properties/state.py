"""State: its lifecycle from ``init`` through training and eval calls.

``eval_keeps_state``
    an eval-mode call returns the state unchanged.
``eval_writes_no_buffers``
    a torch-style ``nn.Module`` parametrization writes none of its buffers in eval mode, in place or by
    assignment. pfunc's own runner drops such writes, so they are observed on a copy of the module run as
    ``torch.nn.utils.parametrize`` runs it, where they are real.
``new_state_holds_no_graph``
    the new state of a training (and an eval) call on originals that require grad neither requires grad
    nor carries a graph: one that does makes the next step's ``backward()`` fail or keeps every step's
    graph alive.
``init_state_is_reproducible``
    binding and ``init`` with the same generator seed give the same state, and leave the global RNG as
    they found it.
``state_stays_finite``
    repeated training-mode calls keep the state finite with the same keys, shapes and dtypes.
``training_converges``
    repeated training-mode calls settle (the last two outputs agree) and, if given, reach ``converges_to``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..report import describe
from ..subject import Case
from ..tolerance import compare
from .base import NotApplicable, Spec, Violation, call, forward, mode, same, same_state

__all__ = [
    "eval_keeps_state",
    "eval_writes_no_buffers",
    "new_state_holds_no_graph",
    "init_state_is_reproducible",
    "state_stays_finite",
    "training_converges",
]


def _require_state(case: Case) -> None:
    if not case.stateful:
        plain = all(step.kind == "plain" for step in case.chain.steps)
        raise NotApplicable("stateless (no state tensors for this input)", structural=plain)


def eval_keeps_state(spec: Spec, case: Case, data: Any) -> None:
    _require_state(case)
    _, S = forward(case, training=False)
    if (diff := same_state(case.state, S)) is not None:
        raise Violation(f"an eval-mode call changed the state: {diff}")


def eval_writes_no_buffers(spec: Spec, case: Case, data: Any) -> None:
    modules = [(i, step) for i, step in enumerate(case.chain.steps) if step.kind == "module" and case.state[i]]
    if not modules:
        raise NotApplicable(
            "no torch-style nn.Module parametrization with buffers",
            structural=all(step.kind != "module" for step in case.chain.steps),
        )
    inputs: tuple[Tensor, ...] = case.originals
    for i, step in enumerate(case.chain.steps):
        if any(i == j for j, _ in modules):
            twin = copy.deepcopy(step.fn).eval()
            with torch.no_grad():
                for k, v in {**case.params[i], **case.state[i]}.items():
                    target = twin.get_parameter(k) if k in case.params[i] else twin.get_buffer(k)
                    target.copy_(v)
            before = {k: (b, b._version, b.detach().clone()) for k, b in twin.named_buffers()}
            with torch.no_grad():
                call(f"the torch-style parametrization {step.name} in eval mode", twin, *inputs)
            for k, (b, version, value) in before.items():
                now = twin.get_buffer(k)
                if now is not b or b._version != version or not same(b, value):
                    how = "reassigned" if now is not b else "written in place"
                    raise Violation(
                        f"{step.name} (step {i}) changed its buffer {k} in eval mode ({how}): under "
                        f"torch.nn.utils.parametrize an evaluation would move it (pfunc drops the write)\n"
                        f"before: {describe(value)}\nafter:  {describe(now)}"
                    )
        if i + 1 < len(case.chain.steps):
            with torch.no_grad():
                Y, _ = step.forward(inputs, case.params[i], case.state[i], False)
            inputs = (Y,)


def new_state_holds_no_graph(spec: Spec, case: Case, data: Any) -> None:
    _require_state(case)
    xs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in case.originals)
    for training in (True, False):
        _, S = forward(case, training=training, originals=xs)
        for i, s in enumerate(S):
            for k, v in s.items():
                if isinstance(v, Tensor) and (v.requires_grad or v.grad_fn is not None):
                    raise Violation(
                        f"the new state[{i}].{k} of a {mode(training)} call on originals that require grad "
                        f"carries a graph (grad_fn={type(v.grad_fn).__name__ if v.grad_fn else None}): compute the "
                        "update under torch.no_grad() or detach it, or the next step's backward() fails"
                    )


def init_state_is_reproducible(spec: Spec, case: Case, data: Any) -> None:
    _require_state(case)
    rng = torch.get_rng_state()
    first = call("binding and init", spec.subject.bind, case.originals, case.seed)
    moved = not torch.equal(rng, torch.get_rng_state())
    second = call("binding and init again", spec.subject.bind, case.originals, case.seed)
    torch.set_rng_state(rng)
    if (diff := same_state(first.state, second.state)) is not None:
        raise Violation(f"two inits with the same generator seed give different states: {diff}")
    if moved:
        raise Violation("init drew from the global RNG (torch.randn without generator=?): use the generator it is given")


def _trajectory(spec: Spec, case: Case) -> list[tuple[int, Tensor, tuple[dict[str, Tensor], ...]]]:
    """``(step, Y, new_state)`` of ``convergence_steps`` training calls from the drawn state
    (computed once per example: both state properties read it)."""
    if "trajectory" not in case.memo:
        state, steps = case.state, []
        for step in range(1, spec.convergence_steps + 1):
            Y, state = call(f"training call {step}", case.forward, state=state, training=True)
            state = tuple({k: v.detach() for k, v in s.items()} for s in state)
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
        raise NotApplicable("convergence_steps < 2", structural=True)
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


