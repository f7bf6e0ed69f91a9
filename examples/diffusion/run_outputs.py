"""What a training run writes besides its checkpoint: the loss log while it trains, then samples, the
loss plot and ``metrics.json`` when it is done.

``losses.jsonl`` gets one ``{"step": s, "loss": l}`` line per optimizer step (the global batch's
mean loss), flushed as it goes; :func:`read_losses` skips a torn last line from a kill and
:func:`truncate_losses` drops the lines a killed run logged past its last checkpoint, so a resumed
run's log has every step once. :func:`finish_run` samples and scores the final EMA weights (with
progress; Ctrl-C stops it without writing) and writes ``samples.png``, ``loss.png`` and
``metrics.json``.

>>> import tempfile
>>> from pathlib import Path
>>> log = Path(tempfile.mkdtemp()) / LOSSES
>>> _ = log.write_text('{"step": 1, "loss": 0.5}\\n{"step": 2, "loss": 0.25}\\n{"step": 3, "lo')
>>> read_losses(log)
[(1, 0.5), (2, 0.25)]
>>> truncate_losses(log, 1); read_losses(log)
[(1, 0.5)]
"""

from __future__ import annotations

import json
import math
import shlex
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from examples.atomic import write_atomically
from examples.images import save_image_grid
from examples.plots import save_line_plot
from examples.progress import progress

from .config import TrainConfig
from .interrupt import StopNow, StopRequest, Stopped
from .model import sample_images, sampling_calls
from .quality import JUDGE_STEPS, evaluate
from .train_args import sample_command
from .training import TrainState
from .training_checkpoint import CHECKPOINT

__all__ = ["LOSSES", "RunTimes", "read_losses", "truncate_losses", "write_json", "trailing_mean", "peak_memory", "seconds", "finish_run"]

LOSSES = "losses.jsonl"


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


def truncate_losses(path: Path, step: int) -> None:
    """Keep only the log lines up to ``step`` (a killed run may have logged past its last checkpoint),
    atomically (a failed rewrite leaves the log as it was)."""
    kept = [(s, l) for s, l in read_losses(path) if s <= step]
    text = "".join(json.dumps({"step": s, "loss": l}) + "\n" for s, l in kept)
    write_atomically(path, lambda f: f.write(text.encode()), what="the loss log")


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()), what=path.name)


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory: CUDA's allocator peak on a GPU, the resident set size otherwise."""
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def trailing_mean(values: Sequence[float], window: int = 50) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def seconds(s: float) -> str:
    """``s`` seconds as ``mm:ss`` (``h:mm:ss`` past an hour)."""
    return tqdm.format_interval(s)


@dataclass(frozen=True)
class RunTimes:
    """How the training went: when the command started, the steps this call trained and how long they took."""

    t_start: float
    start_step: int
    train_seconds: float
    images_per_step: int
    resumed: bool
    processes: int = 1

    def images_per_second(self, step: int) -> Optional[float]:
        """Training images per second (the global batch: every process together), ``None`` when nothing was trained."""
        run = step - self.start_step
        return run * self.images_per_step / self.train_seconds if run and self.train_seconds > 0 else None


