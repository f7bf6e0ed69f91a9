"""The model a :class:`~.config.TrainConfig` describes, and drawing images from its weights.

:func:`build_model` makes the Unet (initialised from the config's seed) in the config's layout, its
pfunc parametrization (weight standardization on every ``Block`` conv with ``--weight-standardization``,
the classic layout's default; none otherwise) and the diffusion process.
:func:`sample_images` draws images from a set of weights (the EMA params, usually) in
batches, materialising the parametrized weights once and reusing them for every step: the
explicit cache. Both the training command (its end-of-run samples) and the sampling command
use them, so the two draw the same images from the same weights, seed and batch size.

>>> import torch
>>> from examples.diffusion.config import PRESETS, TrainConfig
>>> cfg = TrainConfig(**{**PRESETS["cpu"], "dim": 8, "dim_mults": (1, 2), "image_size": 8, "channels": 1,
...                      "resnet_block_groups": 4, "attn_dim_head": 8, "timesteps": 50})
>>> unet, net, diffusion = build_model(cfg)
>>> params, state = net.init()
>>> x = sample_images(net, diffusion, params, state, 3, cfg, seed=0, sampling_steps=2, eta=1.0, device=torch.device("cpu"))
>>> x.shape, bool(x.min() >= 0), bool(x.max() <= 1)
(torch.Size([3, 1, 8, 8]), True, True)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

import pfunc as pf

from .config import TrainConfig
from .gaussian_diffusion import GaussianDiffusion
from .schedules import beta_values
from .unet import LAYOUTS, Unet, parametrize_unet

__all__ = ["build_model", "sample_images", "sampling_calls"]


def build_model(cfg: TrainConfig, layout_options: Optional[Mapping[str, Any]] = None) -> tuple[Unet, pf.Parametrized, GaussianDiffusion]:
    """``(unet, net, diffusion)``: the Unet (initialised from ``cfg.seed``), its pfunc parametrization, the process.

    The Unet has the layout ``cfg.layout`` (:data:`~.unet.LAYOUTS`), its Block convs weight-standardized when
    ``cfg.weight_standardization``; ``layout_options`` replaces any of these (an ablation: ``{"num_mem_kv": 4}``).
    """
    options = {**LAYOUTS[cfg.layout], "weight_standardization": cfg.weight_standardization, **(layout_options or {})}
    unknown = sorted(set(options) - set(LAYOUTS[cfg.layout]))
    if unknown:
        raise ValueError(f"build_model: layout_options has unknown entries {unknown}; known: {sorted(LAYOUTS[cfg.layout])}")
    weight_standardization = options.pop("weight_standardization")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = Unet(
            dim=cfg.dim,
            dim_mults=cfg.dim_mults,
            channels=cfg.channels,
            self_condition=cfg.self_condition,
            resnet_block_groups=cfg.resnet_block_groups,
            learned_variance=cfg.learned_variance,
            learned_sinusoidal_cond=cfg.learned_sinusoidal_cond,
            random_fourier_features=cfg.random_fourier_features,
            learned_sinusoidal_dim=cfg.learned_sinusoidal_dim,
            attn_heads=cfg.attn_heads,
            attn_dim_head=cfg.attn_dim_head,
            **options,
        )
    net = parametrize_unet(unet, weight_standardization)
    diffusion = GaussianDiffusion(
        beta_values(cfg.beta_schedule, cfg.timesteps),
        objective=cfg.objective,
        self_condition=cfg.self_condition,
        learned_variance=cfg.learned_variance,
    )
    return unet, net, diffusion


def sampling_calls(n: int, batch_size: int, diffusion: GaussianDiffusion, sampling_steps: int) -> int:
    """How many denoiser steps :func:`sample_images` takes for ``n`` images (the length of its progress)."""
    return math.ceil(n / batch_size) * diffusion.num_sampling_steps(sampling_steps)


@torch.no_grad()
def sample_images(
    net: pf.Parametrized,
    diffusion: GaussianDiffusion,
    weights: dict[str, Tensor],
    state: dict[str, Tensor],
    n: int,
    cfg: TrainConfig,
    *,
    seed: int,
    sampling_steps: int,
    eta: float,
    device: torch.device,
    batch_size: int = 500,
    bf16: bool = False,
    on_step: Optional[Callable[[], None]] = None,
) -> Tensor:
    """``n`` images ``[n, C, S, S]`` in ``[0, 1]`` (CPU) from ``weights`` (params or EMA params) and ``state``.

    All randomness comes from one ``torch.Generator`` on ``device`` seeded with ``seed``;
    batches of ``batch_size`` are drawn one after another from it, so the same seed and batch
    size give the same images. ``sampling_steps`` below the config's timesteps means DDIM with
    noise ``eta``, equal means DDPM. ``bf16`` runs the Unet under bfloat16 autocast.
    ``on_step()`` is called after each denoising step of each batch (:func:`sampling_calls`).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"sample_images: n and batch_size must be positive, got {n} and {batch_size}")
    diffusion = diffusion.to(device)
    values, _ = net.materialize({k: v.to(device) for k, v in weights.items()}, {k: v.to(device) for k, v in state.items()}, training=False)
    model = lambda x, t, sc: net.apply(values, x, t, sc)  # noqa: E731
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = diffusion.sample(model, (m, cfg.channels, cfg.image_size, cfg.image_size), g, sampling_steps, eta,
                                 device=device, on_step=on_step)
        out.append(x.float().cpu())
    return torch.cat(out)
