"""Class-conditional generators and projection discriminators, for 2-D points and for images.

The discriminators are Miyato & Koyama's projection discriminator, as in BigGAN:
``D(x, y) = head(phi(x)) + <embed(y), phi(x)>``; with ``num_classes=0`` the
projection term is left out. The modules are plain torch: spectral norm is put on
them from outside, with :func:`pfunc.spectral.spectral_norm_spec`.

>>> G, D = MLPGenerator(z_dim=4, hidden=16, num_classes=8), MLPDiscriminator(hidden=16, num_classes=8)
>>> y = torch.tensor([0, 7])
>>> x = G(torch.randn(2, 4), y)
>>> x.shape, D(x, y).shape
(torch.Size([2, 2]), torch.Size([2]))
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["MLPGenerator", "MLPDiscriminator", "ConvGenerator", "ConvDiscriminator"]


def _check_labels(y: Optional[Tensor], num_classes: int, who: str) -> None:
    if num_classes and y is None:
        raise ValueError(f"{who}: class-conditional (num_classes={num_classes}) but no labels y were given")


class MLPGenerator(nn.Module):
    """``(z (B, z_dim), y (B,)) -> x (B, out_dim)``: an MLP on ``z`` concatenated with a class embedding."""

    def __init__(self, z_dim: int = 8, hidden: int = 128, num_classes: int = 0, out_dim: int = 2, depth: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        sizes = [z_dim * (2 if num_classes else 1)] + [hidden] * (depth - 1)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))

    def forward(self, z: Tensor, y: Optional[Tensor] = None) -> Tensor:
        _check_labels(y, self.num_classes, "MLPGenerator")
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=-1)
        return self.body(z)


class MLPDiscriminator(nn.Module):
    """``(x (B, in_dim), y (B,)) -> score (B,)``: MLP features, a linear head and the class projection."""

    def __init__(self, hidden: int = 128, num_classes: int = 0, in_dim: int = 2, depth: int = 3):
        super().__init__()
        self.num_classes = num_classes
        sizes = [in_dim] + [hidden] * (depth - 1)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], 1)
        self.embed = nn.Embedding(num_classes, sizes[-1]) if num_classes else None

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        _check_labels(y, self.num_classes, "MLPDiscriminator")
        h = self.body(x)
        out = self.head(h).squeeze(-1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(-1)
        return out


class ConvGenerator(nn.Module):
    """``(z (B, z_dim), y (B,)) -> images (B, C, S, S)`` in ``[-1, 1]``, ``S = 4 * 2**n_up``.

    A linear map to ``(width, 4, 4)``, then ``n_up`` blocks of (nearest upsample, 3x3
    conv, batch norm, ReLU) and a 3x3 conv to ``C`` channels with ``tanh``.
    """

    def __init__(self, z_dim: int = 64, width: int = 64, num_classes: int = 0, channels: int = 1, size: int = 16):
        super().__init__()
        n_up = _doublings(size, "ConvGenerator")
        self.num_classes = num_classes
        self.width = width
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.stem = nn.Linear(z_dim * (2 if num_classes else 1), width * 16)
        blocks: list[nn.Module] = []
        for _ in range(n_up):
            blocks += [nn.Upsample(scale_factor=2.0), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        self.blocks = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), *blocks)
        self.to_image = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z: Tensor, y: Optional[Tensor] = None) -> Tensor:
        _check_labels(y, self.num_classes, "ConvGenerator")
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=-1)
        h = self.stem(z).view(z.shape[0], self.width, 4, 4)
        return torch.tanh(self.to_image(self.blocks(h)))


class ConvDiscriminator(nn.Module):
    """``(images (B, C, S, S), y (B,)) -> score (B,)``: strided 3x3 convs, global sum pooling,
    a linear head and the class projection."""

    def __init__(self, width: int = 64, num_classes: int = 0, channels: int = 1, size: int = 16):
        super().__init__()
        n_down = _doublings(size, "ConvDiscriminator")
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(n_down):
            layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.embed = nn.Embedding(num_classes, width) if num_classes else None

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        _check_labels(y, self.num_classes, "ConvDiscriminator")
        h = self.body(x).sum(dim=(2, 3))
        out = self.head(h).squeeze(-1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(-1)
        return out


def _doublings(size: int, who: str) -> int:
    n, s = 0, size
    while s > 4 and s % 2 == 0:
        s //= 2
        n += 1
    if s != 4:
        raise ValueError(f"{who}: size must be 4 * 2**k, got {size}")
    return n
