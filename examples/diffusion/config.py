"""The training configuration: presets, checks of every value, and what may change on resume.

A :class:`TrainConfig` is plain data (ints, floats, bools, strings, tuples), stored in
every checkpoint and in ``metrics.json``. :data:`PRESETS` holds the ``cpu`` preset
(the defaults: finishes in minutes on 2 cores) and the larger ``gpu`` preset.
:func:`validate` turns any bad value into a :class:`ConfigError` naming the flag.

>>> cfg = TrainConfig(**{**PRESETS["cpu"], "image_size": 18})
>>> try:
...     validate(cfg)
... except ConfigError as e:
...     print(str(e)[:64])
--image-size 18 is not divisible by 4, the Unet's downsampling f
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch
from torch.torch_version import TorchVersion

import pfunc

from .data import MIN_SHAPES_SIZE
from .gaussian_diffusion import OBJECTIVES
from .schedules import SCHEDULES
from .unet import LAYOUTS

__all__ = ["TrainConfig", "PRESETS", "RUN_OPTIONS", "ADDED_FIELDS", "ConfigError", "check_values", "validate", "check_device",
           "config_differences", "flag", "SEED_LIMIT"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (see ``python -m examples.diffusion.train --help``)."""

    # model
    dim: int
    dim_mults: tuple[int, ...]
    channels: int
    image_size: int
    resnet_block_groups: int
    attn_heads: int
    attn_dim_head: int
    self_condition: bool
    learned_variance: bool
    learned_sinusoidal_cond: bool
    random_fourier_features: bool
    learned_sinusoidal_dim: int
    layout: str
    weight_standardization: bool
    # diffusion
    timesteps: int
    beta_schedule: str
    objective: str
    # data
    dataset: str
    data_dir: Optional[str]
    train_size: int
    # optimisation
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    max_grad_norm: float
    ema_decay: float
    ema_every: int
    ema_after: int
    seed: int
    # run options (may change on resume: see RUN_OPTIONS)
    steps: int
    bf16: bool
    compile: bool
    checkpoint_every: int
    sampling_steps: int
    ddim_eta: float
    num_samples: int
    eval_samples: int
    log_every: int

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and checkpoint-safe values (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """The config of :meth:`to_dict`'s output; :class:`ConfigError` for unknown or missing fields (values unchecked:
        see :func:`check_values`). A field added since the config was written (:data:`ADDED_FIELDS`) takes the value
        it had then: a checkpoint from before ``--layout`` resumes in the classic layout it was trained in."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        d = {**ADDED_FIELDS, **d}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ConfigError(f"config has unknown fields {unknown} and lacks fields {missing}")
        return cls(**{k: (tuple(v) if k == "dim_mults" and isinstance(v, (list, tuple)) else v) for k, v in d.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    @property
    def downsample_factor(self) -> int:
        """How much the Unet shrinks the image: ``2 ** (len(dim_mults) - 1)``."""
        return 2 ** (len(self.dim_mults) - 1)


# Fields added after the first release, with the value that a config written before them meant.
ADDED_FIELDS = {"layout": "classic", "weight_standardization": True}

# What a resumed run may change; every other field must match the checkpoint.
RUN_OPTIONS = frozenset(
    {"steps", "bf16", "compile", "checkpoint_every", "sampling_steps", "ddim_eta", "num_samples", "eval_samples", "log_every"}
)

_COMMON = dict(
    resnet_block_groups=8,
    self_condition=False,
    learned_variance=False,
    learned_sinusoidal_cond=False,
    random_fourier_features=False,
    learned_sinusoidal_dim=16,
    layout="modern",
    weight_standardization=False,
    timesteps=1000,
    beta_schedule="cosine",
    objective="pred_v",
    dataset="shapes",
    data_dir=None,
    train_size=20000,
    grad_accum=1,
    weight_decay=0.0,
    max_grad_norm=1.0,
    ema_decay=0.995,
    seed=0,
    bf16=False,
    compile=False,
    log_every=50,
    ddim_eta=1.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on 2 CPU cores: 16x16 coloured shapes, a 3-level Unet
    "cpu": dict(
        _COMMON,
        dim=16,
        dim_mults=(1, 2, 4),
        channels=3,
        image_size=16,
        attn_heads=2,
        attn_dim_head=16,
        batch_size=64,
        lr=2e-3,
        ema_every=1,
        ema_after=100,
        steps=1500,
        checkpoint_every=500,
        sampling_steps=50,
        num_samples=64,
        eval_samples=500,
    ),
    # the classic DDPM Unet's sizes on one GPU: 32x32 coloured shapes, a 4-level Unet, bf16 + compile
    "gpu": dict(
        _COMMON,
        dim=64,
        dim_mults=(1, 2, 4, 8),
        channels=3,
        image_size=32,
        attn_heads=4,
        attn_dim_head=32,
        batch_size=128,
        lr=2e-4,
        ema_every=10,
        ema_after=100,
        steps=20000,
        checkpoint_every=2000,
        sampling_steps=250,
        num_samples=64,
        eval_samples=2000,
        bf16=True,
        compile=True,
        train_size=50000,
    ),
}


def flag(name: str) -> str:
    """The command-line flag of config field ``name``."""
    return "--" + name.replace("_", "-")


_INT_FIELDS = ("dim", "channels", "image_size", "resnet_block_groups", "attn_heads", "attn_dim_head", "timesteps",
               "train_size", "batch_size", "grad_accum", "ema_every", "steps", "checkpoint_every", "sampling_steps",
               "num_samples", "log_every", "learned_sinusoidal_dim")
_BOOL_FIELDS = ("self_condition", "learned_variance", "learned_sinusoidal_cond", "random_fourier_features", "bf16", "compile",
                "weight_standardization")
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes [0, 2**64); the run uses seed + 1 ... seed + 4


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_values(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first flag whose value has the wrong type or range.

    Independent of the machine (no files, no torch version): the check a checkpoint's
    config passes before anything is built from it.
    """

    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{flag(name)} must be a positive integer, got {v!r}")
    for name in ("eval_samples", "ema_after", "seed"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(f"{flag(name)} must be a non-negative integer, got {v!r}")
    if cfg.seed >= SEED_LIMIT:
        raise ConfigError(f"--seed must be below 2**63 = {SEED_LIMIT}, got {cfg.seed}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{flag(name)} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("beta_schedule", "objective", "dataset", "layout"):
        if not isinstance(getattr(cfg, name), str):
            raise ConfigError(f"{flag(name)} must be a string, got {getattr(cfg, name)!r}")
    for name in ("lr", "weight_decay", "max_grad_norm", "ddim_eta", "ema_decay"):
        v = getattr(cfg, name)
        if not _is_number(v) or not math.isfinite(v):
            raise ConfigError(f"{flag(name)} must be a finite number, got {v!r}")
    if cfg.eval_samples == 1:
        raise ConfigError("--eval-samples must be 0 (no quality score) or at least 2")
    if not isinstance(cfg.dim_mults, tuple) or not cfg.dim_mults or any(not _is_int(m) or m < 1 for m in cfg.dim_mults):
        raise ConfigError(f"--dim-mults must be a comma-separated list of positive integers, got {cfg.dim_mults!r}")
    if cfg.dim < 4 or cfg.dim % 2:
        raise ConfigError(f"--dim must be even and at least 4 (sinusoidal time embedding), got {cfg.dim}")
    if cfg.learned_sinusoidal_dim % 2:
        raise ConfigError(f"--learned-sinusoidal-dim must be even, got {cfg.learned_sinusoidal_dim}")
    for m in (1, *cfg.dim_mults) if LAYOUTS.get(cfg.layout, {}).get("block_norm") == "groupnorm" else ():
        if (cfg.dim * m) % cfg.resnet_block_groups:
            raise ConfigError(
                f"--resnet-block-groups {cfg.resnet_block_groups} must divide every level width "
                f"(--dim {cfg.dim} times each of 1 and --dim-mults {_mults(cfg)}); {cfg.dim * m} is not divisible"
            )
    if cfg.dataset == "shapes" and cfg.image_size < MIN_SHAPES_SIZE:
        raise ConfigError(f"--image-size must be at least {MIN_SHAPES_SIZE} for --dataset shapes (the smallest the shapes "
                          f"are drawn at), got {cfg.image_size}")
    if cfg.image_size % cfg.downsample_factor:
        raise ConfigError(
            f"--image-size {cfg.image_size} is not divisible by {cfg.downsample_factor}, the Unet's downsampling factor "
            f"(2 ** (len(--dim-mults) - 1) with --dim-mults {_mults(cfg)} ... )"
        )
    if cfg.channels not in (1, 3):
        raise ConfigError(f"--channels must be 1 or 3, got {cfg.channels}")
    if cfg.layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
    if cfg.beta_schedule not in SCHEDULES:
        raise ConfigError(f"--beta-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.beta_schedule!r}")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.beta_schedule == "linear" and cfg.timesteps <= 20:
        raise ConfigError(f"--timesteps must be above 20 for --beta-schedule linear, got {cfg.timesteps}")
    if cfg.sampling_steps > cfg.timesteps:
        raise ConfigError(f"--sampling-steps {cfg.sampling_steps} exceeds --timesteps {cfg.timesteps}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr!r}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be non-negative, got {cfg.weight_decay}")
    if cfg.max_grad_norm < 0:
        raise ConfigError(f"--max-grad-norm must be non-negative (0 disables clipping), got {cfg.max_grad_norm}")
    if not 0 <= cfg.ddim_eta <= 1:
        raise ConfigError(f"--ddim-eta must be in [0, 1], got {cfg.ddim_eta}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.dataset == "shapes":
        if cfg.data_dir is not None:
            raise ConfigError("--data-dir is only for --dataset folder")
        if cfg.batch_size > cfg.train_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than --train-size {cfg.train_size}")
    elif cfg.dataset == "folder":
        if cfg.data_dir is None:
            raise ConfigError("--dataset folder needs --data-dir PATH")
        if not isinstance(cfg.data_dir, str) or not cfg.data_dir.strip():
            raise ConfigError(f"--data-dir must name a folder, got {cfg.data_dir!r}")
    else:
        raise ConfigError(f"--dataset must be 'shapes' (embedded) or 'folder', got {cfg.dataset!r}")


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first flag whose value cannot work here.

    :func:`check_values`, then what depends on this machine: ``--compile`` needs a recent
    enough torch, ``--data-dir`` must be a folder.
    """
    check_values(cfg)
    if cfg.compile and TorchVersion(torch.__version__) < pfunc.COMPILE_MIN_TORCH:
        raise ConfigError(
            f"--compile needs torch >= {pfunc.COMPILE_MIN_TORCH} (this is torch {torch.__version__}: its compiler "
            "cannot compile the functional gradient of a pfunc call); use --no-compile"
        )
    if cfg.dataset == "folder" and not os.path.isdir(cfg.data_dir):
        raise ConfigError(f"--data-dir {cfg.data_dir!r} does not exist or is not a folder")


def check_device(cfg: TrainConfig, device: torch.device) -> None:
    """:class:`ConfigError` naming ``--bf16`` when ``device`` cannot run the autocast dtype: a CUDA GPU without
    bfloat16 (the check ``torch.autocast("cuda", torch.bfloat16)`` makes, which would fail at the first step)."""
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--bf16: {torch.cuda.get_device_name(device)} ({device}) has no bfloat16 support; use --no-bf16")


def _mults(cfg: TrainConfig) -> str:
    return ",".join(map(str, cfg.dim_mults))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str] = RUN_OPTIONS) -> list[str]:
    """One line per field (outside ``ignore``) whose value differs: ``"--dim: checkpoint 16, now 32"``. A field
    one side predates (:data:`ADDED_FIELDS`) counts as the value it had then."""
    saved, current = {**ADDED_FIELDS, **saved}, {**ADDED_FIELDS, **current}
    out = []
    for name in sorted((set(saved) | set(current)) - ignore):
        a, b = saved.get(name, "<absent>"), current.get(name, "<absent>")
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{flag(name)}: checkpoint {a!r}, now {b!r}")
    return out
