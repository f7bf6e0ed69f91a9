"""Registration: registering, assigning through and removing parametrizations, with torch's checks.

torch checks a parametrization when it is registered (the dtype and shape it gives, what its
``right_inverse`` returns) and when a value is assigned through it. These are those operations
and checks, as pure functions of a net and its ``(params, state)``; :class:`pfunc.Parametrized`'s
``register``, ``assign``, ``remove`` and ``init`` are them. Where pfunc raises for the reason torch
raises, torch's message is kept whole (users and tests match on it) and the tensor's name is added
after it (:func:`_naming`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .chain import Chain, Step, as_step
from .tree import original_key, pick, pick_steps, step_key
from .validation import check_mapping

__all__ = [
    "fresh",
    "describe",
    "step_for",
    "bind",
    "check_like",
    "originals_from",
    "check_output",
    "check_chained_output",
    "check_right_inverse_output",
    "check_assigned_originals",
    "assign_values",
    "register_step",
    "remove_chain",
]


def _naming(torch_message: str, name: str) -> str:
    """torch's ``torch_message`` unchanged, then the tensor it is about."""
    return f"{torch_message}\ntensor: '{name}'"


@contextlib.contextmanager
def failures_named(name: str, index: int, step: Step, what: str) -> Iterator[None]:
    """Within the block, an exception raised by step ``index`` of tensor ``name``'s chain is raised
    again with the tensor and the step named before its message (same type, the original chained);
    ``NotImplementedError`` passes as it is (a ``right_inverse`` saying it has no inverse)."""
    try:
        yield
    except NotImplementedError:
        raise
    except Exception as e:
        prefix = f"'{name}': parametrization {index} ({step.name}) failed in {what}: "
        try:
            named = type(e)(prefix + str(e))
        except Exception:  # an exception type that is not built from a message: annotate it instead
            if hasattr(e, "add_note"):
                e.add_note(prefix.rstrip(": "))
            raise e
        raise named from e


def fresh(t: Tensor, requires_grad: bool) -> Tensor:
    """A detached copy of ``t``, a leaf that requires grad when asked and when its dtype can."""
    return t.detach().clone().requires_grad_(requires_grad and (t.is_floating_point() or t.is_complex()))


def describe(x: Any) -> str:
    return type(x).__name__


def step_for(fn: Any, name: str) -> Step:
    """``fn`` as a :class:`Step`, or a ``TypeError`` naming the tensor it was given for."""
    try:
        return as_step(fn)
    except TypeError as e:
        raise TypeError(f"the parametrization given for '{name}' is not usable: {e}") from None


def bind(step: Step, module: nn.Module, name: str, value: Tensor) -> Step:
    """The step a ``for_tensor(owner, leaf, value)`` hook resolves for tensor ``name`` of ``module``."""
    hook = getattr(step.fn, "for_tensor", None)
    if not callable(hook):
        return step
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return step_for(hook(owner, leaf, value), name)


def check_like(value: Any, reference: Tensor, what: str) -> None:
    """``value`` is a tensor of ``reference``'s shape and dtype, or an error naming ``what``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a Tensor, got {describe(value)}")
    if value.shape != reference.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
    if value.dtype != reference.dtype:
        raise ValueError(f"{what} has dtype {value.dtype}, expected {reference.dtype}")


def originals_from(new: Any, original: Tensor, name: str) -> tuple[tuple[Tensor, ...], Optional[int]]:
    """``(originals, n)`` from what the first step's ``right_inverse`` gave: one tensor (``n`` is
    ``None``: stored as ``original``) or a sequence (``original0``...); torch's checks."""
    if isinstance(new, Tensor):
        if new.dtype != original.dtype:
            raise ValueError(_naming(
                f"When `right_inverse` outputs one tensor, it may not change the dtype.\n"
                f"original.dtype: {original.dtype}\nright_inverse(original).dtype: {new.dtype}", name
            ))
        if new.device != original.device:
            raise ValueError(_naming(
                f"When `right_inverse` outputs one tensor, it may not change the device.\n"
                f"original.device: {original.device}\nright_inverse(original).device: {new.device}", name
            ))
        return (new,), None
    if not isinstance(new, Sequence) or isinstance(new, (str, bytes)):
        raise ValueError(_naming(
            f"'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). Got {describe(new)}", name
        ))
    for i, t in enumerate(new):
        if not isinstance(t, Tensor):
            raise ValueError(_naming(
                f"'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). "
                f"Got element {i} of the sequence with type {describe(t)}.", name
            ))
        if t.device != original.device:
            raise ValueError(
                f"'right_inverse' of '{name}' may not change the device: element {i} is on {t.device}, "
                f"the original on {original.device}"
            )
    return tuple(new), len(new)


