"""The invariants a parametrization must keep, as a package of one family per module.

==========================  ==================================================================
:mod:`.values`              forward runs, shape and dtype, determinism, inputs left alone,
                            the constraint, a reference
:mod:`.gradients`           finite, reaching every original, against finite differences,
                            ``torch.func`` against autograd, forward mode against reverse mode
:mod:`.round_trips`         ``right_inverse`` and ``forward`` undo each other
:mod:`.transforms`          ``vmap``, batches, non-contiguous inputs, ``torch.compile``
:mod:`.state`               the state's lifecycle: init, training and eval calls, convergence
:mod:`.training`            optimizer steps through :func:`pfunc.parametrize`, ``state_dict``
:mod:`.domain`              zero, tiny and large inputs (warnings, never failures)
==========================  ==================================================================

:data:`pfunc.testing.PROPERTIES` maps each name to its function, in the order a check runs them (on each example
the first that fails is the one reported for it). Each module's docstring says what its properties
guarantee; :mod:`.base` holds what they share.
"""

from __future__ import annotations

from typing import Any, Callable

from ..subject import Case
from .base import BindError, InputError, NotApplicable, Spec, Violation, build_case, cotangent, tangent
from .domain import edge_of_domain
from .gradients import (
    finite_output_and_gradients,
    forward_mode_matches_reverse_mode,
    func_grad_matches_autograd,
    gradient_matches_finite_differences,
    gradient_reaches_every_original,
)
from .round_trips import right_inverse_round_trips
from .state import (
    eval_keeps_state,
    eval_writes_no_buffers,
    init_state_is_reproducible,
    new_state_holds_no_graph,
    state_stays_finite,
    training_converges,
)
from .training import constraint_holds_after_training_steps
from .transforms import (
    batched_forward_matches_per_item,
    compiled_matches_eager,
    non_contiguous_inputs_give_the_same_output,
    vmap_matches_loop,
)
from .values import (
    constraint_holds,
    deterministic,
    does_not_modify_inputs,
    forward_runs,
    keeps_shape_and_dtype,
    matches_reference,
)

__all__ = ["Spec", "Violation", "NotApplicable", "InputError", "BindError", "PROPERTIES", "build_case", "cotangent", "tangent"]

PROPERTIES: dict[str, Callable[[Spec, Case, Any], None]] = {
    "forward_runs": forward_runs,
    "keeps_shape_and_dtype": keeps_shape_and_dtype,
    "deterministic": deterministic,
    "does_not_modify_inputs": does_not_modify_inputs,
    "constraint_holds": constraint_holds,
    "finite_output_and_gradients": finite_output_and_gradients,
    "gradient_reaches_every_original": gradient_reaches_every_original,
    "right_inverse_round_trips": right_inverse_round_trips,
    "func_grad_matches_autograd": func_grad_matches_autograd,
    "gradient_matches_finite_differences": gradient_matches_finite_differences,
    "forward_mode_matches_reverse_mode": forward_mode_matches_reverse_mode,
    "vmap_matches_loop": vmap_matches_loop,
    "batched_forward_matches_per_item": batched_forward_matches_per_item,
    "non_contiguous_inputs_give_the_same_output": non_contiguous_inputs_give_the_same_output,
    "matches_reference": matches_reference,
    "eval_keeps_state": eval_keeps_state,
    "eval_writes_no_buffers": eval_writes_no_buffers,
    "new_state_holds_no_graph": new_state_holds_no_graph,
    "init_state_is_reproducible": init_state_is_reproducible,
    "state_stays_finite": state_stays_finite,
    "training_converges": training_converges,
    "constraint_holds_after_training_steps": constraint_holds_after_training_steps,
    "compiled_matches_eager": compiled_matches_eager,
    "edge_of_domain": edge_of_domain,
}
"""Every property, by name, in the order they are checked."""

WARNS_ONLY = frozenset({"edge_of_domain"})
"""Properties that report in ``report.warnings`` and never fail a check."""
