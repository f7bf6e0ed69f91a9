"""Train seed 002's diffusion Unet with a pure functional loop on pfunc parametrizations.

Run from the repository root::

    python -m examples.diffusion.train                 # the CPU preset: minutes on 2 cores
    python -m examples.diffusion.train --preset gpu    # the larger GPU preset (bf16, torch.compile)
    python -m examples.diffusion.train --resume results/<run>   # continue a killed run exactly

Everything lands in ``<results-dir>/<timestamp>_<dataset>_<size>px_dim<dim>/``:
``checkpoint.pt`` (params, state, optimizer, EMA, step, RNG states, config),
``losses.jsonl`` (one line per step), ``loss.png``, ``samples.png``, ``data.png``
(real images for comparison), ``metrics.json``. See ``--help`` for every flag.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from examples.plotting import save_image_grid, save_line_plot

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PRESETS, RUN_OPTIONS, ConfigError, TrainConfig, config_differences, flag, validate
from .data import BatchOrder, draw_shapes, load_image_folder
from .gaussian_diffusion import GaussianDiffusion, beta_schedule
from .progress import ProgressBar, format_seconds
from .quality import evaluate_folder, evaluate_shapes
from .training import Generators, TrainState, draw_micro_batch, make_grad_fn, make_loss_fn, make_optimizer, train_step
from .unet import Unet, parametrize_unet

__all__ = ["build_parser", "resolve_config", "resolve_device", "build_model", "main", "SHAPES_TRAIN_SEED"]

SHAPES_TRAIN_SEED = 0  # the embedded training set is the same for every --seed
CHECKPOINT = "checkpoint.pt"
LOSSES = "losses.jsonl"


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
    p = argparse.ArgumentParser(
        prog="python -m examples.diffusion.train",
        description="Train seed 002's diffusion Unet functionally (torch.func + pfunc parametrizations) "
        "on embedded procedurally drawn shapes or a folder of images, then sample and score it.",
    )
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="defaults for every flag below: 'cpu' (a few minutes on 2 cores; used when no preset is given) "
                     "or 'gpu' (the seed's sizes, bf16 and torch.compile)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps to train" + _preset_note("steps"))
    length.add_argument("--epochs", type=float, help="train this many passes over the data instead of --steps")
    run.add_argument("--device", default="auto",
                     help="'auto' (the first CUDA device, else CPU; the default), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's choice, one per core); on a machine busy with "
                     "other jobs, 1 is often much faster than threads fighting for the cores")
    run.add_argument("--seed", type=int, help="seed of the model init, batch order, noise and sampling" + _preset_note("seed"))
    run.add_argument("--results-dir", default="results", help="parent folder of the timestamped run folder (default: results)")
    run.add_argument("--resume", metavar="PATH", default=None,
                     help="continue from a run folder or its checkpoint.pt (config from the checkpoint; given flags "
                     f"must match it, except {', '.join(flag(n) for n in sorted(RUN_OPTIONS))})")
    run.add_argument("--checkpoint-every", type=int, help="write checkpoint.pt every N steps" + _preset_note("checkpoint_every"))
    run.add_argument("--log-every", type=int, help="print a progress line every N steps when not on a terminal" + _preset_note("log_every"))
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast for the forward/backward" + _preset_note("bf16"))
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the gradient function" + _preset_note("compile"))
    run.add_argument("--compile-backend", default="inductor", help="torch.compile backend when --compile is on (default: inductor)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=("shapes", "folder"),
                      help="'shapes': embedded, procedurally drawn shapes (no download); 'folder': images under --data-dir"
                      + _preset_note("dataset"))
    data.add_argument("--data-dir", help="folder of images for --dataset folder (PNG built in; other formats need pillow)")
    data.add_argument("--train-size", type=int, help="number of shapes drawn for training" + _preset_note("train_size"))
    data.add_argument("--image-size", type=int,
                      help="image side in pixels; must be divisible by 2 ** (len(dim-mults) - 1)" + _preset_note("image_size"))
    data.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB)" + _preset_note("channels"))

    model = p.add_argument_group("model (seed 002's Unet)")
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
                      help="DDIM steps when below --timesteps, else full DDPM sampling" + _preset_note("sampling_steps"))
    diff.add_argument("--ddim-eta", type=float,
                      help="DDIM noise: 0 deterministic, 1 as stochastic as DDPM (better samples from a short run)"
                      + _preset_note("ddim_eta"))
    diff.add_argument("--num-samples", type=int, help="images in samples.png" + _preset_note("num_samples"))
    diff.add_argument("--eval-samples", type=int, help="images sampled for the quality score (0: skip it)" + _preset_note("eval_samples"))

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, help="images per forward/backward" + _preset_note("batch_size"))
    opt.add_argument("--grad-accum", type=int, help="forward/backward passes per optimizer step" + _preset_note("grad_accum"))
    opt.add_argument("--lr", type=float, help="AdamW learning rate" + _preset_note("lr"))
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay" + _preset_note("weight_decay"))
    opt.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0 disables" + _preset_note("max_grad_norm"))
    opt.add_argument("--ema-decay", type=float, help="decay of the EMA of the params (used for sampling)" + _preset_note("ema_decay"))
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

    On resume a given flag outside :data:`RUN_OPTIONS` that differs from the
    checkpoint raises :class:`ConfigError` listing every difference. Values are
    validated (:func:`validate`).
    """
    given = _given(args)
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
    if cfg.dataset == "folder" and cfg.data_dir is not None:
        cfg = cfg.replace(data_dir=os.path.abspath(cfg.data_dir))
    validate(cfg)
    return cfg


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; anything else is checked to exist."""
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {spec!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {spec}: MPS is not available on this machine")
        return device
    if device.type != "cpu":
        raise ConfigError(f"--device {spec!r}: unsupported device type {device.type!r}; expected cpu, cuda or mps")
    return device


# ------------------------------------------------------------------------------ building blocks
def build_model(cfg: TrainConfig):
    """``(unet, net, diffusion)``: the Unet (initialised from ``cfg.seed``), its pfunc parametrization, the process."""
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
        )
    net = parametrize_unet(unet)
    diffusion = GaussianDiffusion(
        beta_schedule(cfg.beta_schedule, cfg.timesteps),
        objective=cfg.objective,
        self_condition=cfg.self_condition,
        learned_variance=cfg.learned_variance,
    )
    return unet, net, diffusion


def load_data(cfg: TrainConfig) -> torch.Tensor:
    """The training images ``[N, C, S, S]`` in ``[0, 1]`` (CPU)."""
    if cfg.dataset == "shapes":
        images, _ = draw_shapes(cfg.train_size, cfg.image_size, cfg.channels, torch.Generator().manual_seed(SHAPES_TRAIN_SEED))
        return images
    images = load_image_folder(cfg.data_dir, cfg.image_size, cfg.channels)
    if images.shape[0] < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {images.shape[0]} images under --data-dir")
    return images


def _new_run_dir(results_dir: str, cfg: TrainConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(results_dir) / f"{stamp}_{cfg.dataset}_{cfg.image_size}px_dim{cfg.dim}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}_{i}"), i + 1
    path.mkdir(parents=True)
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_losses(path: Path) -> list[tuple[int, float]]:
    """``[(step, loss)]`` from a ``losses.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
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