def finish_run(run_dir: Path, cfg: TrainConfig, net: Any, diffusion: Any, ts: TrainState, data: torch.Tensor,
               device: torch.device, times: RunTimes, stop: StopRequest, *, score: int) -> int:
    """Sample ``ts.ema`` and score ``score`` of the samples (0: no score), write ``samples.png``, ``loss.png``,
    ``metrics.json`` and print the summary. ``stop`` (the run's): a signal stops the sampling and scoring at once.

    Returns the exit status: 0; 130 after Ctrl-C, 143 after SIGTERM while sampling or scoring (nothing written);
    1 when a file cannot be written (one line each; the checkpoint is already saved).
    """
    where = run_dir / CHECKPOINT
    n = max(cfg.num_samples, score)
    t_sample = time.perf_counter()
    quality: dict = {}
    doing = f"stopping the sampling now; training is complete and {where} (step {ts.step}) is saved"
    try:
        with stop.phase(doing, at_once=True):
            total = sampling_calls(n, 500, diffusion, cfg.sampling_steps)
            with progress(total, desc="sample", unit="step", log_every=max(1, total // 10)) as sbar:
                samples = sample_images(net, diffusion, ts.ema, ts.state, n, cfg, seed=cfg.seed + 3,
                                        sampling_steps=cfg.sampling_steps, eta=cfg.ddim_eta, device=device, batch_size=500,
                                        bf16=cfg.bf16, on_step=lambda: (stop.check(), sbar.update()))
            sampling_seconds = time.perf_counter() - t_sample
            t_eval = time.perf_counter()
            if score >= 2:
                steps = JUDGE_STEPS if cfg.dataset == "shapes" else 0
                with progress(steps, desc="score (training the judge)", unit="step", log_every=max(1, steps // 10)) as qbar:
                    quality = evaluate(samples[:score], dataset=cfg.dataset, image_size=cfg.image_size,
                                       channels=cfg.channels, device=device, reference=data,
                                       on_step=lambda: (stop.check(), qbar.update()))
            eval_seconds = time.perf_counter() - t_eval
    except (Stopped, StopNow) as e:
        print(f"{e}: stopped while sampling; training is complete and {where} (step {ts.step}) is saved; "
              f"draw samples with: {sample_command()} {shlex.quote(str(run_dir))}", file=sys.stderr)
        return stop.exit_status

    losses = read_losses(run_dir / LOSSES)
    tail = [l for _, l in losses[-100:]]
    steps_run = ts.step - times.start_step
    images_per_second = times.images_per_second(ts.step)
    metrics = {
        "config": cfg.to_dict(),
        "device": str(device),
        "processes": times.processes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": sum(p.numel() for p in ts.params.values()),
        "step": ts.step,
        "resumed_from_step": times.start_step if times.resumed else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "last_loss": tail[-1] if tail else None,
        "train_seconds": times.train_seconds,
        "images_per_second": images_per_second,
        "sampling_seconds": sampling_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - times.t_start,
        "quality": quality,
        **peak_memory(device),
    }
    try:
        save_image_grid(run_dir / "samples.png", samples[: cfg.num_samples], nrow=int(math.sqrt(cfg.num_samples)) or 1, scale=4)
        save_line_plot(run_dir / "loss.png", {"loss": [l for _, l in losses], "mean of last 50": trailing_mean([l for _, l in losses])},
                       x=[s for s, _ in losses], title="training loss", ylabel="loss (log scale)", log_y=True)
        write_json(run_dir / "metrics.json", metrics)
    except (OSError, ValueError) as e:
        print(f"error: cannot write the run's samples, plot or metrics: {e}; training is complete and {where} "
              f"(step {ts.step}) is saved; draw samples with: {sample_command()} {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 1

    print(f"trained {steps_run} steps in {seconds(times.train_seconds)}"
          + (f" ({images_per_second:.0f} images/s)" if images_per_second else "")
          + (f"; final loss (mean of last {len(tail)} steps) {metrics['final_loss']:.4f}" if tail else ""))
    again = f"{sample_command()} {shlex.quote(str(run_dir))}"
    if quality:
        m = quality["metric"]
        print(f"sample quality {m} (lower is better): samples {quality['samples'][m]:.3f} | "
              f"brackets: real data {quality['real'][m]:.3f}, random noise {quality['noise'][m]:.3f}")
    elif cfg.eval_samples >= 2:  # the preset's score, skipped for a trial run (train_plan.scored_samples)
        print(f"no sample quality score for a trial run of {ts.step} steps, where it says little (pass --eval-samples "
              f"{cfg.eval_samples} to score anyway); score this run with: {again} --score --num-samples {cfg.eval_samples}")
    print(f"wrote {run_dir}: {', '.join(written(ts.step))} in {seconds(metrics['total_seconds'])} total")
    print(f"new samples from it: {again}")
    return 0


def written(step: int) -> list[str]:
    """The files a finished run wrote, as its closing line lists them."""
    return [f"{CHECKPOINT} (step {step})", LOSSES, "data.png", "samples.png", "loss.png", "metrics.json"]
