"""The parametrization protocol, and chains of parametrizations on one tensor.

A parametrization is one of three things, all used unchanged:

* a **plain callable** or an object with ``forward(X) -> Y`` and, optionally,
  ``right_inverse(Y) -> X | Sequence[X]``;
* a **torch-style** ``nn.Module`` parametrization, exactly as written for
  ``torch.nn.utils.parametrize`` (its own parameters go into ``params``, its
  buffers into ``state``, and it is called through ``torch.func.functional_call``
  so the module itself is never mutated);
* a **stateful** parametrization, which says so by defining
  ``init_state(X, *, generator) -> dict[str, Tensor]`` and
  ``forward(X, state, *, training) -> (Y, new_state)``; optionally
  ``right_inverse(Y, state, *, generator) -> (X, new_state)``.

Any of them may define ``for_tensor(owner, name, value) -> parametrization`` to
resolve defaults that depend on the layer it is put on (e.g. spectral norm's
``dim`` for transposed convolutions).

A torch-style module runs privately (:mod:`pfunc.execution`), in the mode the call's
``training`` flag gives it; where pfunc calls a plain or torch-style parametrization with an
explicit generator (``right_inverse`` at ``init``/``register``/``assign``), the global RNG it may
draw from is seeded from that generator for the call, so initialisation is reproducible.

A :class:`Chain` is a tuple of :class:`Step`: forward runs first to last,
``right_inverse`` last to first, exactly as ``ParametrizationList``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .execution import ShadowPool

__all__ = ["Step", "Chain", "as_step", "Originals", "StepTensors"]

Originals = tuple  # tuple[Tensor, ...]: ("original",) or ("original0", "original1", ...)
StepTensors = dict  # dict[str, Tensor]: a step's own parameters or state, by local name


def _name_of(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


@contextlib.contextmanager
def seeded_global_rng(generator: Optional[torch.Generator], like: Optional[Tensor] = None) -> Iterator[None]:
    """Within the block, the global RNG (CPU, and ``like``'s CUDA device) is seeded from one draw of
    ``generator`` and restored afterwards; ``None``: the global RNG as it is."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [like.device.index or 0] if like is not None and like.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Step:
    """One parametrization in a chain, wrapped behind a uniform pure interface.

    ``kind`` is ``"plain"``, ``"module"`` (torch-style ``nn.Module``, run on private shadows)
    or ``"stateful"``.
    """

    fn: Any
    kind: str
    pool: Optional[ShadowPool] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "module" and self.pool is None:
            object.__setattr__(self, "pool", ShadowPool(self.fn))

    def __reduce__(self):
        return (Step, (self.fn, self.kind))

    @property
    def name(self) -> str:
        return _name_of(self.fn)

    @property
    def has_right_inverse(self) -> bool:
        return callable(getattr(self.fn, "right_inverse", None))

    # -- creation ---------------------------------------------------------------------
    def init(self, X: Tensor, generator: Optional[torch.Generator]) -> tuple[StepTensors, StepTensors]:
        """Fresh ``(params, state)`` of this step for input ``X`` (its own tensors only)."""
        if self.kind == "module":
            params = {k: _fresh(v) for k, v in self.fn.named_parameters()}
            state = {k: v.detach().clone() for k, v in self.fn.named_buffers()}
            return params, state
        if self.kind == "stateful":
            with torch.no_grad():
                state = self.fn.init_state(X, generator=generator)
            return {}, dict(state)
        return {}, {}

    # -- the two directions -----------------------------------------------------------
    def forward(
        self, inputs: Sequence[Tensor], params: StepTensors, state: StepTensors, training: bool
    ) -> tuple[Tensor, StepTensors]:
        """``Y, new_state``: the step applied to ``inputs`` (several only for a chain's first step)."""
        if self.kind == "stateful":
            if len(inputs) != 1:
                raise TypeError(f"stateful parametrization {self.name} takes one tensor, got {len(inputs)}")
            return self.fn.forward(inputs[0], state, training=training)
        if self.kind == "module":
            # On a private shadow in mode `training`; the buffers it changes (in place or by
            # assignment) are the new state in training, and dropped in eval.
            y, changed = self.pool.run({**params, **state}, tuple(inputs), training=training, capture=training)
            return y, ({**state, **changed} if changed else state)
        fwd = getattr(self.fn, "forward", None)
        return (fwd if callable(fwd) else self.fn)(*inputs), state

    def right_inverse(
        self, Y: Tensor, params: StepTensors, state: StepTensors, generator: Optional[torch.Generator]
    ) -> tuple[Union[Tensor, Sequence[Tensor]], StepTensors]:
        """``X, new_state`` with ``forward(X) == Y`` where the parametrization promises it."""
        inv = getattr(self.fn, "right_inverse", None)
        if not callable(inv):
            raise RuntimeError(f"parametrization {self.name} does not implement right_inverse.")
        if self.kind == "stateful":
            X, new_state = inv(Y, state, generator=generator)
            return X, dict(new_state)
        with seeded_global_rng(generator, Y):
            if self.kind == "module":
                X, changed = self.pool.run({**params, **state}, (Y,), method="right_inverse")
                return X, ({**state, **changed} if changed else state)
            return inv(Y), state


def _fresh(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


def as_step(fn: Any) -> Step:
    """Wrap any supported parametrization (see the module docstring) as a :class:`Step`."""
    if isinstance(fn, Step):
        return fn
    if callable(getattr(fn, "init_state", None)):
        return Step(fn, "stateful")
    if isinstance(fn, nn.Module):
        return Step(fn, "module")
    if callable(fn) or callable(getattr(fn, "forward", None)):
        return Step(fn, "plain")
    raise TypeError(f"a parametrization must be callable or define forward(X); got {type(fn).__name__}")


@dataclass(frozen=True)
class Chain:
    """The parametrizations of one tensor, applied first to last (``ParametrizationList``).

    ``n_originals`` is ``None`` when ``right_inverse`` gave one tensor (stored as
    ``original``), else the number of tensors (stored as ``original0, original1, ...``).
    ``is_buffer`` says whether the originals live in ``state`` (a parametrized buffer)
    rather than ``params``. ``unsafe`` holds each step's registration flag.
    """

    steps: tuple[Step, ...]
    n_originals: Optional[int]
    is_buffer: bool
    unsafe: tuple[bool, ...]

    @property
    def original_names(self) -> tuple[str, ...]:
        if self.n_originals is None:
            return ("original",)
        return tuple(f"original{i}" for i in range(self.n_originals))

    @property
    def is_tensor(self) -> bool:
        """True when the chain has a single ``original`` (torch's ``ParametrizationList.is_tensor``)."""
        return self.n_originals is None

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Any:
        return self.steps[i].fn

    def forward(
        self,
        originals: Sequence[Tensor],
        params: Sequence[StepTensors],
        state: Sequence[StepTensors],
        training: bool,
    ) -> tuple[Tensor, list[StepTensors]]:
        """The parametrized value and each step's new state."""
        new_state = list(state)
        x: Any = tuple(originals)
        for i, step in enumerate(self.steps):
            x, new_state[i] = step.forward(x if i == 0 else (x,), params[i], state[i], training)
        return x, new_state

    def right_inverse(
        self,
        value: Tensor,
        params: Sequence[StepTensors],
        state: Sequence[StepTensors],
        generator: Optional[torch.Generator],
    ) -> tuple[Any, list[StepTensors]]:
        """Originals for ``value`` (last step first) and each step's new state."""
        new_state = list(state)
        x: Any = value
        for i in reversed(range(len(self.steps))):
            x, new_state[i] = self.steps[i].right_inverse(x, params[i], state[i], generator)
        return x, new_state
