"""What modules and stateful parametrizations hold: spectral-norm states, every tensor of a module,
the ``(params, state)`` of a :class:`pfunc.Parametrized`."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor, nn

from .structured import unit_vectors
from .tensors import DEFAULT_BOUND, DeviceLike, DTypeLike, ShapeLike, _check_dtype, _draw, tensors

__all__ = ["spectral_norm_states", "module_tensors", "parametrized_trees"]


@st.composite
def spectral_norm_states(
    draw: Any, spectral_norm: Any, shape: ShapeLike, *, dtype: DTypeLike = torch.float64, device: DeviceLike = "cpu"
) -> dict[str, Tensor]:
    """A state for ``spectral_norm`` (a :class:`pfunc.parametrizations.SpectralNorm`) on a tensor of ``shape``:

    torch mode ``{"_u": (h,), "_v": (w,)}`` unit vectors; BigGAN mode
    ``{"u": (num_svs, h)`` unit rows, ``"sv": (num_svs,)`` in ``[0.1, 10]}``;
    ``{}`` for a 1-D tensor. ``(h, w)`` is ``spectral_norm.matrix`` of the tensor.
    """
    shape = tuple(_draw(draw, shape))
    dtype = _check_dtype(_draw(draw, dtype), "spectral_norm_states")
    if len(shape) <= 1:
        return {}
    h, w = spectral_norm.matrix(torch.zeros(shape, dtype=dtype)).shape
    if spectral_norm.mode == "biggan":
        k = spectral_norm.num_svs
        u = draw(unit_vectors(h, batch_shape=(k,), dtype=dtype, device=device))
        sv = draw(tensors((k,), dtype=dtype, device=device, min_value=0.1, max_value=10.0))
        return {"u": u, "sv": sv}
    return {
        "_u": draw(unit_vectors(h, dtype=dtype, device=device)),
        "_v": draw(unit_vectors(w, dtype=dtype, device=device)),
    }


def module_tensors(
    module: nn.Module,
    *,
    params: bool = True,
    buffers: bool = True,
    min_value: float = -DEFAULT_BOUND,
    max_value: float = DEFAULT_BOUND,
) -> SearchStrategy[dict[str, Tensor]]:
    """``{name: tensor}`` for every parameter (and buffer) of ``module``: same shapes, dtypes,
    devices and ``requires_grad``, floating entries drawn (others, like ``num_batches_tracked``, copied).

    Usable as ``values`` of :meth:`pfunc.Parametrized.init` or with ``torch.func.functional_call``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_tensors: module must be an nn.Module, got {type(module).__name__}")
    named: dict[str, tuple[Tensor, bool]] = {}
    if params:
        named.update((n, (p, p.requires_grad)) for n, p in module.named_parameters())
    if buffers:
        named.update((n, (b, False)) for n, b in module.named_buffers())

    def one(t: Tensor, requires_grad: bool) -> SearchStrategy[Tensor]:
        if not t.is_floating_point():
            return st.just(t).map(lambda x: x.detach().clone())
        return tensors(
            tuple(t.shape), dtype=t.dtype, device=t.device, min_value=min_value, max_value=max_value
        ).map(lambda x: x.requires_grad_(requires_grad))

    return st.fixed_dictionaries({n: one(t, rg) for n, (t, rg) in named.items()})


@st.composite
def parametrized_trees(draw: Any, net: Any, **kwargs: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, state)`` of a :class:`pfunc.Parametrized`: drawn module tensors put through
    ``net.init(values=..., generator=...)`` with a drawn seed; keyword arguments as :func:`module_tensors`."""
    values = draw(module_tensors(net.module, **kwargs))
    seed = draw(st.integers(0, 2**32 - 1))
    return net.init(values=values, generator=torch.Generator().manual_seed(seed))
