"""Private execution: a module's code run on a shadow that shares its classes and attributes, never its tensors.

``torch.func.functional_call`` *borrows* the module: it swaps the given tensors into the
module's own ``_parameters``/``_buffers`` for the call and runs under each submodule's own
``training`` flag. Another thread reading the module mid-call sees the borrowed tensors, two
threads calling it get each other's, and an interrupt in its restore loop leaves them swapped.

A :class:`ShadowPool` runs the same code on a *shadow* instead: for every submodule, an object
of the same class with the same attributes, but with its own ``_parameters``, ``_buffers`` and
``_modules`` dicts and its own ``training`` flag. Shadows are built once and reused: a call takes
an idle one (or builds one, when every shadow is busy in another thread or in an enclosing call)
and gives it back, so concurrent calls never share a shadow and a call costs a dict write per
tensor; the module itself is never written, not even during a call. A shadow is a snapshot of the module's structure and plain
attributes when the pool was built; only the tensors and (with ``training=None``) the modes are
read afresh on every call.

Every tensor goes in as a copy-on-write clone (``torch._lazy_clone``: no copy is made unless it is
written; a plain clone under ``torch.func`` transforms and ``torch.compile``, where copy-on-write is not
available): a forward that updates a buffer in place (BatchNorm's running statistics) or assigns a new
one (``self.ema = ...``) changes the shadow's copy only, and :meth:`ShadowPool.run` returns exactly the
buffers that changed; a forward or hook that writes a parameter (torch.ao's structured pruner zeroes
pruned bias entries through ``module._bias.data``) writes the shadow's copy, never the caller's tensor.

>>> import torch
>>> from torch import nn
>>> bn = nn.BatchNorm1d(3)                                     # freshly built: in train mode
>>> pool = ShadowPool(bn)
>>> values = {k: v.detach().clone() for k, v in [*bn.named_parameters(), *bn.named_buffers()]}
>>> out, changed = pool.run(values, (torch.randn(8, 3),), training=True)
>>> sorted(changed)
['num_batches_tracked', 'running_mean', 'running_var']
>>> bool(values["running_mean"].eq(0).all()), bn.training     # the caller's tensors and the module: untouched
(True, True)
"""

from __future__ import annotations

import types
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["ShadowPool", "Method", "private_copies"]

Method = Union[str, Callable[..., Any]]
"""What a call runs: ``"forward"`` (through ``__call__``, so hooks run), another method's name, or
a function ``f(module, *args, **kwargs)`` given the shadow (flax's ``apply(..., method=)``)."""

_functorch = torch._C._functorch
_lazy_clone = getattr(torch, "_lazy_clone", None)
_is_cow = getattr(torch._C, "_is_cow_tensor", None)
_SLOT_DICTS = ("_parameters", "_buffers", "_modules")


def _copy_on_write(t: Tensor, transformed: bool) -> Tensor:
    """A private copy of ``t`` that costs nothing until written (``torch._lazy_clone``), else a clone."""
    if not transformed and _lazy_clone is not None:
        try:
            return _lazy_clone(t)
        except (RuntimeError, NotImplementedError):  # layouts without copy-on-write storage
            pass
    return t.clone()


def private_copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copy-on-write copies of ``tensors`` (plain clones under ``torch.func`` transforms and
    ``torch.compile``): for code that might write what it is handed, such as a user's parametrization."""
    transformed = torch.compiler.is_compiling() or _functorch.maybe_current_level() is not None
    return [_copy_on_write(t, transformed) for t in tensors]


def _hand_over(slots: tuple, values: Mapping[str, Tensor], private: frozenset, transformed: bool) -> None:
    """Every ``values[key]`` into its slot as a :func:`_copy_on_write` copy (``private`` keys as they are).
    The hot path of a call: one copy-on-write op per tensor, no per-tensor function call."""
    copy = torch.Tensor.clone if transformed or _lazy_clone is None else _lazy_clone
    try:
        if private:
            for d, leaf, key in slots:
                t = values[key]
                d[leaf] = t if key in private else copy(t)
        else:
            for d, leaf, key in slots:
                d[leaf] = copy(values[key])
    except (RuntimeError, NotImplementedError):  # a layout without copy-on-write storage: one by one
        for d, leaf, key in slots:
            t = values[key]
            d[leaf] = t if key in private else _copy_on_write(t, transformed)


def _unwritten(t: Tensor) -> bool:
    """Whether ``t``, a :func:`_copy_on_write` copy, was certainly never written: its storage is still
    shared copy-on-write. (In-place writes do not all bump ``Tensor._version``: BatchNorm's running
    statistics do not; every write does materialise a copy-on-write storage.)"""
    return _is_cow is not None and _is_cow(t)