def check_output(Z: Any, reference: Tensor, name: str) -> None:
    """A parametrization registered on a plain tensor keeps its dtype and shape (the check ``unsafe`` skips)."""
    if not isinstance(Z, Tensor):
        raise ValueError(_naming(f"A parametrization must return a tensor. Got {describe(Z)}.", name))
    if Z.dtype != reference.dtype:
        raise ValueError(_naming(
            "Registering a parametrization may not change the dtype of the tensor, unless `unsafe` flag is enabled.\n"
            f"unparametrized dtype: {reference.dtype}\nparametrized dtype: {Z.dtype}", name
        ))
    if Z.shape != reference.shape:
        raise ValueError(_naming(
            "Registering a parametrization may not change the shape of the tensor, unless `unsafe` flag is enabled.\n"
            f"unparametrized shape: {reference.shape}\nparametrized shape: {Z.shape}", name
        ))


def check_chained_output(X: Any, current: Tensor, name: str) -> None:
    """A parametrization appended to a chain keeps the parametrized tensor's dtype and shape."""
    if not isinstance(X, Tensor):
        raise ValueError(_naming(f"A parametrization must return a tensor. Got {describe(X)}.", name))
    if X.dtype != current.dtype:
        raise ValueError(_naming(
            "Registering a parametrization may not change the dtype of the tensor, unless the `unsafe` flag is enabled.\n"
            f"module.{name}.dtype: {current.dtype}\nparametrization(module.{name}).dtype: {X.dtype}", name
        ))
    if X.shape != current.shape:
        raise ValueError(_naming(
            "Registering a parametrization may not change the shape of the tensor, unless the `unsafe` flag is enabled.\n"
            f"module.{name}.shape: {current.shape}\nparametrization(module.{name}).shape: {X.shape}", name
        ))


def check_right_inverse_output(Z: Any, current: Tensor, name: str) -> None:
    """A step appended to a chain: its ``right_inverse`` gives one tensor of the chain's dtype and shape."""
    if not isinstance(Z, Tensor):
        raise ValueError(_naming(f"parametrization.right_inverse must return a tensor. Got: {describe(Z)}", name))
    if Z.dtype != current.dtype:
        raise ValueError(_naming(
            "The tensor returned by parametrization.right_inverse must have the same dtype "
            f"as module.{name}, unless the `unsafe` flag is enabled.\n"
            f"module.{name}.dtype: {current.dtype}\nreturned dtype: {Z.dtype}", name
        ))
    if Z.shape != current.shape:
        raise ValueError(_naming(
            "The tensor returned by parametrization.right_inverse must have the same shape "
            f"as module.{name}, unless the `unsafe` flag is enabled.\n"
            f"module.{name}.shape: {current.shape}\nreturned shape: {Z.shape}", name
        ))


