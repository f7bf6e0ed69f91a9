"""``Parametrized``: a module plus chains of parametrizations, used through pure functions.

The module is never touched: no class swap, no injected property, no buffer
written. Everything that changes lives in two plain dicts of tensors, ``params``
(what gradients flow to) and ``state`` (buffers and parametrizations' state), keyed
like the ``state_dict`` of the ``torch.nn.utils.parametrize``'d twin.

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

from .chain import Chain, Step, as_step
from .tree import original_key, step_key

__all__ = ["Parametrized", "parametrize", "is_parametrized"]

Params = dict  # dict[str, Tensor]
State = dict  # dict[str, Tensor]
Spec = Mapping[str, Union[Any, Sequence[Any]]]


def _fresh(t: Tensor, requires_grad: bool) -> Tensor:
    return t.detach().clone().requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))


def _describe(x: Any) -> str:
    return type(x).__name__


@dataclass(frozen=True)
class _Plan:
    """Precomputed keys of one chain, so materialising is a few dict look-ups."""

    name: str
    chain: Chain
    original_keys: tuple[str, ...]
    step_param_keys: tuple[tuple[tuple[str, str], ...], ...]  # per step: (local, full key)
    step_state_keys: tuple[tuple[tuple[str, str], ...], ...]
    stateful: bool


class Parametrized:
    """A module with parametrized tensors, as an immutable value; build it with :func:`parametrize`.

    Attributes:
        module: the untouched ``nn.Module``.
        chains: read-only ``{tensor name: Chain}`` in registration order.
    """

    def __init__(
        self,
        module: nn.Module,
        chains: Mapping[str, Chain],
        layout: Mapping[str, tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]],
    ):
        self.module = module
        self.chains = MappingProxyType(dict(chains))
        # layout[name] = (local param names per step, local state names per step)
        self._layout = MappingProxyType(dict(layout))
        named_params = dict(module.named_parameters())
        named_buffers = dict(module.named_buffers())
        self._aliases = _alias_map(module)
        self._slots, self._edges = _slots(module)
        self._module_params = named_params
        self._module_buffers = named_buffers
        self._plain_params = tuple(n for n in named_params if n not in self.chains)
        self._plain_buffers = tuple(n for n in named_buffers if n not in self.chains)
        plans = []
        for name, chain in self.chains.items():
            pnames, snames = self._layout[name]
            plans.append(
                _Plan(
                    name=name,
                    chain=chain,
                    original_keys=tuple(original_key(name, o) for o in chain.original_names),
                    step_param_keys=tuple(tuple((l, step_key(name, i, l)) for l in ls) for i, ls in enumerate(pnames)),
                    step_state_keys=tuple(tuple((l, step_key(name, i, l)) for l in ls) for i, ls in enumerate(snames)),
                    stateful=any(snames),
                )
            )
        self._plans = tuple(plans)
        param_keys = set(self._plain_params)
        state_keys = set(self._plain_buffers)
        for plan in self._plans:
            (state_keys if plan.chain.is_buffer else param_keys).update(plan.original_keys)
            for keys in plan.step_param_keys:
                param_keys.update(k for _, k in keys)
            for keys in plan.step_state_keys:
                state_keys.update(k for _, k in keys)
        self.param_keys = frozenset(param_keys)
        self.state_keys = frozenset(state_keys)

    def __reduce__(self):
        # rebuilt from its parts: pickles and deep-copies like any value
        return (Parametrized, (self.module, dict(self.chains), dict(self._layout)))

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

        ``generator`` feeds every random draw of stateful parametrizations (``None``:
        the global RNG). ``values`` overrides some or all of the module's tensors by
        their plain names (e.g. an ensemble member's fresh initialisation).
        """
        params, state = self._module_tensors(values)
        net = Parametrized(self.module, {}, {})
        for name, chain in self.chains.items():
            for step, unsafe in zip(chain.steps, chain.unsafe):
                net, params, state = net._register(params, state, name, step, unsafe, generator)
        return params, state

    def _module_tensors(self, values: Optional[Mapping[str, Tensor]]) -> tuple[Params, State]:
        values = dict(values or {})
        unknown = [k for k in values if self.canonical_name(k) not in self._module_params and self.canonical_name(k) not in self._module_buffers]
        if unknown:
            raise ValueError(f"init: values has names the module does not have: {unknown}")
        values = {self.canonical_name(k): v for k, v in values.items()}
        params = {}
        for n, p in self._module_params.items():
            v = values.get(n, p)
            _check_like(v, p, f"values['{n}']")
            params[n] = _fresh(v, p.requires_grad)
        state = {}
        for n, b in self._module_buffers.items():
            v = values.get(n, b)
            _check_like(v, b, f"values['{n}']")
            state[n] = v.detach().clone()
        return params, state

    # ------------------------------------------------------------------ the hot path
    def check_keys(self, params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
        """Raise ``KeyError`` naming every missing or unexpected key of ``params``/``state``."""
        if params.keys() == self.param_keys and state.keys() == self.state_keys:
            return
        problems = []
        for what, tree, keys in (("params", params, self.param_keys), ("state", state, self.state_keys)):
            missing = sorted(keys - tree.keys())
            extra = sorted(tree.keys() - keys)
            if missing:
                problems.append(f"{what} is missing {missing}")
            if extra:
                problems.append(f"{what} has unexpected {extra}")
        raise KeyError("; ".join(problems) + " (build params and state with net.init())")

    def materialize(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        *,
        training: Optional[bool] = None,
    ) -> tuple[dict[str, Tensor], State]:
        """``(values, new_state)``: every module tensor by its plain name, each parametrized
        one computed once. ``values`` is the explicit cache: pass it to
        :meth:`apply` (or ``torch.func.functional_call``) as many times as you like.

        ``training`` defaults to ``module.training``; in eval no state changes.
        """
        self.check_keys(params, state)
        if training is None:
            training = self.module.training
        values = {k: params[k] for k in self._plain_params}
        for k in self._plain_buffers:
            values[k] = state[k]
        new_state = None
        for plan in self._plans:
            originals = _pick(state if plan.chain.is_buffer else params, plan.original_keys)
            sp = _pick_steps(params, plan.step_param_keys)
            ss = _pick_steps(state, plan.step_state_keys)
            y, ss_new = plan.chain.forward(originals, sp, ss, training)
            values[plan.name] = y
            if plan.stateful:
                if new_state is None:
                    new_state = dict(state)
                for keys, s in zip(plan.step_state_keys, ss_new):
                    for l, k in keys:
                        new_state[k] = s[l]
        return values, (state if new_state is None else new_state)

    def apply(self, values: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """The module's forward with ``values`` (from :meth:`materialize`) in place of its tensors."""
        return self._functional_call(dict(values), args, kwargs)

    def _functional_call(self, values: dict, args: tuple, kwargs: dict) -> Any:
        # tied aliases are filled here, so torch need not rediscover ties on every call
        for alias, name in self._aliases.items():
            if name in values:
                values[alias] = values[name]
        if (
            torch.compiler.is_compiling()
            or not self._slots.keys() >= values.keys()
            or any(parent._modules.get(name) is not child for parent, name, child in self._edges)
        ):
            # traced under torch.compile; by name when the module's tree changed since __init__
            return torch.func.functional_call(self.module, values, args, kwargs, tie_weights=False)
        # functional_call's semantics (swap in, call, swap back even on error) with the owners
        # resolved once in __init__: a dict write per tensor instead of get_submodule +
        # delattr + setattr, twice per call.
        swapped = []
        try:
            for key, tensor in values.items():
                slot, leaf = self._slots[key]
                swapped.append((slot, leaf, slot[leaf]))
                slot[leaf] = tensor
            return self.module(*args, **kwargs)
        finally:
            for slot, leaf, old in reversed(swapped):
                slot[leaf] = old

    def __call__(
        self,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        *args: Any,
        training: Optional[bool] = None,
        **kwargs: Any,
    ) -> tuple[Any, State]:
        """``(output, new_state)``: materialise then run the module's forward on ``args``.

        The module's own buffers (e.g. BatchNorm running stats) are copied first when
        the module is in training mode, so its in-place updates land in ``new_state``
        and never in the caller's ``state``.
        """
        values, new_state = self.materialize(params, state, training=training)
        copied = self._plain_buffers and any(m.training for m in self.module.modules())
        if copied:
            for k in self._plain_buffers:
                values[k] = values[k].clone()
        out = self._functional_call(values, args, kwargs)
        if copied:
            new_state = dict(new_state)
            for k in self._plain_buffers:
                new_state[k] = values[k]
        return out, new_state

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
        self.check_keys(params, state)
        params, state = dict(params), dict(state)
        for raw_name, value in updates.items():
            name = self.canonical_name(raw_name)
            where = self._where(name)
            if not isinstance(value, Tensor):
                raise TypeError(f"assign: value for '{raw_name}' must be a Tensor, got {_describe(value)}")
            if where in ("params", "state"):
                tree = params if where == "params" else state
                _check_like(value, tree[name], f"assign: value for '{raw_name}'")
                tree[name] = _fresh(value, tree[name].requires_grad)
                continue
            plan = next(p for p in self._plans if p.name == name)
            chain = plan.chain
            sp = [{l: params[k] for l, k in keys} for keys in plan.step_param_keys]
            ss = [{l: state[k] for l, k in keys} for keys in plan.step_state_keys]
            with torch.no_grad():
                new, ss_new = chain.right_inverse(value, sp, ss, generator)
            source = state if chain.is_buffer else params
            old = [source[k] for k in plan.original_keys]
            if chain.is_tensor:
                if not isinstance(new, Tensor):
                    raise ValueError(f"'right_inverse' of '{name}' must return a tensor. Got {_describe(new)}.")
                new = (new,)
            else:
                if not isinstance(new, Sequence) or isinstance(new, Tensor):
                    raise ValueError(f"'right_inverse' of '{name}' must return a sequence of tensors. Got {_describe(new)}.")
                if len(new) != len(old):
                    raise ValueError(
                        f"'right_inverse' of '{name}' must return a sequence of tensors of length "
                        f"{len(old)}. Got a sequence of length {len(new)}."
                    )
            for key, o, n in zip(plan.original_keys, old, new):
                if not isinstance(n, Tensor):
                    raise ValueError(f"'right_inverse' of '{name}' must return tensors; '{key}' got {_describe(n)}.")
                if n.dtype != o.dtype:
                    raise ValueError(
                        f"The tensor returned by 'right_inverse' for '{key}' has dtype {n.dtype} "
                        f"while the original has dtype {o.dtype}"
                    )
                if n.shape != o.shape and not any(chain.unsafe):
                    raise ValueError(
                        f"assign: the value for '{raw_name}' gives '{key}' the shape {tuple(n.shape)}, but the "
                        f"original has shape {tuple(o.shape)} (register with unsafe=True to allow it)"
                    )
            for key, o, n in zip(plan.original_keys, old, new):
                source[key] = _fresh(n, o.requires_grad)
            for keys, s in zip(plan.step_state_keys, ss_new):
                for l, k in keys:
                    state[k] = s[l].detach()
        return params, state

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
        return self._register(dict(params), dict(state), self.canonical_name(name), as_step(parametrization), unsafe, generator)

    def _register(
        self,
        params: Params,
        state: State,
        name: str,
        step: Step,
        unsafe: bool,
        generator: Optional[torch.Generator],
    ) -> tuple["Parametrized", Params, State]:
        where = self._where(name)
        params, state = dict(params), dict(state)
        chains = dict(self.chains)
        layout = dict(self._layout)
        if where == "chain":
            current, _ = self.materialize(params, state, training=False)
            current = current[name].detach()
        else:
            current = (params if where == "params" else state)[name]
        step = _bind(step, self.module, name, current)
        sp, ss = step.init(current, generator)
        if where != "chain":
            new = current  # no right_inverse, or one that raises NotImplementedError: the identity (as torch)
            with torch.no_grad():
                if step.has_right_inverse:
                    try:
                        new, ss = step.right_inverse(current, sp, ss, generator)
                    except NotImplementedError:
                        pass
            originals, n_originals = _originals_from(new, current, name)
            requires_grad = current.requires_grad
            chain = Chain((step,), n_originals, is_buffer=(where == "state"), unsafe=(unsafe,))
            if not unsafe:
                with torch.no_grad():
                    Z, _ = chain.forward(originals, [sp], [ss], training=False)
                _check_output(Z, current, name, "Registering a parametrization")
            tree = state if where == "state" else params
            del tree[name]
            for o, t in zip(chain.original_names, originals):
                tree[original_key(name, o)] = _fresh(t, requires_grad)
            chains[name] = chain
            layout[name] = ((tuple(sp),), (tuple(ss),))
        else:
            if not unsafe:
                with torch.no_grad():
                    X, _ = step.forward((current,), sp, ss, False)
                    _check_output(X, current, name, "Registering a parametrization on a parametrized tensor")
                    if step.has_right_inverse:
                        try:
                            Z, _ = step.right_inverse(X, sp, ss, generator)
                        except NotImplementedError:
                            pass
                        else:
                            if not isinstance(Z, Tensor):
                                raise ValueError(
                                    f"parametrization.right_inverse for '{name}' must return a tensor. Got: {_describe(Z)}"
                                )
                            if Z.dtype != current.dtype:
                                raise ValueError(
                                    f"The tensor returned by parametrization.right_inverse for '{name}' must have the same "
                                    f"dtype as the parametrized tensor: {Z.dtype} != {current.dtype}"
                                )
                            if Z.shape != current.shape:
                                raise ValueError(
                                    f"The tensor returned by parametrization.right_inverse for '{name}' must have the same "
                                    f"shape as the parametrized tensor: {tuple(Z.shape)} != {tuple(current.shape)}"
                                )
            old = chains[name]
            chains[name] = Chain(old.steps + (step,), old.n_originals, old.is_buffer, old.unsafe + (unsafe,))
            pnames, snames = layout[name]
            layout[name] = (pnames + (tuple(sp),), snames + (tuple(ss),))
        index = len(chains[name].steps) - 1
        for l, t in sp.items():
            params[step_key(name, index, l)] = t
        for l, t in ss.items():
            state[step_key(name, index, l)] = t.detach()
        return Parametrized(self.module, chains, layout), params, state

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
        self.check_keys(params, state)
        name = self.canonical_name(name)
        if name not in self.chains:
            self._where(name)  # unknown names get the "does not have" error
            raise ValueError(f"Module {type(self.module).__name__} does not have a parametrization on {name}")
        plan = next(p for p in self._plans if p.name == name)
        chain = plan.chain
        params, state = dict(params), dict(state)
        source = state if chain.is_buffer else params
        requires_grad = source[plan.original_keys[0]].requires_grad
        if leave_parametrized:
            values, _ = self.materialize(params, state, training=False)
            value = values[name]
        elif chain.is_tensor:
            value = source[plan.original_keys[0]]
        else:
            raise ValueError(
                f"Cannot leave unparametrized (`leave_parametrized=False`) '{name}', a tensor that is "
                "parametrized in terms of a sequence of tensors."
            )
        for k in plan.original_keys:
            del source[k]
        for keys in plan.step_param_keys:
            for _, k in keys:
                del params[k]
        for keys in plan.step_state_keys:
            for _, k in keys:
                del state[k]
        source[name] = _fresh(value, requires_grad)
        chains = {k: v for k, v in self.chains.items() if k != name}
        layout = {k: v for k, v in self._layout.items() if k != name}
        return Parametrized(self.module, chains, layout), params, state


# ---------------------------------------------------------------------- helpers of registration
def _pick(tree: Mapping[str, Tensor], keys: Sequence[str]) -> list[Tensor]:
    """``[tree[k] for k in keys]``, as a function: torch 2.4's dynamo fails on comprehensions
    that close over a loop variable."""
    return [tree[k] for k in keys]


def _pick_steps(tree: Mapping[str, Tensor], steps: Sequence[Sequence[tuple[str, str]]]) -> list[dict[str, Tensor]]:
    """Per chain step, ``{local name: tree[global key]}``."""
    return [{local: tree[key] for local, key in keys} for keys in steps]


def _slots(module: nn.Module) -> tuple[dict[str, tuple[dict, str]], tuple[tuple[nn.Module, str, nn.Module], ...]]:
    """Every tensor name (aliases included) -> ``(owner._parameters or owner._buffers, leaf)``,
    and the ``(parent, name, child)`` edges leading to those owners (to notice a replaced submodule)."""
    slots = {}
    edges = {}
    for named in (module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)):
        for name, _ in named:
            *path, leaf = name.split(".")
            owner = module
            for part in path:
                child = owner._modules[part]
                edges[(id(owner), part)] = (owner, part, child)
                owner = child
            slots[name] = (owner._parameters if leaf in owner._parameters else owner._buffers, leaf)
    return slots, tuple(edges.values())


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


def _bind(step: Step, module: nn.Module, name: str, value: Tensor) -> Step:
    hook = getattr(step.fn, "for_tensor", None)
    if not callable(hook):
        return step
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return as_step(hook(owner, leaf, value))


def _check_like(value: Any, reference: Tensor, what: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a Tensor, got {_describe(value)}")
    if value.shape != reference.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
    if value.dtype != reference.dtype:
        raise ValueError(f"{what} has dtype {value.dtype}, expected {reference.dtype}")


def _originals_from(new: Any, original: Tensor, name: str) -> tuple[tuple[Tensor, ...], Optional[int]]:
    if isinstance(new, Tensor):
        if new.dtype != original.dtype:
            raise ValueError(
                f"When `right_inverse` outputs one tensor, it may not change the dtype.\n"
                f"tensor: '{name}'\noriginal.dtype: {original.dtype}\nright_inverse(original).dtype: {new.dtype}"
            )
        if new.device != original.device:
            raise ValueError(
                f"When `right_inverse` outputs one tensor, it may not change the device.\n"
                f"tensor: '{name}'\noriginal.device: {original.device}\nright_inverse(original).device: {new.device}"
            )
        return (new,), None
    if not isinstance(new, Sequence) or isinstance(new, (str, bytes)):
        raise ValueError(
            f"'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). "
            f"Got {_describe(new)} for '{name}'."
        )
    for i, t in enumerate(new):
        if not isinstance(t, Tensor):
            raise ValueError(
                f"'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). "
                f"Got element {i} of the sequence with type {_describe(t)} for '{name}'."
            )
        if t.device != original.device:
            raise ValueError(
                f"'right_inverse' of '{name}' may not change the device: element {i} is on {t.device}, "
                f"the original on {original.device}"
            )
    return tuple(new), len(new)


def _check_output(Z: Any, reference: Tensor, name: str, what: str) -> None:
    if not isinstance(Z, Tensor):
        raise ValueError(f"A parametrization must return a tensor. Got {_describe(Z)} for '{name}'.")
    if Z.dtype != reference.dtype:
        raise ValueError(
            f"{what} may not change the dtype of the tensor, unless `unsafe` flag is enabled.\n"
            f"tensor: '{name}'\nunparametrized dtype: {reference.dtype}\nparametrized dtype: {Z.dtype}"
        )
    if Z.shape != reference.shape:
        raise ValueError(
            f"{what} may not change the shape of the tensor, unless `unsafe` flag is enabled.\n"
            f"tensor: '{name}'\nunparametrized shape: {tuple(reference.shape)}\nparametrized shape: {tuple(Z.shape)}"
        )


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
    unknown tensor or a failed check.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"parametrize: module must be an nn.Module, got {_describe(module)}")
    if not isinstance(spec, Mapping):
        raise TypeError(f"parametrize: spec must map tensor names to parametrizations, got {_describe(spec)}")
    net = Parametrized(module, {}, {})
    params, state = net.init()
    seen: dict[str, str] = {}
    for raw_name, chain in spec.items():
        name = net.canonical_name(raw_name)
        if name in seen:
            raise ValueError(f"parametrize: '{raw_name}' and '{seen[name]}' name the same (tied) tensor")
        seen[name] = raw_name
        steps = list(chain) if isinstance(chain, (list, tuple)) else [chain]
        if not steps:
            raise ValueError(f"parametrize: the chain for '{raw_name}' is empty")
        for fn in steps:
            net, params, state = net._register(
                params, state, name, as_step(fn), unsafe, torch.Generator().manual_seed(0)
            )
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
    raise TypeError(f"is_parametrized: expected a Parametrized or an nn.Module, got {_describe(obj)}")
