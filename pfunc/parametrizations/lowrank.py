"""Low-rank adapters: a frozen weight plus a trainable low-rank update.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021), as Hugging Face's
peft initialises it: ``W = W0 + (alpha / rank) * B @ A`` with ``A`` drawn as a Linear layer's weight
(kaiming-uniform, ``a = sqrt(5)``) and ``B`` zero, so the adapted weight starts equal to ``W0``.
The three are the parametrization's originals, so one net holds the base and the adapter, and an
ensemble can share the base across members while stacking ``A`` and ``B``
(``pf.ensemble.init(..., in_dims=(shared, 0))``): N adapters on one frozen model, trained in one
vmapped step.

>>> import torch, pfunc as pf
>>> net = pf.parametrize(torch.nn.Linear(6, 4), {"weight": LowRankAdapter(rank=2)})
>>> params, state = net.init(generator=torch.Generator().manual_seed(0))
>>> [tuple(params[f"parametrizations.weight.original{i}"].shape) for i in range(3)]   # W0, A, B
[(4, 6), (2, 6), (4, 2)]
>>> bool(torch.equal(net.materialize(params, state)[0]["weight"], net.module.weight))  # B = 0: W0 itself
True
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LowRankAdapter"]


class LowRankAdapter:
    """``(W0, A, B) -> W0 + (alpha / rank) * B @ A`` on a matrix ``W0`` of shape ``(out, in)``:
    ``A`` is ``(rank, in)``, ``B`` is ``(out, rank)`` (stored as ``original0``, ``original1``,
    ``original2``).

    ``right_inverse(W) = (W, A, 0)`` with ``A`` kaiming-uniform (``a = sqrt(5)``, as peft), drawn from
    the global RNG, which pfunc seeds from ``init``'s generator. Freeze or share ``original0``; train
    ``original1`` and ``original2``. ``alpha`` defaults to ``rank`` (scale 1).
    """

    def __init__(self, rank: int, alpha: Optional[float] = None):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LowRankAdapter: rank must be a positive int, got {rank!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank

    def __repr__(self) -> str:
        return f"LowRankAdapter(rank={self.rank}, alpha={self.alpha:g})"

    def forward(self, W0: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return W0 + self.scaling * (B @ A)

    __call__ = forward

    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if W.ndim != 2:
            raise ValueError(f"LowRankAdapter needs a matrix (out, in); got shape {tuple(W.shape)}")
        out_features, in_features = W.shape
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on (rank, in): U(-1/sqrt(in), 1/sqrt(in))
        A = torch.empty(self.rank, in_features, dtype=W.dtype, device=W.device).uniform_(-bound, bound)
        B = torch.zeros(out_features, self.rank, dtype=W.dtype, device=W.device)
        return W, A, B