def check_assigned_originals(
    name: str, raw_name: str, keys: Sequence[str], old: Sequence[Tensor], new: Any, is_tensor: bool, unsafe: bool
) -> tuple[Tensor, ...]:
    """The originals ``right_inverse`` gave for an assigned value, checked against the current ones."""
    if is_tensor:
        if not isinstance(new, Tensor):
            raise ValueError(_naming(f"`right_inverse` should return a tensor. Got {describe(new)}", name))
        new = (new,)
    else:
        if not isinstance(new, Sequence) or isinstance(new, Tensor):
            raise ValueError(_naming(f"'right_inverse' must return a sequence of tensors. Got {describe(new)}.", name))
        if len(new) != len(old):
            raise ValueError(_naming(
                f"'right_inverse' must return a sequence of tensors of length "
                f"{len(old)}. Got a sequence of length {len(new)}.", name
            ))
    for i, (key, o, n) in enumerate(zip(keys, old, new)):
        if not isinstance(n, Tensor):
            raise ValueError(_naming(
                f"'right_inverse' must return a sequence of tensors or reference-type opaques. "
                f"Got element {i} of type {describe(n)}.", name
            ))
        if n.dtype != o.dtype:
            raise ValueError(_naming(
                f"The tensor returned by `right_inverse` has dtype {n.dtype} while `original` has dtype {o.dtype}"
                if is_tensor
                else f"Tensor {i} returned by `right_inverse` has dtype {n.dtype} while `original{i}` has dtype {o.dtype}",
                name,
            ))
        if n.shape != o.shape and not unsafe:
            raise ValueError(
                f"assign: the value for '{raw_name}' gives '{key}' the shape {tuple(n.shape)}, but the "
                f"original has shape {tuple(o.shape)} (register with unsafe=True to allow it)"
            )
    return tuple(new)


# ---------------------------------------------------------------------- the operations on a net
def assign_values(
    net: Any,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    updates: Mapping[str, Tensor],
    generator: Optional[torch.Generator],
) -> tuple[dict, dict]:
    """:meth:`pfunc.Parametrized.assign`."""
    net.check_keys(params, state)
    check_mapping("updates", updates)
    params, state = dict(params), dict(state)
    for raw_name, value in updates.items():
        name = net.canonical_name(raw_name)
        where = net._where(name)
        if not isinstance(value, Tensor):
            raise TypeError(f"assign: value for '{raw_name}' must be a Tensor, got {describe(value)}")
        if where in ("params", "state"):
            tree = params if where == "params" else state
            check_like(value, tree[name], f"assign: value for '{raw_name}'")
            tree[name] = fresh(value, tree[name].requires_grad)
            continue
        plan = next(p for p in net._plans if p.name == name)
        chain = plan.chain
        sp = pick_steps(params, plan.step_param_keys)
        ss = pick_steps(state, plan.step_state_keys)
        with torch.no_grad():
            new, ss_new = _chain_right_inverse(chain, name, value, sp, ss, generator)
        source = state if chain.is_buffer else params
        old = pick(source, plan.original_keys)
        new = check_assigned_originals(name, raw_name, plan.original_keys, old, new, chain.is_tensor, any(chain.unsafe))
        for key, o, n in zip(plan.original_keys, old, new):
            source[key] = fresh(n, o.requires_grad)
        for keys, s in zip(plan.step_state_keys, ss_new):
            for l, k in keys:
                state[k] = s[l].detach()
    return params, state