def _remap(value: Any, shadows: Mapping[int, nn.Module]) -> Any:
    """``value`` with every submodule it refers to (directly, as a bound method's ``self``, or in a
    list, tuple or dict) replaced by its shadow."""
    if isinstance(value, nn.Module):
        return shadows.get(id(value), value)
    if isinstance(value, types.MethodType) and id(value.__self__) in shadows:
        return types.MethodType(value.__func__, shadows[id(value.__self__)])
    if type(value) in (list, tuple) and any(isinstance(v, nn.Module) for v in value):
        return type(value)(shadows.get(id(v), v) if isinstance(v, nn.Module) else v for v in value)
    if type(value) is dict and any(isinstance(v, nn.Module) for v in value.values()):
        return {k: shadows.get(id(v), v) if isinstance(v, nn.Module) else v for k, v in value.items()}
    return value


def _set_training(shadow: nn.Module, mode: bool, compiling: bool) -> None:
    """``shadow.training = mode``: eager, one dict write; compiling, attribute assignment, which
    dynamo traces (on torch 2.6 it breaks the graph on item assignment into a module's ``__dict__``)."""
    if compiling:
        shadow.training = mode
    else:
        shadow.__dict__["training"] = mode


class _Shadow:
    """One private copy of the module tree, with the slots every tensor is written to."""

    __slots__ = ("root", "pairs", "param_slots", "buffer_slots", "mode")

    def __init__(self, module: nn.Module, params: tuple, buffers: tuple):
        shadows: dict[int, nn.Module] = {}
        pairs: list[tuple[nn.Module, nn.Module]] = []
        stack = [module]
        while stack:  # every distinct submodule once, however often it is registered
            m = stack.pop()
            if id(m) in shadows:
                continue
            shadows[id(m)] = object.__new__(type(m))  # no __init__, no class-level __new__ tricks
            pairs.append((m, shadows[id(m)]))
            stack.extend(c for c in m._modules.values() if c is not None)
        for m, s in pairs:
            d = {k: _remap(v, shadows) for k, v in m.__dict__.items() if k not in _SLOT_DICTS}
            d["_parameters"] = dict.fromkeys(m._parameters)
            d["_buffers"] = dict.fromkeys(m._buffers)
            d["_modules"] = {k: (None if c is None else shadows[id(c)]) for k, c in m._modules.items()}
            s.__dict__.update(d)
        self.root = shadows[id(module)]
        self.pairs = tuple(pairs)
        self.param_slots = tuple(self._slot(path, leaf, "_parameters", key) for path, leaf, key in params)
        self.buffer_slots = tuple(self._slot(path, leaf, "_buffers", key) for path, leaf, key in buffers)
        self.mode: Any = object()  # the modes last set; a sentinel: unknown

    def _slot(self, path: tuple[str, ...], leaf: str, where: str, key: str) -> tuple[dict, str, str]:
        owner = self.root
        for part in path:
            owner = owner._modules[part]
        return owner.__dict__[where], leaf, key

    def set_mode(self, training: Optional[bool]) -> bool:
        """Every shadow submodule in mode ``training``; ``None``: each in its original's current mode.
        Returns whether any submodule is now in training mode."""
        compiling = torch.compiler.is_compiling()
        if training is None:
            self.mode = None
            any_training = False
            for m, s in self.pairs:
                mode = m.training
                _set_training(s, mode, compiling)
                any_training = any_training or mode
            return any_training
        if self.mode is not training:
            self.mode = None  # unknown while half set (an interrupt may land here)
            for _, s in self.pairs:
                _set_training(s, training, compiling)
            self.mode = training
        return training

    def clear(self) -> None:
        """Drop the last call's tensors, so the shadow keeps nothing alive between calls."""
        for d, leaf, _ in self.param_slots:
            d[leaf] = None
        for d, leaf, _ in self.buffer_slots:
            d[leaf] = None


def _tensor_names(module: nn.Module, getter: str, aliases: Mapping[str, str]) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    out = []
    for name, _ in getattr(module, getter)(remove_duplicate=False):
        *path, leaf = name.split(".")
        out.append((tuple(path), leaf, aliases.get(name, name)))
    return tuple(out)


