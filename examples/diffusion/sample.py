"""Draw new samples from a trained run, the inference entry point beside the training script.

Run from the repository root, on a run folder the training command wrote (or its checkpoint)::

    .venv/bin/python -m examples.diffusion.sample results/<run>
    .venv/bin/python -m examples.diffusion.sample results/<run> --sampling-steps 10 --ddim-eta 0 --num-samples 16
    .venv/bin/python -m examples.diffusion.sample results/<run>/checkpoint.pt --score --save-each --seed 3

Each call writes a new folder ``<run>/samples/<YYYY-mm-dd_HH-MM-SS>_steps<k>_eta<e>/`` (or under
``--out``): ``samples.png`` (a grid of up to 1024 of the images), ``sampling.json`` (the
settings, the checkpoint's path, step and SHA-256, the score, timings) and, with
``--save-each``, ``images/00000.png`` ... one file per image. The folder appears whole or not at
all (it is built under a hidden name and renamed when complete), and the run's own files are
never changed. The same checkpoint, ``--seed`` and ``--batch-size`` give the same images; the
training run's own ``samples.png`` is ``--seed <its seed + 3> --batch-size 500``.

The checkpoint is checked in full before any work (:mod:`.training_checkpoint`); every bad flag
is one line naming it (exit status 2), a bad file or folder one line naming it (exit status 1),
Ctrl-C stops without leaving anything behind (exit status 130).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from examples.images import save_image_grid
from examples.progress import progress

from .checkpoint import CheckpointError, read_checkpoint
from examples.threads import choose_threads

from .cli import ShortErrorParser, check_memory, resolve_device
from .config import SEED_LIMIT, ConfigError
from .data import BadImageError, load_image_folder
from .folders import FolderError, check_can_create, new_timestamped_folder, timestamp
from .interrupt import StopRequest, Stopped
from .model import build_model, sample_images, sampling_calls
from .quality import JUDGE_STEPS, evaluate
from .train_args import sample_command
from .training_checkpoint import check_fits, check_payload, checkpoint_path

__all__ = ["build_parser", "main", "GRID_LIMIT", "SETTINGS"]

GRID_LIMIT = 1024  # images shown in samples.png; --save-each writes every one
SETTINGS = "sampling.json"


def build_parser() -> argparse.ArgumentParser:
    """The sampling command's flags; ``None`` defaults mean "as the run was trained"."""
    p = ShortErrorParser(
        prog=sample_command(),
        description="Draw new samples from a run of python -m examples.diffusion.train (the classic DDPM Unet): "
        "DDIM (Song et al.) in fewer steps than the run's timesteps, or DDPM (Ho et al.) at them. Writes a new "
        "timestamped folder RUN/samples/<time>_steps<k>_eta<e>/ with samples.png and sampling.json; the run's own "
        "files are never changed.",
    )
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder written by python -m examples.diffusion.train, or its checkpoint.pt")
    p.add_argument("--num-samples", type=int, default=64, help="how many images to draw (default: 64)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="denoising steps: below the run's --timesteps means DDIM, equal means full DDPM sampling "
                   "(default: the run's --sampling-steps)")
    p.add_argument("--ddim-eta", type=float, default=None,
                   help="DDIM noise in [0, 1]: 0 deterministic, 1 as stochastic as DDPM (default: the run's --ddim-eta)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling noise, in [0, 2**63); the same seed and --batch-size give the same images "
                   "(default: 0)")
    p.add_argument("--device", default="auto",
                   help="'auto' (the first CUDA device, else CPU; the default), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    p.add_argument("--batch-size", type=int, default=500,
                   help="images denoised at once; changes which noise each image gets, so keep it to reproduce images "
                   "(default: 500)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for the Unet (default: as the run was trained)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="sample from the EMA of the params (the default; usually better), or --no-ema for the raw params")
    p.add_argument("--score", action="store_true",
                   help="also score the samples as training does: for the embedded shapes the Frechet classifier "
                   "distance with its real-data and random-noise brackets (needs --num-samples >= 2; trains the "
                   "judge, about half a minute on a CPU), for a folder data set the nearest-neighbour RMS to its images")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder to hold the new timestamped sample folder (default: RUN/samples); use it when the "
                   "run folder is read-only")
    p.add_argument("--save-each", action="store_true",
                   help="also write every image as its own PNG, images/00000.png ... (unscaled)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="with --score on a folder data set: leave out image files that cannot be read instead of stopping")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: one per core found idle over half a second at start-up)")
    return p


