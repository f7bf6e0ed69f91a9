"""Registration rules: what ``register_parametrization`` checks, as pure functions over tensors.

torch checks a parametrization when it is registered (the dtype and shape it gives, what its
``right_inverse`` returns) and when a value is assigned through it. These are those checks,
with torch's messages, each naming the tensor; :class:`pfunc.Parametrized` calls them from
``parametrize``, ``register``, ``assign`` and ``init``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .chain import Step, as_step

__all__ = [
    "fresh",
    "describe",
    "step_for",
    "bind",
    "check_like",
    "originals_from",
    "check_output",
    "check_right_inverse_output",
    "check_assigned_originals",
]


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
            f"Got {describe(new)} for '{name}'."
        )
    for i, t in enumerate(new):
        if not isinstance(t, Tensor):
            raise ValueError(
                f"'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). "
                f"Got element {i} of the sequence with type {describe(t)} for '{name}'."
            )
        if t.device != original.device:
            raise ValueError(
                f"'right_inverse' of '{name}' may not change the device: element {i} is on {t.device}, "
                f"the original on {original.device}"
            )
    return tuple(new), len(new)


def check_output(Z: Any, reference: Tensor, name: str, what: str) -> None:
    """A parametrization's output keeps the tensor's dtype and shape (the check ``unsafe`` skips)."""
    if not isinstance(Z, Tensor):
        raise ValueError(f"A parametrization must return a tensor. Got {describe(Z)} for '{name}'.")
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


def check_right_inverse_output(Z: Any, current: Tensor, name: str) -> None:
    """A step appended to a chain: its ``right_inverse`` gives one tensor of the chain's dtype and shape."""
    if not isinstance(Z, Tensor):
        raise ValueError(f"parametrization.right_inverse for '{name}' must return a tensor. Got: {describe(Z)}")
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


def check_assigned_originals(
    name: str, raw_name: str, keys: Sequence[str], old: Sequence[Tensor], new: Any, is_tensor: bool, unsafe: bool
) -> tuple[Tensor, ...]:
    """The originals ``right_inverse`` gave for an assigned value, checked against the current ones."""
    if is_tensor:
        if not isinstance(new, Tensor):
            raise ValueError(f"'right_inverse' of '{name}' must return a tensor. Got {describe(new)}.")
        new = (new,)
    else:
        if not isinstance(new, Sequence) or isinstance(new, Tensor):
            raise ValueError(f"'right_inverse' of '{name}' must return a sequence of tensors. Got {describe(new)}.")
        if len(new) != len(old):
            raise ValueError(
                f"'right_inverse' of '{name}' must return a sequence of tensors of length "
                f"{len(old)}. Got a sequence of length {len(new)}."
            )
    for key, o, n in zip(keys, old, new):
        if not isinstance(n, Tensor):
            raise ValueError(f"'right_inverse' of '{name}' must return tensors; '{key}' got {describe(n)}.")
        if n.dtype != o.dtype:
            raise ValueError(
                f"The tensor returned by 'right_inverse' for '{key}' has dtype {n.dtype} "
                f"while the original has dtype {o.dtype}"
            )
        if n.shape != o.shape and not unsafe:
            raise ValueError(
                f"assign: the value for '{raw_name}' gives '{key}' the shape {tuple(n.shape)}, but the "
                f"original has shape {tuple(o.shape)} (register with unsafe=True to allow it)"
            )
    return tuple(new)
