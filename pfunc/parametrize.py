"""``Parametrized``: a module plus chains of parametrizations, used through pure functions.

The data path, top-down: :func:`parametrize` -> :meth:`Parametrized.init` -> ``(params, state)``
-> :meth:`~Parametrized.materialize` -> plain values -> the module's code, run on a private
shadow (:mod:`pfunc.execution`) -> ``(output, new_state)``.

The module is never touched: no class swap, no injected property, no buffer written, and no
tensor swapped in even for the duration of a call. Everything that changes lives in two plain
dicts of tensors, ``params`` (what gradients flow to) and ``state`` (buffers and
parametrizations' state), keyed like the ``state_dict`` of the ``torch.nn.utils.parametrize``'d twin.

>>> import torch, pfunc as pf
>>> from pfunc.parametrizations import Skew, Cayley
>>> net = pf.parametrize(torch.nn.Linear(3, 3), {"weight": [Skew(), Cayley()]})
>>> params, state = net.init(generator=torch.Generator().manual_seed(0))
>>> sorted(params)
['bias', 'parametrizations.weight.original']
>>> out, state = net(params, state, torch.randn(2, 3))
>>> values, state = net.materialize(params, state)      # the explicit cache
>>> W = values["weight"]
>>> bool(torch.allclose(W.T @ W, torch.eye(3), atol=1e-5))
True
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import registration as reg
from .chain import Chain, Step
from .execution import Method, ShadowPool, private_copies
from .tree import original_key, pick, pick_steps, step_key
from .validation import check_keys, check_mapping, check_tensors, check_training

__all__ = ["Parametrized", "parametrize", "is_parametrized"]

Params = dict  # dict[str, Tensor]
State = dict  # dict[str, Tensor]
Spec = Mapping[str, Union[Any, Sequence[Any]]]
Layout = Mapping[str, tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]]


@dataclass(frozen=True)
class _Plan:
    """Precomputed keys of one chain, so materialising is a few dict look-ups."""

    name: str
    chain: Chain
    original_keys: tuple[str, ...]
    step_param_keys: tuple[tuple[tuple[str, str], ...], ...]  # per step: (local, full key)
    step_state_keys: tuple[tuple[tuple[str, str], ...], ...]
    stateful: bool
    builtin: bool  # every step is one of pfunc's built-ins (pure: never writes or returns its inputs)


class Parametrized:
    """A module with parametrized tensors, as an immutable value; build it with :func:`parametrize`.

    Attributes:
        module: the untouched ``nn.Module``.
        chains: read-only ``{tensor name: Chain}`` in registration order.
        param_keys: the keys ``params`` must have.
        state_keys: the keys ``state`` must have.
    """

    def __init__(
        self,
        module: nn.Module,
        chains: Mapping[str, Chain],
        layout: Layout,
        *,
        shapes: Optional[Mapping[str, torch.Size]] = None,
        pool: Optional[ShadowPool] = None,
    ):
        self.module = module
        self.chains = MappingProxyType(dict(chains))
        # layout[name] = (local param names per step, local state names per step)
        self._layout = MappingProxyType(dict(layout))
        self._pool = pool if pool is not None and pool.module is module else ShadowPool(module)
        self._aliases = self._pool.aliases
        self._module_params = dict(module.named_parameters())
        self._module_buffers = dict(module.named_buffers())
        self._plain_params = tuple(n for n in self._module_params if n not in self.chains)
        self._plain_buffers = tuple(n for n in self._module_buffers if n not in self.chains)
        self._plans = tuple(self._plan(name, chain) for name, chain in self.chains.items())
        param_keys, state_keys = set(self._plain_params), set(self._plain_buffers)
        for plan in self._plans:
            (state_keys if plan.chain.is_buffer else param_keys).update(plan.original_keys)
            param_keys.update(k for keys in plan.step_param_keys for _, k in keys)
            state_keys.update(k for keys in plan.step_state_keys for _, k in keys)
        self.param_keys = frozenset(param_keys)
        self.state_keys = frozenset(state_keys)
        self._value_keys = frozenset(self._module_params) | frozenset(self._module_buffers)
        # the shapes params must keep: what init gives, except where a chain was registered unsafe
        known = {n: self._module_params[n].shape for n in self._plain_params}
        known.update(shapes or {})
        unsafe = {k for plan in self._plans if any(plan.chain.unsafe) for k in plan.original_keys}
        # a plain dict, private: torch.compile on torch 2.6 breaks the graph on a mappingproxy's items()
        self._shapes = {k: s for k, s in known.items() if k in self.param_keys and k not in unsafe}
        self._non_persistent = frozenset(self._non_persistent_keys())
        # parametrized values are private to each call: pfunc's built-ins make new tensors, and any
        # other chain runs on copy-on-write copies of the caller's tensors (materialize); so the call
        # hands them to the module without another copy
        self._private_values = frozenset(self.chains)

    def _plan(self, name: str, chain: Chain) -> _Plan:
        pnames, snames = self._layout[name]
        return _Plan(
            name=name,
            chain=chain,
            original_keys=tuple(original_key(name, o) for o in chain.original_names),
            step_param_keys=tuple(tuple((l, step_key(name, i, l)) for l in ls) for i, ls in enumerate(pnames)),
            step_state_keys=tuple(tuple((l, step_key(name, i, l)) for l in ls) for i, ls in enumerate(snames)),
            stateful=any(snames),
            builtin=all(_makes_fresh(s) for s in chain.steps),
        )

    def _non_persistent_keys(self) -> set[str]:
        """State keys torch leaves out of ``state_dict``: non-persistent module and step buffers."""
        keys = set()
        for prefix, m in self.module.named_modules(remove_duplicate=False):
            for leaf in m._non_persistent_buffers_set:
                name = self.canonical_name(f"{prefix}.{leaf}" if prefix else leaf)
                if name in self.state_keys:
                    keys.add(name)
        for plan in self._plans:
            for i, step in enumerate(plan.chain.steps):
                if isinstance(step.fn, nn.Module):
                    for prefix, m in step.fn.named_modules():
                        keys.update(step_key(plan.name, i, f"{prefix}.{l}" if prefix else l) for l in m._non_persistent_buffers_set)
        return keys & self.state_keys

    def _derive(self, chains: Mapping[str, Chain], layout: Layout, shapes: Mapping[str, torch.Size]) -> "Parametrized":
        """A new net on the same module (sharing its shadows) with other chains."""
        return Parametrized(self.module, chains, layout, shapes=shapes, pool=self._pool)

    def __reduce__(self):
        # rebuilt from its parts: pickles and deep-copies like any value (shadows are rebuilt)
        return (_rebuild, (self.module, dict(self.chains), dict(self._layout), dict(self._shapes)))

    # ------------------------------------------------------------------ queries
    def __repr__(self) -> str:
        lines = [f"Parametrized({type(self.module).__name__}"]
        for name, chain in self.chains.items():
            steps = ", ".join(s.name for s in chain.steps)
            originals = ", ".join(chain.original_names)
            lines.append(f"  {name}: [{steps}] <- {originals}")
        return "\n".join(lines) + ("\n)" if self.chains else ")")

    def canonical_name(self, name: str) -> str:
        """The module's own name for tensor ``name`` (tied aliases resolve to the first name)."""
        return self._aliases.get(name, name)

    def _where(self, name: str) -> str:
        if name in self.chains:
            return "chain"
        if name in self._module_params:
            return "params"
        if name in self._module_buffers:
            return "state"
        raise ValueError(
            f"Module '{type(self.module).__name__}' does not have a parameter, a buffer, "
            f"or a parametrized element with name '{name}'"
        )

    # ------------------------------------------------------------------ creation
    def init(
        self,
        *,
        generator: Optional[torch.Generator] = None,
        values: Optional[Mapping[str, Tensor]] = None,
    ) -> tuple[Params, State]:
        """Fresh ``(params, state)``: the module's current tensors (or ``values``) put
        through each chain's ``right_inverse`` as if registered one by one with torch.

        ``generator`` feeds every random draw of the parametrizations: stateful ones get it,
        and plain or torch-style ones that draw from the global RNG run with it seeded from
        ``generator`` (``None``: the global RNG as it is). ``values`` overrides some or all of
        the module's tensors by their plain names (e.g. an ensemble member's fresh initialisation).
        """
        params, state = self._module_tensors(values)
        net = self._derive({}, {}, {})
        for name, chain in self.chains.items():
            for step, unsafe in zip(chain.steps, chain.unsafe):
                net, params, state = net._register(params, state, name, step, unsafe, generator)
        return params, state

    def _module_tensors(self, values: Optional[Mapping[str, Tensor]]) -> tuple[Params, State]:
        if values is not None:
            check_mapping("init: values", values)
        values = dict(values or {})
        unknown = [k for k in values if self.canonical_name(k) not in self._value_keys]
        if unknown:
            raise ValueError(f"init: values has names the module does not have: {unknown}")
        values = {self.canonical_name(k): v for k, v in values.items()}
        params = {}
        for n, p in self._module_params.items():
            v = values.get(n, p)
            reg.check_like(v, p, f"values['{n}']")
            params[n] = reg.fresh(v, p.requires_grad)
        state = {}
        for n, b in self._module_buffers.items():
            v = values.get(n, b)
            reg.check_like(v, b, f"values['{n}']")
            state[n] = v.detach().clone()
        return params, state

    # ------------------------------------------------------------------ the hot path
    def check_keys(self, params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
        """Raise ``TypeError`` unless ``params`` and ``state`` are dicts of tensors, ``KeyError``
        naming every missing or unexpected key, ``ValueError`` naming a param of the wrong shape."""
        check_mapping("params", params)
        check_mapping("state", state)
        if params.keys() != self.param_keys or state.keys() != self.state_keys:
            check_keys({"params": (params, self.param_keys), "state": (state, self.state_keys)})
        check_tensors({"params": params, "state": state}, self._shapes)

    def materialize(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        *,
        training: Optional[bool] = None,
    ) -> tuple[dict[str, Tensor], State]:
        """``(values, new_state)``: every module tensor by its plain name, each parametrized
        one computed once. ``values`` is the explicit cache: pass it to :meth:`apply` as many
        times as you like.

        ``training`` defaults to ``module.training``; in eval no state changes.
        """
        if check_training(training) is None:
            training = self.module.training
        self.check_keys(params, state)
        values = {k: params[k] for k in self._plain_params}
        for k in self._plain_buffers:
            values[k] = state[k]
        new_state = None
        for plan in self._plans:
            originals = pick(state if plan.chain.is_buffer else params, plan.original_keys)
            sp = pick_steps(params, plan.step_param_keys)
            ss = pick_steps(state, plan.step_state_keys)
            if not plan.builtin:  # a user's parametrization may write what it is handed: never the caller's
                originals = private_copies(originals)
                ss = [dict(zip(s, private_copies(list(s.values())))) for s in ss]
            y, ss_new = plan.chain.forward(originals, sp, ss, training)
            values[plan.name] = y
            if plan.stateful and training:
                if new_state is None:
                    new_state = dict(state)
                for keys, s in zip(plan.step_state_keys, ss_new):
                    for l, k in keys:
                        new_state[k] = s[l]
        return values, (state if new_state is None else new_state)

    def apply(
        self,
        values: Mapping[str, Tensor],
        *args: Any,
        training: Optional[bool] = None,
        method: Method = "forward",
        **kwargs: Any,
    ) -> Any:
        """The module's ``method`` (its forward by default) with ``values`` (from :meth:`materialize`)
        as its tensors, run privately; buffer updates are dropped (use :meth:`__call__` to keep them).

        ``values`` must name every parameter and buffer of the module (``KeyError`` naming the
        missing and unknown ones, ``TypeError`` naming a non-tensor).
        """
        training = check_training(training)
        check_mapping("values", values)
        if values.keys() != self._value_keys:
            check_keys({"values": (values, self._value_keys)}, hint=" (build values with net.materialize(params, state))")
        check_tensors({"values": values}, self._shapes)
        return self._pool.run(values, args, kwargs, training=training, method=self._method(method), capture=False)[0]

    def __call__(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        *args: Any,
        training: Optional[bool] = None,
        method: Method = "forward",
        **kwargs: Any,
    ) -> tuple[Any, State]:
        """``(output, new_state)``: materialise, then run the module's ``method`` (its forward by
        default; another method's name, or ``f(module, *args, **kwargs)``) on ``args``/``kwargs``.

        The call runs on a private shadow of the module with ``training`` as every layer's mode
        (``None``: each layer's own). ``new_state`` holds every buffer the call changed, in place
        or by assignment (e.g. BatchNorm's running statistics); in eval no state changes. The
        caller's ``params`` and ``state`` are never written.
        """
        method = self._method(method)
        values, new_state = self.materialize(params, state, training=training)
        out, changed = self._pool.run(values, args, kwargs, training=training, method=method, private=self._private_values)
        if changed:
            updated = {k: t for k, t in changed.items() if k in self.state_keys}
            if updated:  # a parametrized buffer's updates are dropped, as torch drops them
                new_state = {**new_state, **updated}
        return out, new_state

    def _method(self, method: Method) -> Method:
        if method == "forward" or (callable(method) and not isinstance(method, str)):
            return method
        if not isinstance(method, str):
            raise TypeError(f"method must be a method name or a callable f(module, *args, **kwargs), got {type(method).__name__}")
        if not callable(getattr(self.module, method, None)):
            raise AttributeError(f"method: {type(self.module).__name__} has no method {method!r}")
        return method

    def state_dict(self, params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``state_dict`` of the ``torch.nn.utils.parametrize``'d twin, from ``(params, state)``:
        the same keys (non-persistent buffers left out, as torch does), detached. Read one back
        with :func:`pfunc.split_state_dict`."""
        self.check_keys(params, state)
        return {k: v.detach() for k, v in {**params, **state}.items() if k not in self._non_persistent}

    # ------------------------------------------------------------------ assignment
    def assign(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        updates: Mapping[str, Tensor],
        *,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[Params, State]:
        """New ``(params, state)`` whose tensors take the values in ``updates``.

        A parametrized name goes through its chain's ``right_inverse`` (last to
        first), exactly as ``module.weight = value`` with torch; a plain name is
        replaced (same shape and dtype required).
        """
        return reg.assign_values(self, params, state, updates, generator)

    # ------------------------------------------------------------------ registration and removal
    def register(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        name: str,
        parametrization: Any,
        *,
        unsafe: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> tuple["Parametrized", Params, State]:
        """``(net, params, state)`` with ``parametrization`` appended to tensor ``name``'s chain.

        As ``torch.nn.utils.parametrize.register_parametrization``: on a plain tensor
        the originals are ``right_inverse(value)``; on a parametrized one the chain
        grows and the originals stay. Unless ``unsafe``, dtype and shape are checked.
        """
        self.check_keys(params, state)
        name = self.canonical_name(name)
        return self._register(dict(params), dict(state), name, reg.step_for(parametrization, name), unsafe, generator)

    def _register(
        self,
        params: Params,
        state: State,
        name: str,
        step: Step,
        unsafe: bool,
        generator: Optional[torch.Generator],
    ) -> tuple["Parametrized", Params, State]:
        return reg.register_step(self, params, state, name, step, unsafe, generator)

    def remove(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        name: str,
        *,
        leave_parametrized: bool = True,
    ) -> tuple["Parametrized", Params, State]:
        """``(net, params, state)`` without the parametrizations of ``name``.

        ``leave_parametrized=True`` keeps the parametrized value (computed in eval
        mode) as a plain tensor; ``False`` gives back the original, and is a
        ``ValueError`` when the chain has several originals.
        """
        return reg.remove_chain(self, params, state, name, leave_parametrized)


def _makes_fresh(step: Step) -> bool:
    """Whether ``step`` is one of pfunc's built-in parametrizations: pure, its output always a new
    tensor (never its input, a view of it, or anything the caller holds), its inputs never written."""
    return type(step.fn).__module__.startswith("pfunc.parametrizations.")


def _rebuild(module: nn.Module, chains: Mapping[str, Chain], layout: Layout, shapes: Mapping[str, torch.Size]) -> Parametrized:
    return Parametrized(module, chains, layout, shapes=shapes)


# ---------------------------------------------------------------------- public constructors
def parametrize(
    module: nn.Module,
    spec: Spec,
    *,
    unsafe: bool = False,
) -> Parametrized:
    """``module`` with ``spec = {tensor name: parametrization or list of them}`` registered.

    Each list is a chain, registered in order exactly as repeated calls to
    ``torch.nn.utils.parametrize.register_parametrization`` (dtype/shape checks
    included unless ``unsafe``); names may be nested (``"encoder.0.weight"``) and
    may name buffers. The module is not modified. Raises ``ValueError`` naming an
    unknown tensor or a failed check, ``TypeError`` naming a tensor whose
    parametrization is not callable.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"parametrize: module must be an nn.Module, got {reg.describe(module)}")
    if not isinstance(spec, Mapping):
        raise TypeError(f"parametrize: spec must map tensor names to parametrizations, got {reg.describe(spec)}")
    net = Parametrized(module, {}, {})
    params, state = net.init()
    seen: dict[str, str] = {}
    for raw_name, chain in spec.items():
        if not isinstance(raw_name, str):
            raise TypeError(f"parametrize: spec keys must be tensor names (str), got {raw_name!r}")
        name = net.canonical_name(raw_name)
        if name in seen:
            raise ValueError(f"parametrize: '{raw_name}' and '{seen[name]}' name the same (tied) tensor")
        seen[name] = raw_name
        steps = list(chain) if isinstance(chain, (list, tuple)) else [chain]
        if not steps:
            raise ValueError(f"parametrize: the chain for '{raw_name}' is empty")
        for fn in steps:
            step = reg.step_for(fn, raw_name)
            net, params, state = net._register(params, state, name, step, unsafe, torch.Generator().manual_seed(0))
    return net


def is_parametrized(obj: Union[Parametrized, nn.Module], name: Optional[str] = None) -> bool:
    """Whether ``obj`` has any parametrization (``name=None``), or one on tensor ``name``.

    Works on a :class:`Parametrized` and on a module parametrized in place by
    ``torch.nn.utils.parametrize`` (dotted names allowed for both).
    """
    if isinstance(obj, Parametrized):
        if name is None:
            return len(obj.chains) > 0
        return obj.canonical_name(name) in obj.chains
    if isinstance(obj, nn.Module):
        from torch.nn.utils import parametrize as torch_parametrize

        if name is None:
            return any(torch_parametrize.is_parametrized(m) for m in obj.modules())
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = obj.get_submodule(owner_name) if owner_name else obj
        except AttributeError:
            return False
        return torch_parametrize.is_parametrized(owner, leaf)
    raise TypeError(f"is_parametrized: expected a Parametrized or an nn.Module, got {reg.describe(obj)}")
