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

CUDA's device guard. On torch's CPU-only wheel a fake mode can make CUDA tensors with factory
functions and run most ops on them, but whatever asks for CUDA's device guard fails there:
``.to("cuda")``, Python indexing, and recording autograd (the last one aborts the process).
``FakeTensorMode`` installs a no-op guard on CUDA builds without a GPU only.
:func:`install_cuda_device_guard` does the same on a CPU-only wheel, for a process of its own
(tests/fake_cuda_worker.py): a Python device guard of type CUDA put in c10's guard registry. That
lets ``.to``, indexing and autograd *recording* run; autograd's backward still needs a real
accelerator, so gradient dry runs need a torch built with CUDA (:data:`GRADIENTS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Iterator, Optional
from unittest import mock

import optree
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

__all__ = ["CUDA", "GRADIENTS", "REAL", "fake_cuda", "assert_on", "SimulatedGenerator", "install_cuda_device_guard", "run_worker"]

CUDA = torch.device("cuda", 0)
_RealGenerator = torch.Generator
#: ``PFUNC_REAL_CUDA=1``: the same dry runs on the real GPU (no fake mode, nothing simulated), computing.
REAL = os.environ.get("PFUNC_REAL_CUDA") == "1"
#: Whether a fake mode can take gradients of CUDA tensors here (torch built with CUDA, GPU or not).
GRADIENTS = REAL or torch.backends.cuda.is_built()
_GUARDS: list = []  # the installed guard objects, kept alive for the process

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


def _deepcopy_fake(t: FakeTensor, memo: dict) -> torch.Tensor:
    """``copy.deepcopy`` of a fake tensor in the same fake mode (torch's makes a new mode, which the
    next op refuses to mix: a ``copy.deepcopy(module)`` in the dry run would stop there)."""
    if id(t) in memo:
        return memo[id(t)]
    with torch.no_grad():
        out = t.detach().clone()
    out = torch.nn.Parameter(out, t.requires_grad) if isinstance(t, torch.nn.Parameter) else out.requires_grad_(t.requires_grad)
    memo[id(t)] = out
    return out


class _Placement(TorchFunctionMode):
    """Checks each draw's generator against the draw's device; keeps the real values of factory draws."""

    def __init__(self) -> None:
        super().__init__()
        # id(fake draw) -> (a weak reference to it, its real values); by id: a tensor's == is elementwise
        self.drawn: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

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
                    real = func(*args, **{**kwargs, "device": "cpu"})
                key = id(out)
                self.drawn[key] = (weakref.ref(out, lambda _, key=key: self.drawn.pop(key, None)), real)
            return out
        if func is torch.Tensor.__deepcopy__ and isinstance(args[0], FakeTensor):
            return _deepcopy_fake(*args)
        if func in _HOST_READS and args and id(args[0]) in self.drawn and self.drawn[id(args[0])][0]() is args[0]:
            with unset_fake_temporarily():
                return func(self.drawn[id(args[0])][1], *args[1:], **kwargs)
        return func(*args, **kwargs)


def install_cuda_device_guard() -> str:
    """Make CUDA's device guard available in this process (see the module's docstring); says how.

    Nothing to do on a CUDA build. On a CPU-only wheel: a Python ``DeviceGuard`` of type CUDA
    (``torch._C._acc``, the hook torch offers PrivateUse1 backends written in Python) is registered
    and copied into the CUDA slot of c10's ``device_guard_impl_registry``; the PrivateUse1 slot is
    restored. Process-wide and permanent: call it only in a process of its own.
    """
    if REAL:
        return "the real GPU (PFUNC_REAL_CUDA=1)"
    if torch.backends.cuda.is_built():
        return "a CUDA build: FakeTensorMode installs a no-op CUDA guard itself"
    import ctypes

    register = getattr(getattr(torch._C, "_acc", None), "register_python_privateuseone_device_guard", None)
    if register is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch._C._acc.register_python_privateuseone_device_guard")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    registry = ctypes.c_void_p.in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")
    slots = (ctypes.c_void_p * 32).from_address(ctypes.addressof(registry))
    cuda, private = int(torch._C._autograd.DeviceType.CUDA), int(torch._C._autograd.DeviceType.PrivateUse1)
    if slots[cuda]:
        return "a CUDA device guard was already registered"

    class CudaDeviceGuard(torch._C._acc.DeviceGuard):
        def type_(self):
            return torch._C._autograd.DeviceType.CUDA

    guard, before = CudaDeviceGuard(), slots[private]
    register(guard)
    slots[cuda], slots[private] = slots[private], before
    _GUARDS.append(guard)
    return "a CPU-only wheel: a Python CUDA device guard installed in c10's registry"


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """The block runs on a simulated ``cuda:0`` (see the module's docstring); yields the fake mode
    (``None`` with ``PFUNC_REAL_CUDA=1``: the block runs on the real GPU)."""
    if REAL:
        yield None
        return
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
    """Assert every tensor leaf of ``tree`` is a fake tensor (real with ``PFUNC_REAL_CUDA=1``) on ``device``
    (and of ``dtype``); returns how many."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False, namespace="torch")
    n = 0
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        name = f"{what}{''.join(f'[{p!r}]' for p in path)}"
        assert REAL or isinstance(leaf, FakeTensor), f"{name} is a real tensor: it was not made in the dry run"
        assert leaf.device == device, f"{name} is on {leaf.device}, expected {device}"
        if dtype is not None:
            assert leaf.dtype == dtype, f"{name} is {leaf.dtype}, expected {dtype}"
        n += 1
    assert n, f"{what} holds no tensor"
    return n


WORKER = Path(__file__).with_name("fake_cuda_worker.py")


def assert_dry_run_passed(results: dict, name: str, *, checked: int) -> None:
    """The worker ran dry run ``name``, it passed, and it checked at least ``checked`` tensors."""
    assert name in results, f"the worker stopped before {name}: {results}"
    assert results[name]["ok"], results[name]["error"]
    assert results[name]["checked"] >= checked


def failed_dry_runs(results: dict) -> dict[str, str]:
    """``{name: error}`` of every dry run in ``results`` that failed."""
    return {k: v["error"] for k, v in results.items() if not k.startswith("_") and not v["ok"]}


def run_worker(tmp: Path, names: list[str], *, real: bool = False, timeout_s: float = 300) -> dict:
    """The worker's results for ``names`` (``real``: on the real GPU)."""
    out = tmp / "results.json"
    env = {**os.environ, "PFUNC_REAL_CUDA": "1" if real else "0"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *names], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert out.exists(), f"the worker wrote nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = json.loads(out.read_text())
    if "_unavailable" in results:
        import pytest

        pytest.skip(results["_unavailable"])
    return results
