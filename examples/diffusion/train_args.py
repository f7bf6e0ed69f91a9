"""The training command's flags, and the run's config from them (and from a checkpoint on ``--resume``).

:func:`build_parser` lists every flag; each config flag defaults to ``None`` so that
:func:`resolve_config` knows which were given. :func:`check_launch_flags` checks the flags of a
run across several processes (``--backend``, ``--dist-timeout``, ``--zero``, ``--bucket-cap-mb``),
which mean nothing to one process and are refused there.

>>> args = build_parser().parse_args(["--dim", "32", "--steps", "10"])
>>> cfg = resolve_config(args)
>>> cfg.dim, cfg.steps, cfg.batch_size          # given flags over the cpu preset
(32, 10, 64)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Optional

import pfunc as pf
from examples.commands import python_command, shown_path

from .cli import ShortErrorParser
from .config import PRESETS, RUN_OPTIONS, ConfigError, TrainConfig, config_differences, flag, validate
from .data_parallel import DEFAULT_TIMEOUT_S

__all__ = ["train_command", "sample_command", "DEFAULT_BACKEND", "build_parser", "resolve_config", "steps_for_epochs",
           "check_launch_flags", "check_world_size"]


def train_command() -> str:
    """The training command as this process was started (``.venv/bin/python -m examples.diffusion.train``)."""
    return python_command("examples.diffusion.train")


def torchrun_command() -> str:
    """The ``torchrun`` installed beside this interpreter (``.venv/bin/torchrun``), as :func:`~examples.commands.shown_path`
    writes it."""
    return shown_path(os.path.join(os.path.dirname(sys.executable), "torchrun"))


def sample_command() -> str:
    """The sampling command, with this process's interpreter (``.venv/bin/python -m examples.diffusion.sample``)."""
    return python_command("examples.diffusion.sample")

DEFAULT_BACKEND = "inductor"
_LAUNCH_FLAGS = ("backend", "dist_timeout", "zero", "bucket_cap_mb")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _preset_note(name: str) -> str:
    cpu, gpu = PRESETS["cpu"].get(name), PRESETS["gpu"].get(name)
    return f" (cpu preset: {_show(cpu)}; gpu preset: {_show(gpu)})" if cpu != gpu else f" (default: {_show(cpu)})"


