"""What every property shares: the check's :class:`Spec`, the outcomes a property can raise, and the
helpers that call the user's code and describe what went wrong.

A property is a function ``(spec, case, data) -> None`` run on one drawn :class:`~pfunc.testing.subject.Case`:
it returns (it holds on this example), raises :class:`Violation` (a readable sentence with the observed
discrepancy) or :class:`NotApplicable` (it says nothing about this example). Properties that are costly
(finite differences, ``torch.compile``, training steps, probes of the domain's edge) run on the first
``Spec.costly_examples`` examples of a search only, see :meth:`Spec.spend`.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Optional, Sequence

import hypothesis
import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor

from ... import __file__ as _pfunc_init
from ..constraints import Constraint
from ..report import CheckWarning, describe
from ..subject import Case, Subject
from ..tolerance import Tolerance, compare

__all__ = [
    "Spec",
    "Violation",
    "NotApplicable",
    "InputError",
    "BindError",
    "build_case",
    "cotangent",
    "tangent",
    "call",
    "call_with_grad",
    "user_frame",
]


class Violation(Exception):
    """A property does not hold: ``message`` says how, ``details`` adds inputs beyond the case."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.message = message
        self.details = details


class NotApplicable(Exception):
    """The property says nothing about this example (``reason`` says why); ``structural``: nor about any
    other, because of what was checked (no right_inverse, no constraint, stateless chain...), so a
    search for it alone is pointless."""

    def __init__(self, reason: str, structural: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.structural = structural


class InputError(Exception):
    """A strategy given to the check drew something unusable (a configuration error, not a violation)."""


class BindError(Exception):
    """Binding, ``init`` or warm-up of the chain failed on a drawn example (``example`` describes it)."""

    def __init__(self, message: str, example: str):
        super().__init__(message)
        self.message = message
        self.example = example


@dataclass
class Spec:
    """Everything a check needs besides the drawn data (and what the costly properties have spent)."""

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
    batched: Optional[bool] = None  # accepts leading batch dims: declared, or None (inferred from the strategy)
    non_differentiable: frozenset = frozenset()  # originals meant to get no gradient ("X", "original1", or an index)
    costly_examples: int = 2
    training_steps: int = 3
    spent: dict[str, int] = field(default_factory=dict)  # costly examples run per property, this search
    failed_costly: set = field(default_factory=set)  # costly properties that failed this search: always rerun
    warnings: list[CheckWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def checks(self, name: str) -> bool:
        """Whether property ``name`` is part of this check (so it will report what it finds)."""
        return self.selected is None or name in self.selected

    def tolerance_for(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerance or Tolerance.for_dtype(dtype)

    def new_search(self) -> None:
        """Reset the costly properties' budgets (each search gets ``costly_examples`` of its own)."""
        self.spent.clear()
        self.failed_costly.clear()

    def spend(self, name: str, limit: Optional[int] = None) -> None:
        """Let a costly property run on this example, or raise :class:`NotApplicable` once it has run on
        ``limit`` (default ``costly_examples``) examples. A property that failed keeps running, so
        Hypothesis's shrinking and final replay see the same outcome."""
        limit = self.costly_examples if limit is None else limit
        if name in self.failed_costly:
            return
        if self.spent.get(name, 0) >= limit:
            raise NotApplicable(f"costly: runs on the first {limit} example(s) only")
        self.spent[name] = self.spent.get(name, 0) + 1

    def warn(self, warning: CheckWarning) -> None:
        if all(w.key != warning.key for w in self.warnings):
            self.warnings.append(warning)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# ---------------------------------------------------------------------- calling the user's code
def _package_dir(module: Any) -> str:
    return os.path.dirname(os.path.abspath(module.__file__)) + os.sep


_KIT = (_package_dir(torch), _package_dir(hypothesis), os.path.dirname(os.path.abspath(_pfunc_init)) + os.sep, "<frozen")


def user_frame(error: BaseException) -> str:
    """``" (at file.py:12 in forward)"``: the innermost frame of the traceback outside torch, Hypothesis
    and pfunc (the user's code that raised), else the innermost frame; ``""`` without a traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    mine = [f for f in frames if not any(part in f.filename for part in _KIT)]
    last = (mine or frames)[-1]
    return f" (at {last.filename.rsplit(os.sep, 1)[-1]}:{last.lineno} in {last.name})"


def raised(what: str, error: BaseException) -> str:
    """``"<what> raised <Type>: <first line> (at file:line in fn)"``."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{what} raised {type(error).__name__}: {first}{user_frame(error)}"


def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with any exception turned into a :class:`Violation` naming ``what``."""
    try:
        return fn(*args, **kwargs)
    except (Violation, NotApplicable, InputError):
        raise
    except Exception as error:  # the user's code failed: that is the finding
        raise Violation(raised(what, error)) from error


def call_with_grad(spec: Spec, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call`` for code run on inputs that require grad: if it raises, and ``finite_output_and_gradients``
    is checked (it runs autograd on the same forward and reports the failure), defer to it."""
    try:
        return call(what, fn, *args, **kwargs)
    except Violation as v:
        if spec.checks("finite_output_and_gradients"):
            raise NotApplicable(f"autograd fails (reported by finite_output_and_gradients): {v.message}") from v
        raise


def forward(case: Case, *, training: bool = False, **kwargs: Any) -> tuple[Tensor, tuple[dict[str, Tensor], ...]]:
    """Forward for properties other than ``forward_runs``: a failure there is that property's to report."""
    try:
        Y, state = case.forward(training=training, **kwargs)
    except Exception as error:
        raise NotApplicable(f"forward fails (reported by forward_runs): {raised('forward', error)}") from error
    if not isinstance(Y, Tensor):
        raise NotApplicable("forward does not return a Tensor (reported by forward_runs)")
    return Y, state


def modes(case: Case) -> tuple[bool, ...]:
    return (False, True) if case.stateful else (False,)


def mode(training: bool) -> str:
    return "training" if training else "eval"


def same(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equal (NaN equal to NaN) on CPU; within tolerance on accelerators."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type == "cpu":
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return compare(a, b).ok  # accelerator kernels may reorder sums


def same_state(a: Sequence[dict[str, Tensor]], b: Sequence[dict[str, Tensor]]) -> Optional[str]:
    """``None`` if equal, else the first difference."""
    for i, (sa, sb) in enumerate(zip(a, b)):
        if sa.keys() != sb.keys():
            return f"state[{i}] keys {sorted(sa)} became {sorted(sb)}"
        for k in sa:
            if not isinstance(sb[k], Tensor) or not same(sa[k], sb[k]):
                return f"state[{i}].{k}: {describe(sa[k])} became {describe(sb[k])}"
    return None


def cotangent(Y: Tensor) -> Tensor:
    """The fixed cotangent ``G`` with ``G_k = cos(0.7 k + 0.3)`` over ``Y``'s entries."""
    k = torch.arange(Y.numel(), dtype=torch.float64, device=Y.device)
    return torch.cos(0.7 * k + 0.3).reshape(Y.shape).to(Y.dtype)


def tangent(X: Tensor, offset: int = 0) -> Tensor:
    """A fixed tangent ``V`` with ``V_k = sin(1.3 k + 0.5 + offset)`` over ``X``'s entries."""
    k = torch.arange(X.numel(), dtype=torch.float64, device=X.device)
    return torch.sin(1.3 * k + 0.5 + offset).reshape(X.shape).to(X.dtype)


def original_names(case: Case) -> tuple[str, ...]:
    """``("X",)`` for one original, ``("original0", "original1", ...)`` for several."""
    n = len(case.originals)
    return ("X",) if n == 1 else tuple(f"original{i}" for i in range(n))


def exempt(spec: Spec, index: int, name: str) -> bool:
    """Whether original ``index`` (called ``name``) was declared ``non_differentiable``."""
    return index in spec.non_differentiable or name in spec.non_differentiable


# ---------------------------------------------------------------------- drawing a case
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


def describe_originals(originals: tuple[Tensor, ...]) -> str:
    if len(originals) == 1:
        return f"X = {describe(originals[0])}"
    return "\n".join(f"original{i} = {describe(x)}" for i, x in enumerate(originals))


def build_case(spec: Spec, data: Any, originals: Optional[tuple[Tensor, ...]] = None) -> Case:
    """Draw (or take) originals and a seed, bind the chain, apply drawn ``states`` and ``warmup``."""
    batched = False
    if originals is None:
        drawn = data.draw(spec.inputs, label="inputs")
        batched = any(getattr(t, "_pfunc_batched", False) for t in (drawn if isinstance(drawn, (list, tuple)) else (drawn,)))
        originals = _as_originals(drawn)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    try:
        case = spec.subject.bind(originals, seed)
    except Exception as error:
        message = raised("binding and initialising the chain (for_tensor, init)", error)
        raise BindError(message, describe_originals(originals)) from error
    case = replace(case, batched=batched)
    if spec.states is not None:
        state = _as_state(data.draw(spec.states(originals), label="state"), len(case.chain))
        case = replace(case, state=state)
    for step in range(spec.warmup):
        try:
            _, state = case.forward(training=True)
        except Exception as error:
            raise BindError(raised(f"warm-up training call {step + 1}", error), case.describe()) from error
        case = replace(case, state=tuple({k: v.detach() for k, v in s.items()} for s in state))
    return case.recorded()


def draw_batch(spec: Spec, case: Case, data: Any) -> list[Case]:
    """``case`` and up to ``batch_size - 1`` more drawn cases of the same shapes (``case`` twice if none)."""
    batch = [case]
    for _ in range(spec.batch_size - 1):
        try:
            other = build_case(spec, data)
        except BindError:
            continue
        if stackable(case, other):
            batch.append(other)
    if len(batch) == 1:
        batch.append(case)  # no other drawn input had this shape: the batch still has to agree
    return batch


def stackable(a: Case, b: Case) -> bool:
    if len(a.originals) != len(b.originals) or len(a.state) != len(b.state):
        return False
    if any(x.shape != y.shape or x.dtype != y.dtype or x.device != y.device for x, y in zip(a.originals, b.originals)):
        return False
    for sa, sb in zip(a.state, b.state):
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or sa[k].dtype != sb[k].dtype for k in sa):
            return False
    return True


def describe_batch(batch: Sequence[Case]) -> str:
    return "\n".join(f"batch[{i}]: " + c.describe().replace("\n", "\n          ") for i, c in enumerate(batch))


def names_in(spec: Spec, names: Collection[str]) -> list[str]:
    return [n for n in names if spec.checks(n)]
