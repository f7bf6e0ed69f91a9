"""Training data of the GAN: 2-D mixtures of Gaussians (labelled by mode), and images.

>>> mog = ring(8)
>>> x, label = mog.sample(5, torch.Generator().manual_seed(0))
>>> x.shape, label.shape, mog.num_modes
(torch.Size([5, 2]), torch.Size([5]), 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "ring", "grid", "mixture"]


@dataclass(frozen=True)
class GaussianMixture:
    """Equal-weight isotropic Gaussians: ``centers (K, 2)``, one ``std`` for all modes."""

    centers: Tensor
    std: float

    @property
    def num_modes(self) -> int:
        return self.centers.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(points (n, 2), mode index (n,))``, modes drawn uniformly."""
        label = torch.randint(0, self.num_modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=self.centers.dtype)
        return self.centers[label] + self.std * noise, label


def ring(num_modes: int = 8, radius: float = 2.0, std: float = 0.02) -> GaussianMixture:
    """``num_modes`` Gaussians evenly spaced on a circle (the 8-mode ring of the unrolled-GAN papers)."""
    if num_modes < 1:
        raise ValueError(f"ring: num_modes must be positive, got {num_modes}")
    angle = torch.arange(num_modes, dtype=torch.float32) * (2 * math.pi / num_modes)
    return GaussianMixture(radius * torch.stack([angle.cos(), angle.sin()], dim=-1), std)


def grid(side: int = 5, spacing: float = 2.0, std: float = 0.05) -> GaussianMixture:
    """``side x side`` Gaussians on a square grid centred at 0 (the 25-mode grid for ``side=5``)."""
    if side < 1:
        raise ValueError(f"grid: side must be positive, got {side}")
    coords = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(coords, coords, indexing="ij")
    return GaussianMixture(torch.stack([gx.flatten(), gy.flatten()], dim=-1), std)


def mixture(name: str) -> GaussianMixture:
    """The named 2-D data set: ``"ring8"`` or ``"grid25"``."""
    if name == "ring8":
        return ring(8)
    if name == "grid25":
        return grid(5)
    raise ValueError(f"mixture: unknown 2-D data set {name!r}; expected 'ring8' or 'grid25'")