def _mults(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI. Every config flag defaults to ``None`` so that :func:`resolve_config` knows what was given."""
    p = ShortErrorParser(
        prog=train_command(),
        description="Train the classic DDPM Unet (Ho et al.; the denoising-diffusion-pytorch layout) functionally "
        "(torch.func + pfunc parametrizations) on embedded procedurally drawn shapes or a folder of images, then "
        f"sample and score it. New samples from a trained run: {sample_command()} RUN.",
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="defaults for every flag below: 'cpu' (a few minutes on 2 cores; used when no preset is given) "
                     "or 'gpu' (the classic DDPM Unet's sizes, bf16 and torch.compile)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps to train (with --resume: the new total, above the "
                        "checkpoint's step)" + _preset_note("steps"))
    length.add_argument("--epochs", type=float, help="train this many passes over the data instead of --steps (a positive, finite number)")
    run.add_argument("--device", default="auto",
                     help="'auto' (the first CUDA device, else CPU; the default), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: one per core found idle over half a second at start-up, "
                     "since threads fighting other jobs for the cores run about ten times slower; the run says so)")
    run.add_argument("--seed", type=int, help="seed of the model init, batch order, noise and sampling, in [0, 2**63)" + _preset_note("seed"))
    run.add_argument("--results-dir", default="results", help="parent folder of the timestamped run folder (default: results)")
    run.add_argument("--resume", metavar="PATH", default=None,
                     help="continue from a run folder or its checkpoint.pt (config from the checkpoint; given flags "
                     f"must match it, except {', '.join(flag(n) for n in sorted(RUN_OPTIONS))})")
    run.add_argument("--checkpoint-every", type=int, help="write checkpoint.pt every N steps (and at the end, and on Ctrl-C)" + _preset_note("checkpoint_every"))
    run.add_argument("--log-every", type=int, help="print a progress line every N steps when the output is not a terminal" + _preset_note("log_every"))
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast for the forward/backward" + _preset_note("bf16"))
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the gradient function (torch >= 2.6)" + _preset_note("compile"))
    run.add_argument("--compile-backend", default=None,
                     help=f"torch.compile backend when --compile is on (default: {DEFAULT_BACKEND}); must be registered "
                     "in torch._dynamo.list_backends()")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("shapes", "folder"),
                      help="'shapes': embedded, procedurally drawn shapes (no download); 'folder': images under --data-dir"
                      + _preset_note("dataset"))
    data.add_argument("--data-dir", help="folder of images for --dataset folder, searched recursively (every format Pillow "
                      "reads; files over Pillow's decompression-bomb limit or malformed are refused by name)")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="with --dataset folder: skip files that cannot be read (a warning names each, with a count) "
                      "instead of stopping at the first")
    data.add_argument("--train-size", type=int, help="number of shapes drawn for training" + _preset_note("train_size"))
    data.add_argument("--image-size", type=int,
                      help="image side in pixels; must be divisible by 2 ** (len(dim-mults) - 1)" + _preset_note("image_size"))
    data.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB)" + _preset_note("channels"))

    model = p.add_argument_group("model (the classic DDPM Unet)")
    model.add_argument("--dim", type=int, help="base width of the Unet" + _preset_note("dim"))
    model.add_argument("--dim-mults", type=_mults, help="width multiplier per resolution level, e.g. 1,2,4" + _preset_note("dim_mults"))
    model.add_argument("--layout", choices=("classic", "modern"),
                       help="'classic': GroupNorm + weight standardization (a pfunc parametrization) in every Block, "
                       "LayerNorm before attention (denoising-diffusion-pytorch up to 1.5); 'modern': RMSNorm, learned "
                       "memory key/values, full attention at the innermost level (its 2.x releases)" + _preset_note("layout"))
    model.add_argument("--weight-standardization", action=argparse.BooleanOptionalAction, default=None,
                       help="standardize every Block conv's weight per output channel, a pfunc parametrization (the "
                       "classic layout's WeightStandardizedConv2d)" + _preset_note("weight_standardization"))
    model.add_argument("--resnet-block-groups", type=int, help="GroupNorm groups in every Block (classic layout)"
                       + _preset_note("resnet_block_groups"))
    model.add_argument("--attn-heads", type=int, help="heads of every attention layer" + _preset_note("attn_heads"))
    model.add_argument("--attn-dim-head", type=int, help="width of each attention head" + _preset_note("attn_dim_head"))
    model.add_argument("--self-condition", action=argparse.BooleanOptionalAction, default=None,
                       help="self-conditioning: feed the model its own x0 estimate" + _preset_note("self_condition"))
    model.add_argument("--learned-variance", action=argparse.BooleanOptionalAction, default=None,
                       help="learn the reverse variance (Improved DDPM hybrid loss)" + _preset_note("learned_variance"))
    model.add_argument("--learned-sinusoidal-cond", action=argparse.BooleanOptionalAction, default=None,
                       help="learned sinusoidal time features" + _preset_note("learned_sinusoidal_cond"))
    model.add_argument("--random-fourier-features", action=argparse.BooleanOptionalAction, default=None,
                       help="random (fixed) Fourier time features" + _preset_note("random_fourier_features"))
    model.add_argument("--learned-sinusoidal-dim", type=int,
                       help="width of the learned/random sinusoidal features" + _preset_note("learned_sinusoidal_dim"))

    diff = p.add_argument_group("diffusion")
    diff.add_argument("--timesteps", type=int, help="diffusion steps T" + _preset_note("timesteps"))
    diff.add_argument("--beta-schedule", choices=("linear", "cosine"), help="noise schedule" + _preset_note("beta_schedule"))
    diff.add_argument("--objective", choices=("pred_noise", "pred_x0", "pred_v"), help="what the Unet predicts" + _preset_note("objective"))
    diff.add_argument("--sampling-steps", type=int,
                      help="DDIM steps for the end-of-run samples when below --timesteps, else full DDPM sampling"
                      + _preset_note("sampling_steps"))
    diff.add_argument("--ddim-eta", type=float,
                      help="DDIM noise in [0, 1]: 0 deterministic, 1 as stochastic as DDPM (better samples from a short run)"
                      + _preset_note("ddim_eta"))
    diff.add_argument("--num-samples", type=int, help="images in samples.png" + _preset_note("num_samples"))
    diff.add_argument("--eval-samples", type=int, help="images sampled for the quality score (0: skip it)" + _preset_note("eval_samples"))

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, help="images per forward/backward (under torchrun: the global batch, split "
                     "evenly over the processes)" + _preset_note("batch_size"))
    opt.add_argument("--grad-accum", type=int, help="forward/backward passes per optimizer step" + _preset_note("grad_accum"))
    opt.add_argument("--lr", type=float, help="AdamW learning rate (positive, finite)" + _preset_note("lr"))
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay (non-negative, finite)" + _preset_note("weight_decay"))
    opt.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (finite), 0 disables" + _preset_note("max_grad_norm"))
    opt.add_argument("--ema-decay", type=float, help="decay in [0, 1) of the EMA of the params (used for sampling)" + _preset_note("ema_decay"))
    opt.add_argument("--ema-every", type=int, help="update the EMA every N steps" + _preset_note("ema_every"))
    opt.add_argument("--ema-after", type=int, help="the EMA copies the params until this step" + _preset_note("ema_after"))

    ranks = p.add_argument_group("several processes (torchrun --nproc_per_node=N -m examples.diffusion.train; refused in one process)")
    ranks.add_argument("--backend", choices=("auto", "gloo", "nccl"), default=None,
                       help="torch.distributed backend: 'auto' (the default) is NCCL on CUDA, gloo on CPU")
    ranks.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                       help=f"how long a rank waits for the others in a collective before stopping with an error (default: "
                       f"{DEFAULT_TIMEOUT_S:g}, NCCL's own); a rank that dies is noticed at once on gloo")
    ranks.add_argument("--zero", action="store_true", default=None,
                       help="shard AdamW's state over the ranks (ZeroRedundancyOptimizer); checkpoints still hold all of it")
    ranks.add_argument("--bucket-cap-mb", type=float, default=None, metavar="MB",
                       help=f"size of the flat buckets the gradient is averaged in, one all-reduce each (default: "
                       f"{pf.distributed.DEFAULT_BUCKET_CAP_MB:g}, DDP's)")
    return p


_CONFIG_FIELDS = tuple(TrainConfig.__dataclass_fields__)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields given on the command line (``None`` means not given)."""
    return {k: getattr(args, k) for k in _CONFIG_FIELDS if getattr(args, k, None) is not None}


def steps_for_epochs(epochs: float, cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_examples`` images (at least 1)."""
    per_epoch = max(num_examples // cfg.batch_size, 1)
    return max(1, math.ceil(epochs * per_epoch / cfg.grad_accum))


def resolve_config(args: argparse.Namespace, saved: Optional[dict] = None) -> TrainConfig:
    """The run's config: the checkpoint's (``saved``) or the preset's, with the given flags on top.

    A given ``--data-dir`` is made absolute first (so a resume may give the same folder as a
    relative path). On resume a given flag outside :data:`RUN_OPTIONS` that differs from the
    checkpoint raises :class:`ConfigError` listing every difference. Values are validated
    (:func:`validate`).
    """
    given = _given(args)
    if isinstance(given.get("data_dir"), str) and given["data_dir"].strip():
        given["data_dir"] = os.path.abspath(given["data_dir"])
    if saved is not None:
        if args.preset is not None:
            raise ConfigError("--preset cannot be combined with --resume: the checkpoint holds the config")
        base = TrainConfig.from_dict(saved)
        wanted = base.replace(**given).to_dict()
        diffs = config_differences(base.to_dict(), wanted)
        if diffs:
            raise ConfigError("the command line differs from the checkpoint's config:\n  " + "\n  ".join(diffs))
        cfg = TrainConfig.from_dict(wanted)
    else:
        cfg = TrainConfig(**{**PRESETS[args.preset or "cpu"], **given})
    validate(cfg)
    return cfg


def check_launch_flags(args: argparse.Namespace, world_size: Optional[int]) -> None:
    """:class:`~.config.ConfigError` naming the flag when a several-processes flag is given to one process
    (``world_size`` ``None``: not under torchrun) or has a value that cannot work."""
    if world_size is None:
        given = [flag(n) for n in _LAUNCH_FLAGS if getattr(args, n) is not None]
        if given:
            raise ConfigError(
                f"{given[0]} is for a run across several processes; launch one with {torchrun_command()} --standalone "
                "--nproc_per_node=N -m examples.diffusion.train ... (one process needs no such flag)"
            )
        return
    if args.dist_timeout is not None and not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise ConfigError(f"--dist-timeout must be a positive, finite number of seconds, got {args.dist_timeout}")
    if args.bucket_cap_mb is not None and not (math.isfinite(args.bucket_cap_mb) and args.bucket_cap_mb > 0):
        raise ConfigError(f"--bucket-cap-mb must be a positive, finite number of MB, got {args.bucket_cap_mb}")


def check_world_size(cfg: TrainConfig, world_size: int, *, resumed: bool) -> None:
    """:class:`~.config.ConfigError` naming ``--batch-size`` unless ``world_size`` processes can each take an equal
    slice of every global batch (``resumed``: the batch size is the checkpoint's)."""
    if cfg.batch_size % world_size:
        whose = "the checkpoint's --batch-size" if resumed else "--batch-size"
        fix = (f"resume on a number of processes that divides {cfg.batch_size}" if resumed
               else f"pass a multiple of {world_size}, or as many processes as divide {cfg.batch_size}")
        raise ConfigError(
            f"{whose} {cfg.batch_size} is not divisible by the {world_size} processes torchrun started: each process takes "
            f"an equal slice of every global batch ({fix})"
        )
