"""Everything the training command checks before any work: the :class:`Plan` of a run.

:func:`prepare` checks every flag, the checkpoint (on ``--resume``), the folder the run will
write and the data, in the order a user can fix them, and writes nothing: a bad value is a
:class:`~.config.ConfigError` naming the flag, a bad file or folder a ``CheckpointError``,
``FolderError`` or ``BadImageError`` naming it. Under torchrun (``dp`` given) it also checks
that the global batch splits evenly over the processes, and only rank 0, the writer, checks
the folders it will write.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import read_checkpoint
from examples.threads import choose_threads

from .cli import check_compile_backend, check_memory, resolve_device
from .config import SEED_LIMIT, ConfigError, TrainConfig, check_device
from .data import BadImageError, draw_shapes, load_image_folder
from .data_parallel import DataParallel
from .folders import FolderError, check_can_create, check_writable
from .model import build_model
from .train_args import DEFAULT_BACKEND, check_world_size, sample_command, train_command, resolve_config, steps_for_epochs
from .training_checkpoint import check_fits, check_payload, checkpoint_path

__all__ = ["Plan", "prepare", "load_data", "finished_message", "say_notes", "resume_hint", "scored_samples", "SHAPES_TRAIN_SEED",
           "TRIAL_STEPS"]

SHAPES_TRAIN_SEED = 0  # the embedded training set is the same for every --seed
#: Below this many steps a run is a trial: its end-of-run quality score is skipped unless --eval-samples is given
#: (a 30-step run took 3 min 9 s: 16 s of training, the rest mostly sampling 500 images for an FCD of 2110,
#: which says nothing).
TRIAL_STEPS = 500


def load_data(cfg: TrainConfig, *, skip_bad: bool = False) -> tuple[torch.Tensor, list[str]]:
    """``(images [N, C, S, S] in [0, 1] (CPU), skipped files' messages)`` of the run's data set."""
    if cfg.dataset == "shapes":
        images, _ = draw_shapes(cfg.train_size, cfg.image_size, cfg.channels, torch.Generator().manual_seed(SHAPES_TRAIN_SEED))
        return images, []
    try:
        images, skipped = load_image_folder(cfg.data_dir, cfg.image_size, cfg.channels, skip_bad=skip_bad)
    except BadImageError as e:
        raise BadImageError(f"{e} (--skip-bad-images leaves such files out)") from None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if images.shape[0] < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {images.shape[0]} images under --data-dir")
    return images, skipped


def resume_hint(run_dir: Path, dp: Optional[DataParallel] = None) -> str:
    """The command that resumes ``run_dir``: on one process, or on as many as ``dp``'s run."""
    return f"{train_command()} --resume {shlex.quote(str(run_dir))}" if dp is None else dp.resume_command(run_dir)


@dataclass
class Plan:
    """Everything checked and ready before the run folder exists."""

    cfg: TrainConfig
    device: torch.device
    net: Any
    diffusion: Any
    data: torch.Tensor
    skipped: list[str]
    payload: Optional[dict] = None
    run_dir: Optional[Path] = None  # an existing run (resume)
    done: Optional[str] = None  # set when there is nothing to do: the message
    score: int = 0  # images sampled for the end-of-run quality score (0: none; see scored_samples)
    notes: tuple[str, ...] = ()  # printed once every check has passed (the thread choice)


def prepare(args: argparse.Namespace, dp: Optional[DataParallel] = None) -> Plan:
    """Every check, in the order a user can fix them; nothing is written. Raises ConfigError, CheckpointError,
    FolderError or BadImageError. With ``dp`` (several processes) the device is the rank's, the batch must split
    evenly over the ranks, and only rank 0, the writer, checks the folders it will write."""
    writer = dp is None or dp.is_writer
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ConfigError(f"--epochs must be a positive, finite number, got {args.epochs}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.data_dir is not None and not args.data_dir.strip():
        raise ConfigError(f"--data-dir must name a folder, got {args.data_dir!r}")
    if args.resume is None and not args.results_dir.strip():
        raise ConfigError(f"--results-dir must name a folder, got {args.results_dir!r}")
    payload, ckpt = None, None
    if args.resume is not None:
        ckpt = checkpoint_path(args.resume)
        payload, _ = read_checkpoint(ckpt)
        check_payload(payload, str(ckpt))
        cfg = resolve_config(args, payload["config"])
    else:
        cfg = resolve_config(args)
    if dp is not None:
        check_world_size(cfg, dp.world_size, resumed=payload is not None)
    device = resolve_device(args.device) if dp is None else dp.device
    check_device(cfg, device)
    image_bytes = cfg.channels * cfg.image_size**2 * 4
    if cfg.dataset == "shapes":
        check_memory(f"--train-size {cfg.train_size}", cfg.train_size * image_bytes)
    n_sampled = max(cfg.num_samples, cfg.eval_samples)
    check_memory(f"--num-samples {cfg.num_samples} / --eval-samples {cfg.eval_samples}", n_sampled * image_bytes)
    if args.compile_backend is not None and not args.compile_backend.strip():
        raise ConfigError(f"--compile-backend must name a torch.compile backend (e.g. {DEFAULT_BACKEND}), got {args.compile_backend!r}")
    if args.compile_backend is not None or cfg.compile:
        check_compile_backend(args.compile_backend or DEFAULT_BACKEND)
    unet, net, diffusion = build_model(cfg)
    if args.preset == "gpu" and args.device == "auto" and device.type == "cpu":
        check_gpu_preset_on_cpu(cfg, sum(v.numel() for v in unet.parameters()))

    run_dir = None
    if payload is not None:
        check_fits(payload, net, str(ckpt))
        run_dir = ckpt.parent
        step = payload["step"]
        if args.steps is not None and args.steps < step:
            raise ConfigError(
                f"--steps {args.steps} is below the checkpoint's step {step}: a run cannot train backwards "
                f"(pass --steps above {step} to train longer, or draw samples with: {sample_command()} {shlex.quote(str(run_dir))})"
            )
        if args.epochs is None and step >= cfg.steps:
            return Plan(cfg, device, net, diffusion, torch.empty(0), [], payload, run_dir, done=finished_message(run_dir, step, dp))
        if writer:
            try:
                check_writable(run_dir, "the run folder")
            except FolderError as e:
                raise FolderError(f"cannot resume: {e}; a resumed run writes its checkpoint and log there") from None
    elif writer:
        check_can_create(args.results_dir, "--results-dir")

    note = choose_threads(args.threads)  # before the first real work; said once every check has passed (say_notes)
    data, skipped = load_data(cfg, skip_bad=args.skip_bad_images)
    if args.epochs is not None:
        cfg = cfg.replace(steps=steps_for_epochs(args.epochs, cfg, data.shape[0]))
        if payload is not None:
            if cfg.steps < payload["step"]:
                raise ConfigError(f"--epochs {args.epochs:g} is {cfg.steps} steps, below the checkpoint's step {payload['step']}")
            if cfg.steps == payload["step"]:
                return Plan(cfg, device, net, diffusion, data, skipped, payload, run_dir, done=finished_message(run_dir, payload["step"], dp))
    return Plan(cfg, device, net, diffusion, data, skipped, payload, run_dir, score=scored_samples(cfg, args.eval_samples),
                notes=(note,) if note and writer else ())


def scored_samples(cfg: TrainConfig, given: Optional[int]) -> int:
    """The images the end of the run samples for its quality score: ``--eval-samples`` when given, else the preset's
    (or the checkpoint's) value for a run of at least :data:`TRIAL_STEPS` steps, and none for a shorter trial run."""
    if given is not None or cfg.steps >= TRIAL_STEPS:
        return cfg.eval_samples
    return 0


def check_gpu_preset_on_cpu(cfg: TrainConfig, num_params: int) -> None:
    """:class:`~.config.ConfigError` naming ``--preset gpu`` when ``--device auto`` found no GPU: the run would train
    the preset's large Unet on the CPU for days. ``--device cpu`` says the user means it."""
    extras = " + ".join(name for name, on in (("bf16", cfg.bf16), ("torch.compile", cfg.compile)) if on)
    raise ConfigError(
        f"--preset gpu is sized for a GPU ({num_params / 1e6:.1f}M params, {cfg.steps} steps of {cfg.batch_size} images at "
        f"{cfg.image_size}px{', ' + extras if extras else ''}) and this machine has no CUDA device: on the CPU it would run "
        "for days. Pass --device cpu to run it on the CPU anyway, or leave out --preset gpu for the CPU preset (minutes)"
    )


def finished_message(run_dir: Path, step: int, dp: Optional[DataParallel]) -> str:
    """What resuming a run that is already trained to ``step`` says (and does nothing else)."""
    return (
        f"{run_dir} is already trained to step {step}: nothing to train, nothing written. Train longer with "
        f"{resume_hint(run_dir, dp)} --steps N (N > {step}); draw new samples with: {sample_command()} {shlex.quote(str(run_dir))}"
    )


def say_notes(plan: Plan) -> None:
    """Once every check has passed: the notes (the thread choice), then the bad image files ``--skip-bad-images``
    left out (the first 10) and their count."""
    for note in plan.notes:
        print(note, file=sys.stderr)
    for message in plan.skipped[:10]:
        print(f"warning: skipped {message}", file=sys.stderr)
    if plan.skipped:
        more = f" ({len(plan.skipped) - 10} more not shown)" if len(plan.skipped) > 10 else ""
        print(f"warning: --skip-bad-images left out {len(plan.skipped)} of {len(plan.skipped) + plan.data.shape[0]} "
              f"image files{more}", file=sys.stderr)
