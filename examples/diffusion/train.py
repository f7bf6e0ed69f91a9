"""Train the classic DDPM Unet (Ho et al.) with a pure functional loop on pfunc parametrizations.

Run from the repository root::

    .venv/bin/python -m examples.diffusion.train                 # the CPU preset: minutes on 2 cores
    .venv/bin/python -m examples.diffusion.train --preset gpu    # the larger GPU preset (bf16, torch.compile)
    .venv/bin/python -m examples.diffusion.train --resume results/<run>   # continue a stopped run exactly
    .venv/bin/python -m examples.diffusion.sample results/<run>  # new samples from it (examples/diffusion/sample.py)

Everything lands in ``<results-dir>/<timestamp>_<dataset>_<size>px_dim<dim>/``:
``checkpoint.pt`` (params, state, optimizer, EMA, step, RNG states, config),
``losses.jsonl`` (one line per step), ``loss.png``, ``samples.png``, ``data.png``
(real images for comparison), ``metrics.json``. See ``--help`` for every flag.

Every flag, the checkpoint (on ``--resume``), the output folder and the data are checked
before any work and before the run folder exists: a bad value is one line naming the flag
(exit status 2), a bad file or folder one line naming it (exit status 1). Ctrl-C saves a
checkpoint at the end of the current step and prints how to resume (exit status 130).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from examples.images import save_image_grid
from examples.plots import save_line_plot
from examples.progress import progress

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .cli import ShortErrorParser, choose_threads, check_compile_backend, check_memory, resolve_device
from .config import PRESETS, RUN_OPTIONS, SEED_LIMIT, ConfigError, TrainConfig, config_differences, flag, validate
from .data import BadImageError, BatchOrder, draw_shapes, load_image_folder
from .folders import FolderError, check_can_create, check_writable, new_timestamped_folder
from .interrupt import StopRequest, Stopped
from .model import build_model, sample_images, sampling_calls
from .quality import JUDGE_STEPS, evaluate
from .training import Generators, TrainState, draw_micro_batch, make_grad_fn, make_loss_fn, make_optimizer, train_step
from .training_checkpoint import CHECKPOINT, check_fits, check_payload, checkpoint_path, make_payload, restore

__all__ = ["build_parser", "resolve_config", "resolve_device", "build_model", "load_data", "read_losses", "main", "SHAPES_TRAIN_SEED"]

SHAPES_TRAIN_SEED = 0  # the embedded training set is the same for every --seed
LOSSES = "losses.jsonl"
PROG = "python -m examples.diffusion.train"
SAMPLE_PROG = "python -m examples.diffusion.sample"
DEFAULT_BACKEND = "inductor"


# ------------------------------------------------------------------------------ the command line
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
        prog=PROG,
        description="Train the classic DDPM Unet (Ho et al.; the denoising-diffusion-pytorch layout) functionally "
        "(torch.func + pfunc parametrizations) on embedded procedurally drawn shapes or a folder of images, then "
        f"sample and score it. New samples from a trained run: {SAMPLE_PROG} RUN.",
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
                     help="CPU threads for torch (default: one per idle core: the core count less the load average, "
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
    model.add_argument("--resnet-block-groups", type=int, help="GroupNorm groups in every Block" + _preset_note("resnet_block_groups"))
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
    opt.add_argument("--batch-size", type=int, help="images per forward/backward" + _preset_note("batch_size"))
    opt.add_argument("--grad-accum", type=int, help="forward/backward passes per optimizer step" + _preset_note("grad_accum"))
    opt.add_argument("--lr", type=float, help="AdamW learning rate (positive, finite)" + _preset_note("lr"))
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay (non-negative, finite)" + _preset_note("weight_decay"))
    opt.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (finite), 0 disables" + _preset_note("max_grad_norm"))
    opt.add_argument("--ema-decay", type=float, help="decay in [0, 1) of the EMA of the params (used for sampling)" + _preset_note("ema_decay"))
    opt.add_argument("--ema-every", type=int, help="update the EMA every N steps" + _preset_note("ema_every"))
    opt.add_argument("--ema-after", type=int, help="the EMA copies the params until this step" + _preset_note("ema_after"))
    return p


_CONFIG_FIELDS = tuple(TrainConfig.__dataclass_fields__)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields given on the command line (``None`` means not given)."""
    return {k: getattr(args, k) for k in _CONFIG_FIELDS if getattr(args, k, None) is not None}


def _steps_for_epochs(epochs: float, cfg: TrainConfig, num_examples: int) -> int:
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


