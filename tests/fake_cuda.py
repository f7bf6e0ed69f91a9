"""A CUDA device simulated on a CPU-only torch, for placement dry runs (no GPU needed).

``with fake_cuda():`` runs a block under ``torch._subclasses.fake_tensor.FakeTensorMode``: tensors
may be created on ``cuda``, every op propagates shapes, dtypes and devices without computing,
and an op that mixes a CUDA tensor with a CPU one (other than a 0-dim scalar, as on a real GPU)
raises ``FakeTensorDeviceMismatchError`` naming the op. Real tensors made outside the block are
refused (``allow_non_fake_inputs=False``): a dry run builds everything inside it, as a real run
builds everything on the machine.

What a CPU-only torch lacks is simulated, and checked where a real GPU would check it:

* ``torch.Generator(device="cuda")``: a CPU generator that reports ``cuda`` (its draws advance
  real state, so a checkpoint of its state changes as a real one would). Every draw with an
  explicit generator is checked as CUDA checks it: the generator's device must be the draw's
  ("Expected a 'cuda' device type for generator but found 'cpu'").
* A draw read on the host (``int(torch.randint(..., generator=g))``, a seed) gives the value
  drawn for real from the same generator; any other data-dependent read stays an error.
* ``torch.autocast("cuda", dtype=torch.bfloat16)`` (which disables itself without CUDA), and the
  CUDA RNG states ``torch.random.fork_rng`` saves and restores.

What it cannot show: numbers, speed, memory, kernels, NCCL, ``torch.compile``'s CUDA code.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional
from unittest import mock

import optree
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

__all__ = ["CUDA", "fake_cuda", "assert_on", "SimulatedGenerator"]

CUDA = torch.device("cuda", 0)
_RealGenerator = torch.Generator

# draws whose values the block may read on the host: factory functions (their inputs are sizes)
_FACTORY_DRAWS = {torch.randint, torch.randn, torch.rand, torch.randperm, torch.normal}
# reads of a tensor's data on the host
_HOST_READS = {torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.__bool__,
               torch.Tensor.item, torch.Tensor.tolist}


class _AnyGenerator(type(_RealGenerator)):
    """``isinstance(g, torch.Generator)`` stays true for every generator while the patch is in place."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _RealGenerator)


class SimulatedGenerator(_RealGenerator, metaclass=_AnyGenerator):
    """``torch.Generator(device=...)`` inside :func:`fake_cuda`: a CPU generator that reports the
    device asked for (``cuda`` included)."""

    def __new__(cls, device: Any = "cpu"):
        self = super().__new__(cls)
        d = torch.device(device)
        self._simulated_device = torch.device("cuda", d.index or 0) if d.type == "cuda" else d
        return self

    def __init__(self, device: Any = "cpu") -> None:
        pass

    @property
    def device(self) -> torch.device:
        return self._simulated_device


def _draw_device(func: Any, args: tuple, kwargs: dict) -> Optional[torch.device]:
    """Where a random op's output lives: its ``device=`` (factories) or its first tensor input."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    if "device" in kwargs and kwargs["device"] is not None:
        d = torch.device(kwargs["device"])
        return torch.device("cuda", d.index or 0) if d.type == "cuda" else d
    return torch.get_default_device()


class _Placement(TorchFunctionMode):
    """Checks each draw's generator against the draw's device; keeps the real values of factory draws."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn: "weakref.WeakKeyDictionary[torch.Tensor, torch.Tensor]" = weakref.WeakKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = kwargs.get("generator")
        if isinstance(g, _RealGenerator):
            where = _draw_device(func, args, kwargs)
            if where is not None and where.type != g.device.type:
                raise RuntimeError(
                    f"{getattr(func, '__name__', func)}: Expected a '{where.type}' device type for generator but found "
                    f"'{g.device.type}' (fake_cuda: a real GPU raises this)"
                )
            out = func(*args, **kwargs)
            if func in _FACTORY_DRAWS and isinstance(out, FakeTensor) and not any(isinstance(a, torch.Tensor) for a in args):
                with unset_fake_temporarily():  # the same draw for real, on the CPU underneath: advances g's state
                    self.drawn[out] = func(*args, **{**kwargs, "device": "cpu"})
            return out
        if func in _HOST_READS and args and args[0] in self.drawn:
            return func(self.drawn[args[0]], *args[1:], **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """The block runs on a simulated ``cuda:0`` (see the module's docstring); yields the fake mode."""
    rng_states: dict[int, torch.Tensor] = {}

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        index = torch.device(device).index if not isinstance(device, int) else device
        return rng_states.setdefault(index or 0, torch.zeros(16, dtype=torch.uint8)).clone()

    def set_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        rng_states[index or 0] = state.clone()

    with contextlib.ExitStack() as stack:
        for target, value in (
            ("torch.Generator", SimulatedGenerator),
            ("torch.cuda.get_rng_state", get_rng_state),
            ("torch.cuda.set_rng_state", set_rng_state),
            ("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
            ("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        ):
            stack.enter_context(mock.patch(target, value))
        mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
        stack.enter_context(_Placement())
        yield mode


def assert_on(tree: Any, device: torch.device = CUDA, dtype: Optional[torch.dtype] = None, what: str = "tree") -> int:
    """Assert every tensor leaf of ``tree`` is a fake tensor on ``device`` (and of ``dtype``); returns how many."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False, namespace="torch")
    n = 0
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        name = f"{what}{''.join(f'[{p!r}]' for p in path)}"
        assert isinstance(leaf, FakeTensor), f"{name} is a real tensor: it was not made in the dry run"
        assert leaf.device == device, f"{name} is on {leaf.device}, expected {device}"
        if dtype is not None:
            assert leaf.dtype == dtype, f"{name} is {leaf.dtype}, expected {dtype}"
        n += 1
    assert n, f"{what} holds no tensor"
    return n
