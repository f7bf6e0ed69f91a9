"""Random draws from an explicit ``torch.Generator``, placed on any device."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["normal", "bernoulli"]


def _device_of(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def normal(shape: tuple[int, ...], like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal draws of ``shape`` with ``like``'s dtype and device.

    Drawn on the generator's own device (CPU for ``None``, i.e. the global RNG) and
    moved, so one CPU generator seeds state for tensors on any device.
    """
    dtype = like.dtype if like.is_floating_point() or like.is_complex() else torch.get_default_dtype()
    out = torch.randn(shape, generator=generator, dtype=dtype, device=_device_of(generator))
    return out.to(like.device)


def bernoulli(probability: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """0/1 draws with ``probability`` (elementwise), same dtype and device as ``probability``."""
    p = probability.detach().to(_device_of(generator))
    return torch.bernoulli(p, generator=generator).to(probability.device)
