"""Elementwise constraints: positivity, bounded intervals, and pruning masks.

>>> import torch
>>> p = Positive()
>>> y = torch.tensor([0.5, 2.0])
>>> bool(torch.allclose(p(p.right_inverse(y)), y))
True
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampling import bernoulli

__all__ = ["Positive", "Bounded", "Mask"]


class Positive:
    """``X -> softplus(X)`` (default) or ``exp(X)``: strictly positive values (at least the
    dtype's smallest normal number, where the map underflows).

    ``right_inverse`` is the exact inverse on positive values (``log(expm1(y))``,
    computed stably, or ``log(y)``).
    """

    def __init__(self, kind: Literal["softplus", "exp"] = "softplus"):
        if kind not in ("softplus", "exp"):
            raise ValueError(f"Positive: kind must be 'softplus' or 'exp', got {kind!r}")
        self.kind = kind

    def __repr__(self) -> str:
        return f"Positive({self.kind!r})"

    def forward(self, X: Tensor) -> Tensor:
        Y = F.softplus(X) if self.kind == "softplus" else torch.exp(X)
        # softplus(-104) and exp(-104) underflow to 0 in float32: keep the promise of Y > 0
        return Y.clamp_min(torch.finfo(Y.dtype).tiny)

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        if self.kind == "exp":
            return torch.log(Y)
        return Y + torch.log(-torch.expm1(-Y))


class Bounded:
    """``X -> low + (high - low) * sigmoid(X)``: values in the open interval ``(low, high)``
    (where the sigmoid saturates, the representable values next to the bounds)."""

    def __init__(self, low: float, high: float):
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"Bounded: need finite low < high, got low={low!r}, high={high!r}")
        self.low = float(low)
        self.high = float(high)

    def __repr__(self) -> str:
        return f"Bounded({self.low}, {self.high})"

    def forward(self, X: Tensor) -> Tensor:
        Y = self.low + (self.high - self.low) * torch.sigmoid(X)
        # in float32 sigmoid(17) == 1 (and 1 - sigmoid(-17)... == 0): keep the promise of the open
        # interval with the representable values just inside it
        low = torch.tensor(self.low, dtype=Y.dtype, device=Y.device)
        high = torch.tensor(self.high, dtype=Y.dtype, device=Y.device)
        return Y.clamp(torch.nextafter(low, high), torch.nextafter(high, low))

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        return torch.logit((Y - self.low) / (self.high - self.low))


class Mask:
    """``X -> X * mask``: pruning, as the tutorial's ``PruningParametrization``.

    The mask lives in the state (``{"mask": ...}``, torch.prune's ``weight_mask``),
    so it moves with ``.to(device)`` and stacks for ensembles. Give it directly,
    or let ``init_state`` draw it: each entry is kept with probability
    ``1 - p_drop`` from the explicit generator. ``right_inverse`` is the identity
    (as the tutorial: ``forward(right_inverse(A)) == A`` only where ``A`` is zero
    on the pruned entries). The mask never changes, in training or eval.
    """

    def __init__(self, mask: Optional[Tensor] = None, *, p_drop: float = 0.2):
        if mask is None and not 0.0 <= p_drop <= 1.0:
            raise ValueError(f"Mask: p_drop must be in [0, 1], got {p_drop!r}")
        self.mask = mask
        self.p_drop = p_drop

    def __repr__(self) -> str:
        return "Mask(mask=...)" if self.mask is not None else f"Mask(p_drop={self.p_drop})"

    def init_state(self, X: Tensor, *, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        if self.mask is not None:
            if self.mask.shape != X.shape:
                raise ValueError(f"Mask: mask has shape {tuple(self.mask.shape)}, the tensor {tuple(X.shape)}")
            return {"mask": self.mask.to(dtype=X.dtype, device=X.device)}
        keep = torch.full(X.shape, 1.0 - self.p_drop, dtype=X.dtype, device=X.device)
        return {"mask": bernoulli(keep, generator)}

    def forward(self, X: Tensor, state: dict[str, Tensor], *, training: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        return X * state["mask"], state

    def right_inverse(
        self, Y: Tensor, state: dict[str, Tensor], *, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return Y, state
