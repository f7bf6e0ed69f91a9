"""Mode coverage and sample quality of a generator on a 2-D mixture of Gaussians.

The usual protocol (unrolled GAN, VEEGAN, PacGAN): a sample is *high quality* when
it lies within ``n_std`` standard deviations of its nearest mode; a mode is *hit*
when at least ``min_count`` high-quality samples fall on it. Samples of the data
itself score ``P(chi2_2 <= n_std**2)``: 0.989 for ``n_std=3``, the ceiling.

>>> from examples.gan.data import ring
>>> mog = ring(8)
>>> x, _ = mog.sample(2000, torch.Generator().manual_seed(0))
>>> cov = mode_coverage(x, mog)
>>> cov.modes_hit, cov.num_modes, cov.high_quality > 0.98
(8, 8, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .data import GaussianMixture

__all__ = ["Coverage", "mode_coverage"]


@dataclass(frozen=True)
class Coverage:
    """``modes_hit`` of ``num_modes``; ``high_quality``: fraction of samples near a mode;
    ``on_label``: fraction of samples near the mode they were asked for (conditional
    generators, else ``None``); ``counts``: high-quality samples per mode."""

    modes_hit: int
    num_modes: int
    high_quality: float
    on_label: Optional[float]
    counts: list[int]

    def as_dict(self) -> dict:
        return {
            "modes_hit": self.modes_hit,
            "num_modes": self.num_modes,
            "high_quality": self.high_quality,
            "on_label": self.on_label,
            "counts": self.counts,
        }


def mode_coverage(
    samples: Tensor,
    mog: GaussianMixture,
    labels: Optional[Tensor] = None,
    n_std: float = 3.0,
    min_count: int = 20,
) -> Coverage:
    """Score ``samples (n, 2)`` against ``mog``; ``labels (n,)`` are the modes asked for, if any."""
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"mode_coverage: samples must have shape (n, 2), got {tuple(samples.shape)}")
    if labels is not None and labels.shape != samples.shape[:1]:
        raise ValueError(f"mode_coverage: labels must have shape ({samples.shape[0]},), got {tuple(labels.shape)}")
    samples = samples.detach().to(mog.centers.dtype)
    distance = torch.cdist(samples, mog.centers)  # (n, K)
    nearest_distance, nearest = distance.min(dim=1)
    good = nearest_distance <= n_std * mog.std
    counts = torch.bincount(nearest[good], minlength=mog.num_modes)
    on_label = None
    if labels is not None:
        on_label = float((good & (nearest == labels.to(nearest.device))).float().mean())
    return Coverage(
        modes_hit=int((counts >= min_count).sum()),
        num_modes=mog.num_modes,
        high_quality=float(good.float().mean()),
        on_label=on_label,
        counts=[int(c) for c in counts],
    )
