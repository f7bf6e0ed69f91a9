"""Item 10: one training step of the main job against denoising-diffusion-pytorch's own Unet.

The main job's CPU preset (``examples/diffusion``: dim 16, mults 1,2,4, 2 attention heads of 16,
16x16 RGB images, batch 64; the GPU sizes: dim 64, mults 1,2,4,8, 32x32, batch 128, 4 heads of 32)
and its step: the noise-prediction loss (cosine schedule, 1000 steps; the objective changes no cost) on
fixed images, times and noise, the gradient, clipping at norm 1, AdamW (lr 2e-3, betas
0.9/0.99) and the EMA update.

* ``ddpm``: denoising-diffusion-pytorch's ``Unet`` and ``GaussianDiffusion`` (the installed release,
  2.3.4 from the ``benchmarks`` extra; its code read by :mod:`benchmarks.reference_unet`), trained the
  stateful way: its ``p_losses``, ``loss.backward()`` on its module;
* ``pfunc modern``: the main job's step (:func:`examples.diffusion.training.train_step`, the gradient
  from :func:`pfunc.grad_and_value`) on its Unet in the ``modern`` layout, built from the same seed:
  the same network with the same weights, checked to give the same loss;
* ``pfunc default``: the same step on the preset's own network (where it is not the modern layout
  itself: with weight standardization, a pfunc parametrization, on the Block convs), timed beside the
  others, not compared;
* ``pfunc classic``: the same step on the ``classic`` layout (GroupNorm, weight standardization):
  another network, timed beside the others, not compared.

Reported: images/s (batch / median step time) and the peak of live tensor bytes of one step
(``peak MB``, as item 6). Sample quality is a separate, longer command:
``python -m benchmarks.diffusion_quality`` (see ``examples/diffusion/README.md``).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .comparison import Comparison, Variant
from .reference_unet import stateful_trainer
from .sizes import Sizes
from .timing import Timing, synchronizer
from .unet import peak_memory_bytes

__all__ = ["available", "comparisons"]

FAMILY_NAME = "reference_diffusion"
SEED = 0


def available() -> bool:
    """Whether denoising-diffusion-pytorch's model code and the diffusion example can be loaded here."""
    from .reference_unet import ReferenceUnavailable, load_model_code

    try:
        load_model_code()
        from examples.diffusion import training  # noqa: F401
    except (ReferenceUnavailable, ImportError):
        return False
    return True


def _config(device: torch.device):
    from examples.diffusion.config import PRESETS, TrainConfig

    preset = PRESETS["cpu" if device.type == "cpu" else "gpu"]
    # noise prediction: the one objective whose loss the package and the main job define alike (checked equal);
    # the objective changes no cost, only what the same network's output is compared with
    return TrainConfig(**{**preset, "seed": SEED, "bf16": False, "compile": False, "objective": "pred_noise"})


def _batch(cfg, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(10)
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    return ((torch.rand(shape, generator=g) * 2 - 1).to(device), torch.randint(0, cfg.timesteps, (cfg.batch_size,), generator=g).to(device),
            torch.randn(shape, generator=g).to(device))


def _pfunc_step(cfg, device: torch.device, x0: Tensor, t: Tensor, noise: Tensor) -> Callable[[], Tensor]:
    from examples.diffusion.model import build_model
    from examples.diffusion.training import MicroBatch, initial_train_state, make_grad_fn, make_loss_fn, train_step

    _, net, diffusion = build_model(cfg)
    diffusion = diffusion.to(device)
    ts = initial_train_state(net, cfg.seed, device, cfg.lr, cfg.weight_decay)
    grad_fn = make_grad_fn(make_loss_fn(net, diffusion))
    batch = [MicroBatch(x0, t, noise, False)]

    def step() -> Tensor:
        return torch.tensor(train_step(ts, grad_fn, batch, max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay,
                                       ema_every=cfg.ema_every, ema_after=cfg.ema_after))

    return step


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """One row: the steps above on the preset's sizes for ``device`` (none where denoising-diffusion-pytorch is absent)."""
    device = torch.device(device)
    if not available():
        return
    cfg = _config(device)
    x0, t, noise = _batch(cfg, device)
    from examples.diffusion.unet import LAYOUTS

    def layout(name: str):
        return cfg.replace(layout=name, weight_standardization=LAYOUTS[name]["weight_standardization"])

    _, _, reference_step = stateful_trainer(cfg, device=device)   # the modern layout's weights, value for value
    run = {"ddpm": functools.partial(reference_step, x0, t, noise), "pfunc modern": _pfunc_step(layout("modern"), device, x0, t, noise)}
    if cfg != layout("modern"):                     # the preset is another network than the modern layout itself
        run["pfunc default"] = _pfunc_step(cfg, device, x0, t, noise)
    run["pfunc classic"] = _pfunc_step(layout("classic"), device, x0, t, noise)

    def after(timing: Optional[Timing]) -> dict[str, str]:
        extras = {}
        for name, step in run.items():
            if timing is not None:
                extras[f"{name} images/s"] = f"{cfg.batch_size / timing.medians[name]:.0f}"
            extras[f"{name} peak MB"] = f"{peak_memory_bytes(step, device) / 2**20:.0f}"
        return extras

    from .reference_unet import version

    yield Comparison(
        family=FAMILY_NAME,
        labels={"model": f"Unet dim {cfg.dim}, mults {','.join(map(str, cfg.dim_mults))}, {cfg.image_size}x{cfg.image_size}, "
                         f"batch {cfg.batch_size}", "reference": f"denoising-diffusion-pytorch {version()}"},
        variants={name: Variant(step, checked=name in ("ddpm", "pfunc modern")) for name, step in run.items()},
        reference="ddpm",
        ratios=tuple((name, "ddpm") for name in run if name != "ddpm"),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
        after=after,
    )