def _checkpoint_payload(cfg: TrainConfig, ts: TrainState, gens: Generators) -> dict:
    cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
    return {
        "kind": "pfunc-diffusion",
        "config": cfg.to_dict(),
        "step": ts.step,
        "params": cpu(ts.params),
        "state": cpu(ts.state),
        "ema": cpu(ts.ema),
        "optimizer": ts.optimizer.state_dict(),
        "rng": gens.state_dict(),
        "torch_version": str(torch.__version__),
    }


def _check_tensors(what: str, saved: dict, expected: dict) -> None:
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    wrong = [f"{k}: {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    if missing or extra or wrong:
        raise CheckpointError(f"the checkpoint's {what} do not fit this model: missing {missing}, unexpected {extra}, shapes {wrong}")


def _restore(payload: dict, net, cfg: TrainConfig, device: torch.device, gens: Generators) -> TrainState:
    if payload.get("kind") != "pfunc-diffusion":
        raise CheckpointError(f"not a pfunc diffusion training checkpoint (kind {payload.get('kind')!r})")
    fresh_params, fresh_state = net.init()
    _check_tensors("params", payload["params"], fresh_params)
    _check_tensors("EMA params", payload["ema"], fresh_params)
    _check_tensors("state", payload["state"], fresh_state)
    params = {k: payload["params"][k].to(device).requires_grad_(True) for k in fresh_params}
    state = {k: payload["state"][k].to(device) for k in fresh_state}
    ema = {k: payload["ema"][k].to(device) for k in fresh_params}
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    optimizer.load_state_dict(payload["optimizer"])
    try:
        gens.load_state_dict(payload["rng"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return TrainState(params, state, ema, optimizer, int(payload["step"]))


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


@torch.no_grad()
def sample_images(net, diffusion: GaussianDiffusion, ema: dict, state: dict, n: int, cfg: TrainConfig, device: torch.device, batch: int = 500) -> torch.Tensor:
    """``n`` images in ``[0, 1]`` from the EMA params; the parametrized weights are materialised once (the explicit cache)."""
    values, _ = net.materialize(ema, state, training=False)
    model = lambda x, t, sc: net.apply(values, x, t, sc)  # noqa: E731
    g = torch.Generator(device=device).manual_seed(cfg.seed + 3)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out.append(diffusion.sample(model, (m, cfg.channels, cfg.image_size, cfg.image_size), g, cfg.sampling_steps, cfg.ddim_eta, device=device).float().cpu())
    return torch.cat(out)


def _evaluate(cfg: TrainConfig, samples: torch.Tensor, data: torch.Tensor, device: torch.device) -> dict:
    """The quality block of ``metrics.json``: FCD for the shapes, nearest-neighbour RMS for a folder."""
    if cfg.dataset == "shapes":
        return {"metric": "fcd", **evaluate_shapes(samples, cfg.image_size, cfg.channels, device)}
    return {"metric": "nn_rms", **evaluate_folder(samples, data[:2000].cpu())}


# ------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (2 for bad flags, 1 for a bad checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    # -- every check before any work
    payload = None
    try:
        if args.resume is not None:
            resume = Path(args.resume)
            ckpt_path = resume / CHECKPOINT if resume.is_dir() else resume
            payload = load_checkpoint(ckpt_path)
            if not isinstance(payload.get("config"), dict):
                raise CheckpointError(f"checkpoint {str(ckpt_path)!r} has no config")
            cfg = resolve_config(args, payload["config"])
        else:
            cfg = resolve_config(args)
        device = resolve_device(args.device)
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
        if args.epochs is not None:
            if args.epochs <= 0:
                raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    except ConfigError as e:
        parser.error(str(e))
    except CheckpointError as e:
        print(f"error: {e}\nRefusing to start from scratch: pass a valid checkpoint, or drop --resume to start a new run.", file=sys.stderr)
        return 1

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        data = load_data(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.epochs is not None:
        cfg = cfg.replace(steps=_steps_for_epochs(args.epochs, cfg, data.shape[0]))

    unet, net, diffusion = build_model(cfg)
    diffusion = diffusion.to(device)
    data = data.to(device)
    gens = Generators(
        order=BatchOrder(data.shape[0], cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1)),
        noise=torch.Generator(device=device).manual_seed(cfg.seed + 2),
        coin=torch.Generator().manual_seed(cfg.seed + 4),
    )
    if payload is not None:
        run_dir = ckpt_path.parent
        try:
            ts = _restore(payload, net, cfg, device, gens)
        except ConfigError as e:
            parser.error(str(e))
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _truncate_losses(run_dir / LOSSES, ts.step)
        print(f"resuming {run_dir} at step {ts.step}/{cfg.steps}")
    else:
        run_dir = _new_run_dir(args.results_dir, cfg)
        p0, s0 = net.init(generator=torch.Generator().manual_seed(cfg.seed))
        params = {k: v.to(device).detach().requires_grad_(True) for k, v in p0.items()}
        state = {k: v.to(device) for k, v in s0.items()}
        ema = {k: v.detach().clone() for k, v in params.items()}
        ts = TrainState(params, state, ema, make_optimizer(params, cfg.lr, cfg.weight_decay), 0)
        save_image_grid(run_dir / "data.png", data[: cfg.num_samples].cpu(), nrow=int(math.sqrt(cfg.num_samples)) or 1, scale=4)
    num_params = sum(p.numel() for p in ts.params.values())
    print(f"run folder: {run_dir}")
    print(f"device: {device}; Unet: {num_params / 1e6:.2f}M params, {len(net.chains)} weight-standardized convs; "
          f"data: {cfg.dataset} {tuple(data.shape)}; {cfg.steps} steps of {cfg.batch_size}x{cfg.grad_accum} images")

    loss_fn = make_loss_fn(net, diffusion, bf16=cfg.bf16, device_type=device.type)
    grad_fn = make_grad_fn(loss_fn, compile=cfg.compile, backend=args.compile_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # -- train
    start_step = ts.step
    bar = ProgressBar(cfg.steps, start_step, cfg.batch_size * cfg.grad_accum, log_every=cfg.log_every)
    t_train = time.perf_counter()
    loss = float("nan")
    with open(run_dir / LOSSES, "a") as log:
        while ts.step < cfg.steps:
            micro = [draw_micro_batch(data, gens, diffusion, cfg.self_condition, device) for _ in range(cfg.grad_accum)]
            loss = train_step(ts, grad_fn, micro, max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay,
                              ema_every=cfg.ema_every, ema_after=cfg.ema_after)
            if not math.isfinite(loss):
                print(f"\nerror: the loss is {loss} at step {ts.step}; stopping (try a lower --lr)", file=sys.stderr)
                return 1
            log.write(json.dumps({"step": ts.step, "loss": loss}) + "\n")
            log.flush()
            bar.update(ts.step, loss)
            if ts.step % cfg.checkpoint_every == 0 or ts.step == cfg.steps:
                save_checkpoint(run_dir / CHECKPOINT, _checkpoint_payload(cfg, ts, gens))
    bar.close()
    train_seconds = time.perf_counter() - t_train
    steps_run = ts.step - start_step
    images_per_second = steps_run * cfg.batch_size * cfg.grad_accum / train_seconds if steps_run else None
    if steps_run == 0:
        print(f"already trained to step {ts.step}: sampling and scoring only")

    # -- sample, score, plot
    t_sample = time.perf_counter()
    n = max(cfg.num_samples, cfg.eval_samples)
    samples = sample_images(net, diffusion, ts.ema, ts.state, n, cfg, device)
    sampling_seconds = time.perf_counter() - t_sample
    save_image_grid(run_dir / "samples.png", samples[: cfg.num_samples], nrow=int(math.sqrt(cfg.num_samples)) or 1, scale=4)
    losses = [l for _, l in read_losses(run_dir / LOSSES)]
    save_line_plot(run_dir / "loss.png", {"loss": losses, "mean of last 50": _trailing_mean(losses)}, title="training loss", log_y=True)

    t_eval = time.perf_counter()
    quality = _evaluate(cfg, samples[: cfg.eval_samples], data, device) if cfg.eval_samples >= 2 else {}
    eval_seconds = time.perf_counter() - t_eval

    tail = losses[-100:]
    metrics = {
        "config": cfg.to_dict(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": num_params,
        "step": ts.step,
        "resumed_from_step": start_step if payload is not None else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": losses[-1] if losses else None,
        "train_seconds": train_seconds,
        "images_per_second": images_per_second,
        "sampling_seconds": sampling_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "quality": quality,
        **_peak_memory(device),
    }
    _write_json(run_dir / "metrics.json", metrics)

    print(f"trained {steps_run} steps in {format_seconds(train_seconds)}"
          + (f" ({images_per_second:.0f} images/s)" if images_per_second else "")
          + f"; final loss (mean of last {len(tail)} steps) {metrics['final_loss']:.4f}")
    if quality:
        m = quality["metric"]
        print(f"sample quality {m} (lower is better): samples {quality['samples'][m]:.3f} | "
              f"brackets: real data {quality['real'][m]:.3f}, random noise {quality['noise'][m]:.3f}")
    print(f"wrote {run_dir}/samples.png, loss.png, metrics.json, {CHECKPOINT} in {format_seconds(metrics['total_seconds'])} total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
