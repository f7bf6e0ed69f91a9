"""The thing under test: a parametrization (or a chain of them) bound to drawn originals.

Every parametrization pfunc accepts (plain callables, torch-style ``nn.Module``
parametrizations, stateful ones) is driven through :func:`pfunc.chain.as_step`,
so the checks see one pure interface: ``forward(originals, params, state,
training) -> (Y, new_state)`` and ``right_inverse(Y, ...) -> (originals, new_state)``.
A :class:`Case` is one drawn example: the originals, each step's own parameters
and state (from ``init`` or drawn), and the seed of the generator behind them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..chain import Chain, Step, as_step
from ..parametrize import Parametrized, parametrize
from ..tree import chain_prefix, original_key
from .report import describe

__all__ = ["Subject", "Case", "Holder", "TENSOR_NAME"]

TENSOR_NAME = "weight"
"""The name a checked parametrization is registered on, in the :class:`Holder` module."""


class Holder(nn.Module):
    """A module holding one tensor, ``weight``: the owner a parametrization is registered on."""

    def __init__(self, value: Optional[Tensor] = None):
        super().__init__()
        if value is not None:
            self.weight = nn.Parameter(value.detach().clone(), requires_grad=value.is_floating_point())


def _name_of(fn: Any) -> str:
    text = repr(fn)
    if text.startswith("<") or len(text) > 80:  # a default repr: a function's or class's name, else the type's
        return getattr(fn, "__name__", None) or type(fn).__name__
    return text


@dataclass(frozen=True)
class Case:
    """One drawn example: ``originals`` through the bound ``chain`` with its ``params`` and ``state``."""

    originals: tuple[Tensor, ...]
    chain: Chain
    params: tuple[dict[str, Tensor], ...]
    state: tuple[dict[str, Tensor], ...]
    seed: int
    as_drawn: Optional[tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]] = None
    batched: bool = False  # drawn by a strategy that declares leading batch dims (``batch_shape=``)
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # shared by fresh copies

    def fresh(self) -> "Case":
        """A copy with its own clones of the drawn originals, params and state: what each property
        runs on, so a parametrization that mutates its inputs cannot corrupt the next property."""
        if self.as_drawn is None:
            return self
        originals, state = self.as_drawn
        return replace(
            self,
            originals=tuple(x.clone() for x in originals),
            params=tuple({k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in p.items()} for p in self.params),
            state=tuple({k: v.clone() for k, v in s.items()} for s in state),
        )

    def recorded(self) -> "Case":
        """This case with copies of its originals and state kept for :meth:`describe`, so the
        report shows the input as drawn even if a buggy parametrization mutates it."""
        copies = (
            tuple(x.detach().clone() for x in self.originals),
            tuple({k: v.detach().clone() for k, v in s.items()} for s in self.state),
        )
        return replace(self, as_drawn=copies)

    @property
    def stateful(self) -> bool:
        return any(self.state)

    @property
    def dtype(self) -> torch.dtype:
        return self.originals[0].dtype

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded from this case (``offset`` separates uses)."""
        return torch.Generator().manual_seed((self.seed + offset) % 2**63)

    def forward(
        self,
        originals: Optional[Sequence[Tensor]] = None,
        state: Optional[Sequence[dict[str, Tensor]]] = None,
        *,
        training: bool = False,
        params: Optional[Sequence[dict[str, Tensor]]] = None,
    ) -> tuple[Tensor, tuple[dict[str, Tensor], ...]]:
        """``(Y, new_state)`` of the chain (defaults: this case's originals, state and params)."""
        xs = list(self.originals if originals is None else originals)
        ps = list(self.params if params is None else params)
        ss = list(self.state if state is None else state)
        Y, new_state = self.chain.forward(xs, ps, ss, training)
        return Y, tuple(dict(s) for s in new_state)

    def right_inverse(
        self, Y: Tensor, state: Optional[Sequence[dict[str, Tensor]]] = None, offset: int = 1
    ) -> tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]:
        """``(originals, new_state)`` for ``Y``, as a tuple whatever the chain's ``right_inverse`` returned."""
        ss = list(self.state if state is None else state)
        X, new_state = self.chain.right_inverse(Y, list(self.params), ss, self.generator(offset))
        if isinstance(X, Tensor):
            originals: tuple[Any, ...] = (X,)
        elif isinstance(X, Sequence) and not isinstance(X, (str, bytes)):
            originals = tuple(X)
        else:
            originals = (X,)
        return originals, tuple(dict(s) for s in new_state)

    def user_state(self, state: Optional[Sequence[dict[str, Tensor]]] = None) -> Any:
        """The state as a user sees it: one dict for a single parametrization, a list for a chain."""
        state = self.state if state is None else state
        return dict(state[0]) if len(state) == 1 else [dict(s) for s in state]

    def describe(self) -> str:
        """The originals (and state, and generator seed, when there is state), one per line, as drawn."""
        originals, state = self.as_drawn or (self.originals, self.state)
        if len(originals) == 1:
            lines = [f"X = {describe(originals[0])}"]
        else:
            lines = [f"original{i} = {describe(x)}" for i, x in enumerate(originals)]
        if self.stateful:
            for i, s in enumerate(state):
                prefix = "state" if len(state) == 1 else f"state[{i}]"
                lines += [f"{prefix}.{k} = {describe(v)}" for k, v in s.items()]
            lines.append(f"generator seed = {self.seed}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Subject:
    """A parametrization or chain of them, as given to the checks (``unsafe``: may change shape/dtype)."""

    fns: tuple[Any, ...]
    unsafe: bool
    name: str

    @classmethod
    def of(cls, parametrization: Any, *, unsafe: bool = False, name: Optional[str] = None) -> "Subject":
        """Wrap one parametrization, or a list/tuple of them (a chain, first applied first)."""
        fns = tuple(parametrization) if isinstance(parametrization, (list, tuple)) else (parametrization,)
        if not fns:
            raise ValueError("check_parametrization: the chain of parametrizations is empty")
        for fn in fns:
            as_step(fn)  # raises TypeError naming what is not a parametrization
        label = name or " -> ".join(_name_of(fn) for fn in fns)
        return cls(fns, bool(unsafe), label)

    @property
    def has_right_inverse(self) -> bool:
        return all(as_step(fn).has_right_inverse for fn in self.fns)

    @property
    def missing_right_inverse(self) -> list[str]:
        return [_name_of(fn) for fn in self.fns if not as_step(fn).has_right_inverse]

    def bind(self, originals: tuple[Tensor, ...], seed: int) -> Case:
        """Bind each step to the tensor it will act on (``for_tensor``) and initialise its params and
        state from that tensor, as registration does: the first step sees the (first) original, each
        later step the eval-mode output of the steps before it."""
        owner = Holder()
        generator = torch.Generator().manual_seed(seed % 2**63)
        steps: list[Step] = []
        params: list[dict[str, Tensor]] = []
        states: list[dict[str, Tensor]] = []
        inputs: tuple[Tensor, ...] = originals
        current = originals[0]
        for i, fn in enumerate(self.fns):
            step = as_step(fn)
            hook = getattr(step.fn, "for_tensor", None)
            if callable(hook):
                step = as_step(hook(owner, TENSOR_NAME, current))
            p, s = step.init(current, generator)
            steps.append(step)
            params.append(dict(p))
            states.append({k: v.detach() for k, v in s.items()})
            if i + 1 < len(self.fns):
                with torch.no_grad():
                    current, _ = step.forward(inputs, p, s, False)
                inputs = (current,)
        chain = Chain(
            tuple(steps),
            None if len(originals) == 1 else len(originals),
            is_buffer=False,
            unsafe=(self.unsafe,) * len(steps),
        )
        return Case(originals, chain, tuple(params), tuple(states), seed)

    def registered(self, value: Tensor, seed: int) -> tuple[Parametrized, dict[str, Tensor], dict[str, Tensor]]:
        """``(net, params, state)``: the chain registered with :func:`pfunc.parametrize` on a
        :class:`Holder` whose ``weight`` is ``value``, initialised from a generator seeded ``seed``."""
        net = parametrize(Holder(value), {TENSOR_NAME: list(self.fns)}, unsafe=self.unsafe)
        params, state = net.init(generator=torch.Generator().manual_seed(seed % 2**63))
        return net, params, state

    def case_of(self, net: Parametrized, params: dict[str, Tensor], state: dict[str, Tensor], seed: int) -> Case:
        """The :class:`Case` held by a registered ``net`` (its originals, step params and state)."""
        chain = net.chains[TENSOR_NAME]
        originals = tuple(params[original_key(TENSOR_NAME, o)] for o in chain.original_names)
        step_params = tuple(_step_tensors(params, i) for i in range(len(chain)))
        step_state = tuple(_step_tensors(state, i) for i in range(len(chain)))
        return Case(tuple(o.detach() for o in originals), chain, step_params, step_state, seed)


def _step_tensors(tree: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    prefix = f"{chain_prefix(TENSOR_NAME)}.{index}."
    return {k[len(prefix) :]: v for k, v in tree.items() if k.startswith(prefix)}