# ------------------------------------------------------------------------------ building blocks
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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_losses(path: Path) -> list[tuple[int, float]]:
    """``[(step, loss)]`` from a ``losses.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            out.append((int(rec["step"]), float(rec["loss"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _truncate_losses(path: Path, step: int) -> None:
    """Keep only the log lines up to ``step`` (a killed run may have logged past its last checkpoint)."""
    kept = [(s, l) for s, l in read_losses(path) if s <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"step": s, "loss": l}) + "\n" for s, l in kept))
    os.replace(tmp, path)


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _trailing_mean(values: Sequence[float], window: int = 50) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _seconds(s: float) -> str:
    return tqdm.format_interval(s)


def _resume_hint(run_dir: Path) -> str:
    return f"{PROG} --resume {run_dir}"


# ------------------------------------------------------------------------------ checks before any work
@dataclass
class _Plan:
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


def _prepare(args: argparse.Namespace) -> _Plan:
    """Every check, in the order a user can fix them; nothing is written. Raises ConfigError, CheckpointError,
    FolderError or BadImageError."""
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
    device = resolve_device(args.device)
    image_bytes = cfg.channels * cfg.image_size**2 * 4
    if cfg.dataset == "shapes":
        check_memory(f"--train-size {cfg.train_size}", cfg.train_size * image_bytes)
    n_sampled = max(cfg.num_samples, cfg.eval_samples)
    check_memory(f"--num-samples {cfg.num_samples} / --eval-samples {cfg.eval_samples}", n_sampled * image_bytes)
    if args.compile_backend is not None or cfg.compile:
        check_compile_backend(args.compile_backend or DEFAULT_BACKEND)
    _, net, diffusion = build_model(cfg)

    run_dir = None
    if payload is not None:
        check_fits(payload, net, str(ckpt))
        run_dir = ckpt.parent
        step = payload["step"]
        if args.steps is not None and args.steps < step:
            raise ConfigError(
                f"--steps {args.steps} is below the checkpoint's step {step}: a run cannot train backwards "
                f"(pass --steps above {step} to train longer, or draw samples with: {SAMPLE_PROG} {run_dir})"
            )
        if args.epochs is None and step >= cfg.steps:
            return _Plan(cfg, device, net, diffusion, torch.empty(0), [], payload, run_dir, done=_finished(run_dir, step))
        try:
            check_writable(run_dir, "the run folder")
        except FolderError as e:
            raise FolderError(f"cannot resume: {e}; a resumed run writes its checkpoint and log there") from None
    else:
        check_can_create(args.results_dir, "--results-dir")

    note = choose_threads(args.threads)  # after every flag check, before the first real work
    if note:
        print(note, file=sys.stderr)
    data, skipped = load_data(cfg, skip_bad=args.skip_bad_images)
    if args.epochs is not None:
        cfg = cfg.replace(steps=_steps_for_epochs(args.epochs, cfg, data.shape[0]))
        if payload is not None:
            if cfg.steps < payload["step"]:
                raise ConfigError(f"--epochs {args.epochs:g} is {cfg.steps} steps, below the checkpoint's step {payload['step']}")
            if cfg.steps == payload["step"]:
                return _Plan(cfg, device, net, diffusion, data, skipped, payload, run_dir, done=_finished(run_dir, payload["step"]))
    return _Plan(cfg, device, net, diffusion, data, skipped, payload, run_dir)


def _finished(run_dir: Path, step: int) -> str:
    return (
        f"{run_dir} is already trained to step {step}: nothing to train, nothing written. Train longer with "
        f"{_resume_hint(run_dir)} --steps N (N > {step}); draw new samples with: {SAMPLE_PROG} {run_dir}"
    )


# ------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (1 for a bad file, folder or checkpoint, 130 after Ctrl-C).

    Bad flags exit through ``SystemExit(2)`` (argparse's convention) with one line naming the flag.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    try:
        plan = _prepare(args)
    except ConfigError as e:
        parser.error(str(e))
    except CheckpointError as e:
        print(f"error: {e} (refusing to start from scratch: pass a valid checkpoint, or drop --resume to start a new run)",
              file=sys.stderr)
        return 1
    except (FolderError, BadImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted before training started: nothing was written", file=sys.stderr)
        return 130
    if plan.done is not None:
        print(plan.done)
        return 0
    for message in plan.skipped[:10]:
        print(f"warning: skipped {message}", file=sys.stderr)
    if plan.skipped:
        more = f" ({len(plan.skipped) - 10} more not shown)" if len(plan.skipped) > 10 else ""
        print(f"warning: --skip-bad-images left out {len(plan.skipped)} of {len(plan.skipped) + plan.data.shape[0]} "
              f"image files{more}", file=sys.stderr)
    try:
        return _train(args, parser, plan, t_start)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the guarded loops
        print("\ninterrupted: stopped at once; every checkpoint is written atomically, so the last one written is intact",
              file=sys.stderr)
        return 130


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser, plan: _Plan, t_start: float) -> int:
    cfg, device, net = plan.cfg, plan.device, plan.net
    diffusion = plan.diffusion.to(device)
    data = plan.data.to(device)
    gens = Generators(
        order=BatchOrder(data.shape[0], cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1)),
        noise=torch.Generator(device=device).manual_seed(cfg.seed + 2),
        coin=torch.Generator().manual_seed(cfg.seed + 4),
    )
    if plan.payload is not None:
        run_dir = plan.run_dir
        where = str(run_dir / CHECKPOINT)
        try:
            ts = restore(plan.payload, net, cfg, device, gens, where)
        except ConfigError as e:
            parser.error(str(e))
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            _truncate_losses(run_dir / LOSSES, ts.step)
        except OSError as e:
            print(f"error: cannot rewrite {run_dir / LOSSES}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"resuming {run_dir} at step {ts.step}/{cfg.steps}")
        saved_step: Optional[int] = ts.step
        created = False
    else:
        try:
            run_dir = new_timestamped_folder(args.results_dir, f"{cfg.dataset}_{cfg.image_size}px_dim{cfg.dim}")
        except OSError as e:
            print(f"error: cannot create the run folder under --results-dir {args.results_dir!r}: {e.strerror or e}", file=sys.stderr)
            return 1
        created = True
        saved_step = None
        try:
            p0, s0 = net.init(generator=torch.Generator().manual_seed(cfg.seed))
            params = {k: v.to(device).detach().requires_grad_(True) for k, v in p0.items()}
            state = {k: v.to(device) for k, v in s0.items()}
            ema = {k: v.detach().clone() for k, v in params.items()}
            ts = TrainState(params, state, ema, make_optimizer(params, cfg.lr, cfg.weight_decay), 0)
            save_image_grid(run_dir / "data.png", data[: cfg.num_samples].cpu(), nrow=int(math.sqrt(cfg.num_samples)) or 1, scale=4)
        except (OSError, ValueError) as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"error: cannot write in the new run folder {run_dir}: {e}; removed it", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # before the loop that turns Ctrl-C into a clean stop: leave no half-made folder
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
    num_params = sum(p.numel() for p in ts.params.values())
    print(f"run folder: {run_dir}")
    print(f"device: {device}; threads: {torch.get_num_threads()}; Unet: {num_params / 1e6:.2f}M params, "
          f"{len(net.chains)} weight-standardized convs; data: {cfg.dataset} {tuple(data.shape)}; "
          f"{cfg.steps} steps of {cfg.batch_size}x{cfg.grad_accum} images")

    loss_fn = make_loss_fn(net, diffusion, bf16=cfg.bf16, device_type=device.type)
    grad_fn = make_grad_fn(loss_fn, compile=cfg.compile, backend=args.compile_backend or DEFAULT_BACKEND)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # -- train; Ctrl-C ends the current step, saves and says how to resume
    start_step = ts.step
    images_per_step = cfg.batch_size * cfg.grad_accum
    where = run_dir / CHECKPOINT

    def save() -> None:
        nonlocal saved_step
        save_checkpoint(where, make_payload(cfg, ts, gens))
        saved_step = ts.step

    def last_checkpoint() -> str:
        return f"{where} (step {saved_step}) is intact" if saved_step is not None else "no checkpoint was written yet"

    bar = progress(cfg.steps, initial=start_step, desc="train", unit="step", log_every=cfg.log_every)
    t_train = time.perf_counter()
    try:
        with StopRequest() as stop, open(run_dir / LOSSES, "a") as log:
            while ts.step < cfg.steps and not stop.requested:
                micro = [draw_micro_batch(data, gens, diffusion, cfg.self_condition, device) for _ in range(cfg.grad_accum)]
                loss = train_step(ts, grad_fn, micro, max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay,
                                  ema_every=cfg.ema_every, ema_after=cfg.ema_after)
                if not math.isfinite(loss):
                    bar.close()
                    print(f"error: the loss is {loss} at step {ts.step}; stopping (try a lower --lr); {last_checkpoint()}", file=sys.stderr)
                    return 1
                log.write(json.dumps({"step": ts.step, "loss": loss}) + "\n")
                log.flush()
                elapsed = time.perf_counter() - t_train
                bar.update(1, loss=loss, **{"img/s": (ts.step - start_step) * images_per_step / max(elapsed, 1e-9)})
                if ts.step % cfg.checkpoint_every == 0 or ts.step == cfg.steps:
                    save()
            if stop.requested:
                if saved_step != ts.step:
                    save()
                bar.close()
                print(f"{stop.signal_name}: stopped at step {ts.step}/{cfg.steps} and saved {where}; "
                      f"resume with: {_resume_hint(run_dir)}", file=sys.stderr)
                return stop.exit_status
    except CheckpointError as e:
        bar.close()
        print(f"error: {e}; training stopped at step {ts.step}"
              + (f"; resume from step {saved_step} with: {_resume_hint(run_dir)}" if saved_step is not None else ""), file=sys.stderr)
        return 1
    except OSError as e:
        bar.close()
        print(f"error: cannot write {run_dir / LOSSES}: {e.strerror or e}; training stopped at step {ts.step}; {last_checkpoint()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        if created and saved_step is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"\nstopped at once by a second Ctrl-C at step {ts.step}, before any checkpoint: removed {run_dir}",
                  file=sys.stderr)
        else:
            print(f"\nstopped at once by a second Ctrl-C at step {ts.step}; {last_checkpoint()}; "
                  f"resume with: {_resume_hint(run_dir)}", file=sys.stderr)
        return 130
    bar.close()
    train_seconds = time.perf_counter() - t_train
    steps_run = ts.step - start_step
    images_per_second = steps_run * images_per_step / train_seconds if steps_run else None

    # -- sample and score the final EMA weights, with progress; Ctrl-C stops here without writing
    n = max(cfg.num_samples, cfg.eval_samples)
    t_sample = time.perf_counter()
    quality: dict = {}
    try:
        with StopRequest() as stop:
            total = sampling_calls(n, 500, diffusion, cfg.sampling_steps)
            with progress(total, desc="sample", unit="step", log_every=max(1, total // 10)) as sbar:
                samples = sample_images(net, diffusion, ts.ema, ts.state, n, cfg, seed=cfg.seed + 3,
                                        sampling_steps=cfg.sampling_steps, eta=cfg.ddim_eta, device=device, batch_size=500,
                                        bf16=cfg.bf16, on_step=lambda: (stop.check(), sbar.update()))
            sampling_seconds = time.perf_counter() - t_sample
            t_eval = time.perf_counter()
            if cfg.eval_samples >= 2:
                steps = JUDGE_STEPS if cfg.dataset == "shapes" else 0
                with progress(steps, desc="score (training the judge)", unit="step", log_every=max(1, steps // 10)) as qbar:
                    quality = evaluate(samples[: cfg.eval_samples], dataset=cfg.dataset, image_size=cfg.image_size,
                                       channels=cfg.channels, device=device, reference=data,
                                       on_step=lambda: (stop.check(), qbar.update()))
            eval_seconds = time.perf_counter() - t_eval
    except Stopped as e:
        print(f"{e}: stopped while sampling; training is complete and {where} (step {ts.step}) is saved; "
              f"draw samples with: {SAMPLE_PROG} {run_dir}", file=sys.stderr)
        return 130

    losses = read_losses(run_dir / LOSSES)
    tail = [l for _, l in losses[-100:]]
    metrics = {
        "config": cfg.to_dict(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": num_params,
        "step": ts.step,
        "resumed_from_step": start_step if plan.payload is not None else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": tail[-1] if tail else None,
        "train_seconds": train_seconds,
        "images_per_second": images_per_second,
        "sampling_seconds": sampling_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "quality": quality,
        **_peak_memory(device),
    }
    try:
        save_image_grid(run_dir / "samples.png", samples[: cfg.num_samples], nrow=int(math.sqrt(cfg.num_samples)) or 1, scale=4)
        save_line_plot(run_dir / "loss.png", {"loss": [l for _, l in losses], "mean of last 50": _trailing_mean([l for _, l in losses])},
                       x=[s for s, _ in losses], title="training loss", ylabel="loss (log scale)", log_y=True)
        _write_json(run_dir / "metrics.json", metrics)
    except (OSError, ValueError) as e:
        print(f"error: cannot write the run's samples, plot or metrics: {e}; training is complete and {where} "
              f"(step {ts.step}) is saved; draw samples with: {SAMPLE_PROG} {run_dir}", file=sys.stderr)
        return 1

    print(f"trained {steps_run} steps in {_seconds(train_seconds)}"
          + (f" ({images_per_second:.0f} images/s)" if images_per_second else "")
          + (f"; final loss (mean of last {len(tail)} steps) {metrics['final_loss']:.4f}" if tail else ""))
    if quality:
        m = quality["metric"]
        print(f"sample quality {m} (lower is better): samples {quality['samples'][m]:.3f} | "
              f"brackets: real data {quality['real'][m]:.3f}, random noise {quality['noise'][m]:.3f}")
    print(f"wrote {run_dir}: {CHECKPOINT} (step {ts.step}), samples.png, loss.png, metrics.json "
          f"in {_seconds(metrics['total_seconds'])} total")
    print(f"new samples from it: {SAMPLE_PROG} {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