class ShadowPool:
    """Runs ``module``'s code privately: on per-thread shadows, never on ``module`` itself.

    Args:
        module: the module whose code runs. Read once here (its structure and plain
            attributes) and, with ``training=None``, for its modes at every call; never written.

    Every parameter and buffer name of ``module`` (tied aliases resolve to the first name
    ``named_parameters``/``named_buffers`` reports; ``aliases`` maps each later name to it)
    must be given to :meth:`run`.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"ShadowPool: module must be an nn.Module, got {type(module).__name__}")
        _refuse_wrappers(module)
        self.module = module
        aliases = _alias_map(module)
        self.aliases: Mapping[str, str] = MappingProxyType(aliases)
        self._params = _tensor_names(module, "named_parameters", aliases)
        self._buffers = _tensor_names(module, "named_buffers", aliases)
        self.param_keys = frozenset(key for *_, key in self._params)
        self._tied_params = len(self.param_keys) < len(self._params)
        self.buffer_keys = frozenset(key for *_, key in self._buffers)
        self._free: list[_Shadow] = []  # idle shadows; a call takes one (list.pop is atomic), so concurrent calls never share
        self._traced = _Shadow(module, self._params, self._buffers)  # the one torch.compile traces

    def __reduce__(self):
        return (ShadowPool, (self.module,))

    def _acquire(self) -> _Shadow:
        try:
            return self._free.pop()
        except IndexError:  # every shadow is busy (other threads, or calls nested in this one)
            return _Shadow(self.module, self._params, self._buffers)

    def run(
        self,
        values: Mapping[str, Tensor],
        args: tuple = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        *,
        training: Optional[bool] = None,
        method: Method = "forward",
        capture: bool = True,
        private: frozenset = frozenset(),
    ) -> tuple[Any, dict[str, Tensor]]:
        """``(output, changed)``: ``method`` of a shadow holding ``values``, run on ``args``/``kwargs``.

        ``training`` sets every shadow submodule's mode for the call (``None``: each keeps the
        module's current mode). ``changed`` holds the buffers the call updated in place or
        reassigned, by canonical name; it is empty unless ``capture`` and some submodule is in
        training mode (in eval no state changes). Under ``torch.compile`` or a ``torch.func``
        transform, where writes cannot be told apart, it holds every buffer.
        ``values`` must hold every canonical tensor name; nothing in it is written, whatever the
        module's code does to the tensors it is handed (each goes in as a copy-on-write clone), except
        the parameters named in ``private``: tensors the caller made for this call alone, handed as they are.
        """
        compiling = torch.compiler.is_compiling()
        shadow = self._traced if compiling else self._acquire()
        try:
            capture = shadow.set_mode(training) and capture  # in eval no state changes, ever
            transformed = compiling or _functorch.maybe_current_level() is not None
            if self._tied_params:  # one copy per tensor, so tied parameters stay one tensor
                copies: dict[str, Tensor] = {}
                for d, leaf, key in shadow.param_slots:
                    t = copies.get(key)
                    if t is None:
                        t = copies[key] = values[key] if key in private else _copy_on_write(values[key], transformed)
                    d[leaf] = t
            else:
                _hand_over(shadow.param_slots, values, private, transformed)
            given: dict[str, Tensor] = {}
            for d, leaf, key in shadow.buffer_slots:
                t = given.get(key)
                if t is None:
                    t = given[key] = _copy_on_write(values[key], transformed)
                d[leaf] = t
            root = shadow.root
            if method == "forward":
                out = root(*args, **(kwargs or {}))
            elif isinstance(method, str):
                out = getattr(root, method)(*args, **(kwargs or {}))
            else:
                out = method(root, *args, **(kwargs or {}))
            changed: dict[str, Tensor] = {}
            if capture:
                for d, leaf, key in shadow.buffer_slots:
                    now = d[leaf]
                    if key in changed or (now is given[key] and not transformed and _unwritten(now)):
                        continue
                    if not isinstance(now, Tensor):
                        raise TypeError(f"the forward set buffer '{key}' to {type(now).__name__}; a buffer must stay a Tensor")
                    changed[key] = now
            return out, changed
        finally:
            shadow.clear()
            if not compiling:
                self._free.append(shadow)


def _distributed_wrappers() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    from torch.nn.parallel import DistributedDataParallel

    kinds: list[type] = [DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # torch 2.4, 2.5
        except ImportError:
            return tuple(kinds)
    kinds.append(FSDPModule)
    return tuple(kinds)


def _refuse_wrappers(module: nn.Module) -> None:
    """Modules a shadow cannot stand in for: DDP and FSDP act on their module's own parameters from
    hooks (gradient reduction, all-gathers written into the module), so a private call would bypass
    them or they would write the module; a TorchScript module runs compiled code on its own tensors."""
    kinds = _distributed_wrappers()
    for name, m in module.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            where = f"'{name}'" if name else "the module"
            raise TypeError(
                f"{where} is a TorchScript module ({type(m).__name__}), whose compiled code reads its own tensors; "
                "give pfunc the Python module it was scripted from"
            )
        if isinstance(m, kinds):
            where = f"'{name}'" if name else "the module"
            raise TypeError(
                f"{where} is wrapped by {type(m).__name__}, whose hooks work on the module's own parameters; "
                "give pfunc the plain module (ddp.module, or the model before fully_shard) and average "
                "functional gradients with pf.distributed.all_reduce"
            )


def _alias_map(module: nn.Module) -> dict[str, str]:
    """Tied tensors: every later name of a tensor -> the first name torch reports."""
    first: dict[int, str] = {}
    aliases = {}
    for named in (module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)):
        for n, t in named:
            if id(t) in first:
                if first[id(t)] != n:
                    aliases[n] = first[id(t)]
            else:
                first[id(t)] = n
    return aliases