def register_step(
    net: Any,
    params: dict,
    state: dict,
    name: str,
    step: Step,
    unsafe: bool,
    generator: Optional[torch.Generator],
) -> tuple[Any, dict, dict]:
    """:meth:`pfunc.Parametrized.register` of one step on canonical ``name`` (no key checks)."""
    where = net._where(name)
    params, state = dict(params), dict(state)
    chains, layout, shapes = dict(net.chains), dict(net._layout), dict(net._shapes)
    if where == "chain":
        current = net.materialize(params, state, training=False)[0][name].detach()
    else:
        current = (params if where == "params" else state)[name]
    step = bind(step, net.module, name, current)
    sp, ss = step.init(current, generator)
    if where != "chain":
        new = current  # no right_inverse, or one that raises NotImplementedError: the identity (as torch)
        with torch.no_grad():
            if step.has_right_inverse:
                try:
                    with failures_named(name, 0, step, "right_inverse"):
                        new, ss = step.right_inverse(current, sp, ss, generator)
                except NotImplementedError:
                    pass
        originals, n_originals = originals_from(new, current, name)
        chain = Chain((step,), n_originals, is_buffer=(where == "state"), unsafe=(unsafe,))
        if not unsafe:
            with torch.no_grad(), failures_named(name, 0, step, "forward"):
                Z, _ = chain.forward(originals, [sp], [ss], training=False)
            check_output(Z, current, name)
        tree = state if where == "state" else params
        del tree[name]
        shapes.pop(name, None)
        for o, t in zip(chain.original_names, originals):
            tree[original_key(name, o)] = fresh(t, current.requires_grad)
            if where == "params":
                shapes[original_key(name, o)] = t.shape
        chains[name] = chain
        layout[name] = ((tuple(sp),), (tuple(ss),))
    else:
        if not unsafe:
            index = len(net.chains[name].steps)
            with torch.no_grad():
                with failures_named(name, index, step, "forward"):
                    X, _ = step.forward((current,), sp, ss, False)
                check_chained_output(X, current, name)
                if step.has_right_inverse:
                    try:
                        with failures_named(name, index, step, "right_inverse"):
                            Z, _ = step.right_inverse(X, sp, ss, generator)
                    except NotImplementedError:
                        pass
                    else:
                        check_right_inverse_output(Z, current, name)
        old = chains[name]
        chains[name] = Chain(old.steps + (step,), old.n_originals, old.is_buffer, old.unsafe + (unsafe,))
        pnames, snames = layout[name]
        layout[name] = (pnames + (tuple(sp),), snames + (tuple(ss),))
    index = len(chains[name].steps) - 1
    for l, t in sp.items():
        params[step_key(name, index, l)] = t
        shapes[step_key(name, index, l)] = t.shape
    for l, t in ss.items():
        state[step_key(name, index, l)] = t.detach()
    return net._derive(chains, layout, shapes), params, state


def remove_chain(
    net: Any,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    name: str,
    leave_parametrized: bool,
) -> tuple[Any, dict, dict]:
    """:meth:`pfunc.Parametrized.remove`."""
    net.check_keys(params, state)
    name = net.canonical_name(name)
    if name not in net.chains:
        net._where(name)  # unknown names get the "does not have" error
        raise ValueError(f"Module {type(net.module).__name__} does not have a parametrization on {name}")
    plan = next(p for p in net._plans if p.name == name)
    chain = plan.chain
    params, state = dict(params), dict(state)
    source = state if chain.is_buffer else params
    requires_grad = source[plan.original_keys[0]].requires_grad
    if leave_parametrized:
        value = net.materialize(params, state, training=False)[0][name]
    elif chain.is_tensor:
        value = source[plan.original_keys[0]]
    else:
        raise ValueError(_naming(
            "Cannot leave unparametrized (`leave_parametrized=False`) a tensor that is "
            "parametrized in terms of a sequence of tensors.", name
        ))
    dropped = [*plan.original_keys, *(k for keys in plan.step_param_keys for _, k in keys)]
    for k in plan.original_keys:
        del source[k]
    for keys in plan.step_param_keys:
        for _, k in keys:
            del params[k]
    for keys in plan.step_state_keys:
        for _, k in keys:
            del state[k]
    source[name] = fresh(value, requires_grad)
    shapes = {k: s for k, s in net._shapes.items() if k not in dropped}
    if not chain.is_buffer:
        shapes[name] = value.shape
    chains = {k: v for k, v in net.chains.items() if k != name}
    layout = {k: v for k, v in net._layout.items() if k != name}
    return net._derive(chains, layout, shapes), params, state


def _chain_right_inverse(
    chain: Chain, name: str, value: Tensor, params: Sequence[dict], state: Sequence[dict], generator: Optional[torch.Generator]
) -> tuple[Any, list[dict]]:
    """``chain.right_inverse``, last step first, with a failing step named (see :func:`failures_named`)."""
    new_state = list(state)
    x: Any = value
    for i in reversed(range(len(chain.steps))):
        with failures_named(name, i, chain.steps[i], "right_inverse"):
            x, new_state[i] = chain.steps[i].right_inverse(x, params[i], state[i], generator)
    return x, new_state