def _check_flags(args: argparse.Namespace) -> None:
    """Every flag that can be checked without the checkpoint; :class:`ConfigError` naming the first bad one."""
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.sampling_steps is not None and args.sampling_steps < 1:
        raise ConfigError(f"--sampling-steps must be a positive integer, got {args.sampling_steps}")
    if args.ddim_eta is not None and not (math.isfinite(args.ddim_eta) and 0 <= args.ddim_eta <= 1):
        raise ConfigError(f"--ddim-eta must be a number in [0, 1], got {args.ddim_eta}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    if args.score and args.num_samples < 2:
        raise ConfigError(f"--score needs --num-samples of at least 2 (a distance between two sets), got {args.num_samples}")
    if args.out is not None and not args.out.strip():
        raise ConfigError(f"--out must name a folder, got {args.out!r}")


def _save_each(folder: Path, images: torch.Tensor) -> None:
    """One PNG per image (Pillow; the folder is still hidden, so no per-file atomic write is needed)."""
    folder.mkdir()
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    width = max(5, len(str(images.shape[0] - 1)))
    for i, img in enumerate(pixels):
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(arr).save(folder / f"{i:0{width}d}.png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (1: a bad checkpoint, file or folder; 130: Ctrl-C).

    Bad flags exit through ``SystemExit(2)`` with one line naming the flag.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    started, t_start = timestamp(), time.perf_counter()
    try:
        _check_flags(args)
        device = resolve_device(args.device)
        ckpt = checkpoint_path(args.run)
        payload, sha256 = read_checkpoint(ckpt)
        cfg = check_payload(payload, str(ckpt))
        _, net, diffusion = build_model(cfg)
        check_fits(payload, net, str(ckpt))
        steps = cfg.sampling_steps if args.sampling_steps is None else args.sampling_steps
        if steps > cfg.timesteps:
            raise ConfigError(f"--sampling-steps {steps} exceeds the run's --timesteps {cfg.timesteps} (DDPM uses all {cfg.timesteps})")
        eta = cfg.ddim_eta if args.ddim_eta is None else args.ddim_eta
        bf16 = cfg.bf16 if args.bf16 is None else args.bf16
        check_memory(f"--num-samples {args.num_samples}", args.num_samples * cfg.channels * cfg.image_size**2 * 4)
        reference = None
        if args.score and cfg.dataset == "folder":
            try:
                reference, _ = load_image_folder(cfg.data_dir, cfg.image_size, cfg.channels, skip_bad=args.skip_bad_images)
            except (FileNotFoundError, ValueError) as e:
                if isinstance(e, BadImageError):
                    raise
                raise BadImageError(f"--score compares with the run's data set, which cannot be read: {e}") from None
        parent = Path(args.out) if args.out is not None else ckpt.parent / "samples"
        try:
            check_can_create(parent, "--out" if args.out is not None else "the run's samples folder")
        except FolderError as e:
            raise FolderError(f"{e}" + ("" if args.out is not None else "; pass --out DIR to write the samples elsewhere")) from None
    except ConfigError as e:
        parser.error(str(e))
    except (CheckpointError, FolderError, BadImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted before sampling: nothing was written", file=sys.stderr)
        return 130

    note = choose_threads(args.threads)  # after every check, before the first real work
    if note:
        print(note, file=sys.stderr)
    weights = payload["ema"] if args.ema else payload["params"]
    sampler = "ddpm" if steps == cfg.timesteps else "ddim"
    print(f"sampling {args.num_samples} images from {ckpt} (step {payload['step']}, {'EMA' if args.ema else 'raw'} params): "
          f"{sampler.upper()} in {steps} steps" + (f", eta {eta:g}" if sampler == "ddim" else "") + f", seed {args.seed}, on {device}")
    parent.mkdir(parents=True, exist_ok=True)
    name = f"steps{steps}_eta{eta:g}"
    work = parent / f".{started}_{name}.partial-{os.getpid()}"
    try:
        work.mkdir()
        with StopRequest() as stop:
            t_sample = time.perf_counter()
            total = sampling_calls(args.num_samples, args.batch_size, diffusion, steps)
            with progress(total, desc="sample", unit="step", log_every=max(1, total // 10)) as bar:
                images = sample_images(net, diffusion, weights, payload["state"], args.num_samples, cfg, seed=args.seed,
                                       sampling_steps=steps, eta=eta, device=device, batch_size=args.batch_size, bf16=bf16,
                                       on_step=lambda: (stop.check(), bar.update()))
            sampling_seconds = time.perf_counter() - t_sample
            score, eval_seconds = None, None
            if args.score:
                t_eval = time.perf_counter()
                judge_steps = JUDGE_STEPS if cfg.dataset == "shapes" else 0
                with progress(judge_steps, desc="score (training the judge)", unit="step", log_every=max(1, judge_steps // 10)) as qbar:
                    score = evaluate(images, dataset=cfg.dataset, image_size=cfg.image_size, channels=cfg.channels,
                                     device=device, reference=reference, on_step=lambda: (stop.check(), qbar.update()))
                eval_seconds = time.perf_counter() - t_eval
            shown = min(args.num_samples, GRID_LIMIT)
            save_image_grid(work / "samples.png", images[:shown], nrow=math.ceil(math.sqrt(shown)), scale=4)
            if args.save_each:
                _save_each(work / "images", images)
            settings = {
                "command": [sample_command(), *(sys.argv[1:] if argv is None else list(argv))],
                "checkpoint": str(ckpt.resolve()),
                "checkpoint_sha256": sha256,
                "step": payload["step"],
                "weights": "ema" if args.ema else "params",
                "num_samples": args.num_samples,
                "grid_images": shown,
                "each_image": "images/" if args.save_each else None,
                "sampler": sampler,
                "sampling_steps": steps,
                "ddim_eta": eta,
                "seed": args.seed,
                "batch_size": args.batch_size,
                "bf16": bf16,
                "device": str(device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "sampling_seconds": sampling_seconds,
                "eval_seconds": eval_seconds,
                "score": score,
                "started": started,
            }
            (work / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            out = new_timestamped_folder(parent, name, stamp=started)
            os.rename(work, out)  # replaces the empty folder just made: the result appears whole
    except Stopped as e:
        shutil.rmtree(work, ignore_errors=True)
        print(f"{e}: stopped while sampling; nothing was written", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        shutil.rmtree(work, ignore_errors=True)
        print("\nstopped at once by a second Ctrl-C; nothing was written", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        shutil.rmtree(work, ignore_errors=True)
        print(f"error: cannot write the samples under {parent}: {e}; nothing was written", file=sys.stderr)
        return 1
    total_seconds = time.perf_counter() - t_start
    print(f"drew {args.num_samples} samples in {tqdm.format_interval(sampling_seconds)}"
          f" ({args.num_samples / max(sampling_seconds, 1e-9):.1f} images/s)")
    if score:
        m = score["metric"]
        print(f"sample quality {m} (lower is better): samples {score['samples'][m]:.3f} | "
              f"brackets: real data {score['real'][m]:.3f}, random noise {score['noise'][m]:.3f}")
    print(f"wrote {out}: samples.png{', images/' if args.save_each else ''}, {SETTINGS} in {tqdm.format_interval(total_seconds)} total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
