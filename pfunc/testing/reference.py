"""A reference built from ``torch.nn.utils.parametrize``: the torch version of a parametrization.

pfunc's state keys are the buffer names of the torch parametrization module
(``_u``, ``_v``, ``base``...), so the torch twin is run with pfunc's originals
and state copied into it, and its new buffers come back as the new state.

>>> import torch
>>> from torch.nn.utils import parametrizations as P
>>> from pfunc.parametrizations import SpectralNorm
>>> from pfunc.testing import check_parametrization, strategies as S
>>> ref = torch_reference(lambda m: P.spectral_norm(m))
>>> report = check_parametrization(SpectralNorm(), S.spectral_gap_matrices(3, 2), reference=ref,
...                                properties=["matches_reference"], max_examples=3)
>>> report.checked
{'forward_runs': 3, 'matches_reference': 3}
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

from .subject import TENSOR_NAME, Holder

__all__ = ["torch_reference"]

State = Union[dict[str, Tensor], list[dict[str, Tensor]]]


def torch_reference(register: Callable[[nn.Module], Any]) -> Callable[..., Any]:
    """``reference(*originals, state=None, training=False)`` running the torch twin.

    ``register(module)`` puts the torch parametrization(s) on ``module.weight`` (e.g.
    ``lambda m: torch.nn.utils.parametrizations.orthogonal(m)``, or several
    ``torch.nn.utils.parametrize.register_parametrization`` calls for a chain). One
    twin is built per shape, dtype and device; each call copies the originals and
    ``state`` (one dict, or one per parametrization) into it and returns ``Y``, or
    ``(Y, new_state)`` when a state is given.
    """
    twins: dict[tuple[Any, ...], nn.Module] = {}

    def twin_for(originals: tuple[Tensor, ...]) -> nn.Module:
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in originals)
        if key not in twins:
            holder = Holder(originals[0] if len(originals) == 1 else _value_placeholder(originals))
            register(holder)
            if not torch_parametrize.is_parametrized(holder, TENSOR_NAME):
                raise ValueError(f"torch_reference: register(module) must parametrize module.{TENSOR_NAME}")
            twins[key] = holder
        return twins[key]

    def reference(*originals: Tensor, state: Optional[State] = None, training: bool = False) -> Any:
        holder = twin_for(originals)
        plist = holder.parametrizations[TENSOR_NAME]
        with torch.no_grad():
            if plist.is_tensor:
                plist.original.copy_(originals[0])
            else:
                for i, x in enumerate(originals):
                    getattr(plist, f"original{i}").copy_(x)
            per_step = [] if state is None else ([state] if isinstance(state, dict) else list(state))
            for module, s in zip(plist, per_step):
                for k, v in s.items():
                    getattr(module, k).copy_(v)
        holder.train(training)
        with torch.no_grad():
            Y = getattr(holder, TENSOR_NAME).detach().clone()
        if state is None:
            return Y
        new = [{k: getattr(module, k).detach().clone() for k in s} for module, s in zip(plist, per_step)]
        return Y, (new[0] if isinstance(state, dict) else new)

    return reference


def _value_placeholder(originals: tuple[Tensor, ...]) -> Tensor:
    """A stand-in value for a parametrization of several originals: the one with most entries
    (weight norm's ``v``, not ``g``); ties go to the last."""
    return max(reversed(originals), key=lambda x: (x.numel(), x.ndim))
