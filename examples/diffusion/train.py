"""Train the classic DDPM Unet (Ho et al.) with a pure functional loop on pfunc parametrizations.

Run from the repository root::

    .venv/bin/python -m examples.diffusion.train                 # the CPU preset: minutes on 2 cores
    .venv/bin/python -m examples.diffusion.train --preset gpu    # the larger GPU preset (bf16, torch.compile)
    .venv/bin/python -m examples.diffusion.train --resume results/<run>   # continue a stopped run exactly
    .venv/bin/python -m examples.diffusion.sample results/<run>  # new samples from it (examples/diffusion/sample.py)
    .venv/bin/torchrun --nproc_per_node=2 -m examples.diffusion.train   # one model, 2 processes (data parallel)

Everything lands in ``<results-dir>/<timestamp>_<dataset>_<size>px_dim<dim>/``:
``checkpoint.pt`` (params, state, optimizer, EMA, step, RNG states, config),
``losses.jsonl`` (one line per step), ``loss.png``, ``samples.png``, ``data.png``
(real images for comparison), ``metrics.json``. See ``--help`` for every flag.

Every flag, the checkpoint (on ``--resume``), the output folder and the data are checked
before any work and before the run folder exists: a bad value is one line naming the flag
(exit status 2), a bad file or folder one line naming it (exit status 1). Ctrl-C, or the SIGTERM
a batch scheduler sends, is acknowledged at once, saves a checkpoint at the end of the current step
and prints a resume command that runs as printed (exit status 130, 143 for SIGTERM); before the
first step, while ``torch.compile`` compiles it, and while sampling at the end, the run stops at once
instead (:mod:`.interrupt`): nothing of value is lost there. ``--preset gpu`` without a GPU is refused
unless ``--device cpu`` asks for the CPU.

Under torchrun (:mod:`.data_parallel`) every rank runs this loop on its slice of each global
batch; rank 0 alone writes and prints; a failed rank makes the others stop with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import torch

import pfunc as pf
from examples.progress import progress
from examples.torchrun import Launch, LaunchError, launch_from_env, let_the_reporting_rank_speak, silenced

from .checkpoint import CheckpointError, save_checkpoint
from .cli import resolve_device
from .config import ConfigError
from .data import BadImageError
from .data_parallel import DEFAULT_TIMEOUT_S, DataParallel, RankFailure, choose_backend, random_streams, rank_device, start_data_parallel
from .folders import FolderError
from .interrupt import StopNow, StopRequest
from .model import build_model
from .run_outputs import LOSSES, RunTimes, finish_run, read_losses
from .train_args import DEFAULT_BACKEND, build_parser, check_launch_flags, resolve_config
from .train_plan import SHAPES_TRAIN_SEED, Plan, load_data, prepare, resume_hint, say_notes
from .run_start import start_run
from .training import draw_micro_batch, make_generators, make_grad_fn, make_loss_fn, train_step
from .training_checkpoint import CHECKPOINT, make_payload

__all__ = ["build_parser", "resolve_config", "resolve_device", "build_model", "load_data", "read_losses", "main", "SHAPES_TRAIN_SEED"]


# ------------------------------------------------------------------------------ main
_INTERRUPTED_AT_ONCE = "\ninterrupted: stopped at once; every checkpoint is written atomically, so the last one written is intact"
_PREPARING = "stopping now, before training starts: nothing is written"
_COMPILING = ("torch.compile is compiling the first step, which can take minutes and cannot be cut at a step boundary: "
              "stopping as soon as the compiler hands back control; nothing trained is lost")


def _stopped_before(e: BaseException) -> str:
    """What a stop before the first training step says (a first signal, or a second Ctrl-C)."""
    name = e.args[0] if isinstance(e, StopNow) else "SIGINT"
    return f"{name}: stopped before training started: nothing was written"


def _status(e: BaseException) -> int:
    return e.exit_status if isinstance(e, StopNow) else 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (1 for a bad file, folder or checkpoint, 130 after Ctrl-C, 143 after
    SIGTERM).

    Bad flags exit through ``SystemExit(2)`` (argparse's convention) with one line naming the flag.
    Under torchrun (``RANK``/``WORLD_SIZE`` set) every process trains its slice; rank 0 speaks for all.
    """
    parser = build_parser()
    try:
        launch = launch_from_env()
    except LaunchError as e:
        parser.error(str(e))
    if launch is not None:
        return _main_ranks(parser, argv, launch)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    with StopRequest() as stop:
        try:
            with stop.phase(_PREPARING, at_once=True):
                check_launch_flags(args, None)
                plan, refusal = _checked_plan(args, parser)
        except ConfigError as e:
            parser.error(str(e))
        except (KeyboardInterrupt, StopNow) as e:
            print(_stopped_before(e), file=sys.stderr)
            return _status(e)
        if refusal is not None:
            status, message = refusal
            if status == 2:
                parser.exit(2, message + "\n")  # argparse's way out for a bad flag: SystemExit(2)
            print(message, file=sys.stderr)
            return status
        if plan.done is not None:
            print(plan.done)
            return 0
        say_notes(plan)
        try:
            return _train(args, parser, plan, t_start, stop)
        except StopNow as e:  # while the run folder was being made (and was removed)
            print(_stopped_before(e), file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the guarded loops
            print(_INTERRUPTED_AT_ONCE, file=sys.stderr)
            return 130


def _checked_plan(args: argparse.Namespace, parser: argparse.ArgumentParser,
                  dp: Optional[DataParallel] = None) -> tuple[Optional[Plan], Optional[tuple[int, str]]]:
    """``(plan, None)`` when every check passes, else ``(None, (exit status, the one-line message))``: 2 for a bad
    flag (with the --help hint), 1 for a bad checkpoint, folder or image file."""
    try:
        return prepare(args, dp), None
    except ConfigError as e:
        return None, (2, f"error: {e}\n({parser.prog} --help explains every flag)")
    except CheckpointError as e:
        return None, (1, f"error: {e} (refusing to start from scratch: pass a valid checkpoint, or drop --resume to start a new run)")
    except (FolderError, BadImageError) as e:
        return None, (1, f"error: {e}")


def _main_ranks(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], launch: Launch) -> int:
    """One rank of a torchrun job: the same checks on every rank, agreed on before any work; rank 0 reports them."""
    with silenced(not launch.is_writer):  # the same argv on every rank: rank 0 alone says what is wrong with it
        args = parser.parse_args(argv)
    t_start = time.perf_counter()
    try:
        check_launch_flags(args, launch.world_size)
        device = rank_device(args.device, launch)
        backend = choose_backend(args.backend, device)
    except ConfigError as e:  # before the process group exists: one voice per machine
        if launch.local_rank == 0:
            parser.error(str(e))
        let_the_reporting_rank_speak()
        return 2
    with StopRequest(announce=launch.is_writer) as stop:
        try:
            with stop.phase(_PREPARING, at_once=True):
                dp = start_data_parallel(launch, device, backend, timeout_s=args.dist_timeout or DEFAULT_TIMEOUT_S,
                                         zero=bool(args.zero), bucket_cap_mb=args.bucket_cap_mb or pf.distributed.DEFAULT_BUCKET_CAP_MB)
        except LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, StopNow) as e:
            if launch.is_writer:
                print(_stopped_before(e), file=sys.stderr)
            return _status(e)
        try:
            return _run_ranks(args, parser, dp, t_start, stop)
        except RankFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except StopNow as e:
            if dp.is_writer:
                print(_stopped_before(e), file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt:
            if dp.is_writer:
                print(_INTERRUPTED_AT_ONCE, file=sys.stderr)
            return 130
        finally:
            dp.close()


def _run_ranks(args: argparse.Namespace, parser: argparse.ArgumentParser, dp: DataParallel, t_start: float,
               stop: StopRequest) -> int:
    try:
        with stop.phase(_PREPARING, at_once=True):
            plan, outcome = _checked_plan(args, parser, dp)
    except (KeyboardInterrupt, StopNow) as e:
        if dp.is_writer:
            print(_stopped_before(e), file=sys.stderr)
        return _status(e)
    outcomes = dp.gather(outcome, "agreeing on the checks")
    failed = [o for o in outcomes if o is not None]
    if failed:  # every rank stops; rank 0 says why, another rank only what rank 0 did not say
        if outcome is not None and (dp.is_writer or outcome != outcomes[0]):
            print(("" if dp.is_writer else f"rank {dp.rank} of {dp.world_size}: ") + outcome[1], file=sys.stderr)
        return failed[0][0]
    if plan.done is not None:
        if dp.is_writer:
            print(plan.done)
        return 0
    if dp.is_writer:
        say_notes(plan)
    return _train(args, parser, plan, t_start, stop, dp)


# ------------------------------------------------------------------------------ training
class _Silent:
    """The progress display of a rank that is not the writer: shows nothing."""

    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser, plan: Plan, t_start: float, stop: StopRequest,
           dp: Optional[DataParallel] = None) -> int:
    cfg, device, net = plan.cfg, plan.device, plan.net
    writer = dp is None or dp.is_writer
    say = print if writer else (lambda *a, **k: None)
    diffusion = plan.diffusion.to(device)
    data = plan.data.to(device)
    gens = make_generators(cfg.seed, data.shape[0], cfg.batch_size, device)
    with stop.phase(_PREPARING, at_once=True):
        ts, run_dir, status = start_run(plan, cfg, device, gens, args, parser, dp)
    if ts is None:
        return status
    created = plan.payload is None and writer
    saved_step: Optional[int] = ts.step if plan.payload is not None else None
    if dp is not None:
        try:
            ts.state = dp.start_identical(ts.params, ts.state, random_streams(gens))
        except ValueError as e:  # the random streams differ: each rank would train on other batches
            say(f"error: {e}", file=sys.stderr)
            return 1
    num_params = sum(p.numel() for p in ts.params.values())
    ranks = "" if dp is None else (
        f" across {dp.world_size} processes ({cfg.batch_size // dp.world_size} images each, {dp.backend}"
        f"{', ZeRO' if dp.zero else ''})")
    say(f"run folder: {run_dir}")
    say(f"device: {device}; threads: {torch.get_num_threads()}; Unet: {num_params / 1e6:.2f}M params, "
        f"{len(net.chains)} weight-standardized convs; data: {cfg.dataset} {tuple(data.shape)}; "
        f"{cfg.steps} steps of {cfg.batch_size}x{cfg.grad_accum} images{ranks}")

    loss_fn = make_loss_fn(net, diffusion, bf16=cfg.bf16, device_type=device.type)
    average = None
    if dp is not None and not cfg.compile and cfg.grad_accum == 1:  # one eager backward: all-reduce inside it
        grad_fn = dp.overlapped_grad_fn(loss_fn)
    else:
        grad_fn = make_grad_fn(loss_fn, compile=cfg.compile, backend=args.compile_backend or DEFAULT_BACKEND)
        average = None if dp is None else dp.averager()
    rows = None if dp is None else dp.rows(cfg.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # -- train; Ctrl-C ends the current step (on every rank), saves and says how to resume
    start_step = ts.step
    images_per_step = cfg.batch_size * cfg.grad_accum
    where = run_dir / CHECKPOINT

    def save() -> None:
        nonlocal saved_step
        if dp is not None:
            dp.before_save(ts.optimizer, ts.params)
        if writer:
            save_checkpoint(where, make_payload(cfg, ts, gens))
        saved_step = ts.step

    def last_checkpoint() -> str:
        return f"{where} (step {saved_step}) is intact" if saved_step is not None else "no checkpoint was written yet"

    def step() -> float:
        micro = [draw_micro_batch(data, gens, diffusion, cfg.self_condition, device, rows) for _ in range(cfg.grad_accum)]
        return train_step(ts, grad_fn, micro, max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay,
                          ema_every=cfg.ema_every, ema_after=cfg.ema_after, average=average)

    compiling = cfg.compile  # the first step compiles: a stop then is at once (nothing is saved, nothing lost)

    def first_or_next_step() -> float:
        nonlocal compiling
        if not compiling:
            return step() if dp is None else dp.collective("the training step", step)
        with stop.phase(_COMPILING, at_once=True):
            loss = step() if dp is None else dp.collective("the training step", step)
        compiling = False
        return loss

    bar = progress(cfg.steps, initial=start_step, desc="train", unit="step", log_every=cfg.log_every) if writer else _Silent()
    t_train = time.perf_counter()
    try:
        with (open(run_dir / LOSSES, "a") if writer else contextlib.nullcontext()) as log:
            agreed_stop = False
            while ts.step < cfg.steps and not (stop.requested if dp is None else agreed_stop):
                if dp is None:
                    loss = first_or_next_step()
                else:
                    before = ts.state
                    loss = first_or_next_step()
                    loss, agreed_stop = dp.agree(loss, stop.requested)  # the global mean; any rank's Ctrl-C stops all
                    ts.state = dp.sync_buffers(before, ts.state)
                if not math.isfinite(loss):
                    bar.close()
                    say(f"error: the loss is {loss} at step {ts.step}; stopping (try a lower --lr); {last_checkpoint()}", file=sys.stderr)
                    return 1
                if writer:
                    log.write(json.dumps({"step": ts.step, "loss": loss}) + "\n")
                    log.flush()
                elapsed = time.perf_counter() - t_train
                bar.update(1, loss=loss, **{"img/s": (ts.step - start_step) * images_per_step / max(elapsed, 1e-9)})
                if ts.step % cfg.checkpoint_every == 0 or ts.step == cfg.steps:
                    save()
            if (stop.requested or agreed_stop) and ts.step < cfg.steps:  # after the last step: the sampling says it
                if saved_step != ts.step:
                    save()
                bar.close()
                name = stop.signal_name or "a stop request on another rank"
                say(f"{name}: stopped at step {ts.step}/{cfg.steps} and saved {where}; "
                    f"resume with: {resume_hint(run_dir, dp)}", file=sys.stderr)
                return stop.exit_status
    except RankFailure as e:  # a peer died or stalled: this rank stops; the last checkpoint is the way back
        bar.close()
        # only rank 0 knows whether its last save went through; another rank names the folder, not a step
        saved = last_checkpoint() if writer else f"rank 0 writes the checkpoints in {run_dir}"
        print(f"error: {e}; {saved}; resume with: {resume_hint(run_dir, dp)}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        bar.close()
        print(f"error: {e}; training stopped at step {ts.step}"
              + (f"; resume from step {saved_step} with: {resume_hint(run_dir, dp)}" if saved_step is not None else ""), file=sys.stderr)
        return 1
    except OSError as e:
        bar.close()
        print(f"error: cannot write {run_dir / LOSSES}: {e.strerror or e}; training stopped at step {ts.step}; {last_checkpoint()}",
              file=sys.stderr)
        return 1
    except StopNow as e:  # while compiling the first step: nothing of this call's training to save
        bar.close()
        if created and saved_step is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            say(f"{e}: stopped while compiling the first step, before any training: removed {run_dir}; "
                f"run the same command again to start over", file=sys.stderr)
        else:
            say(f"{e}: stopped while compiling, before step {saved_step + 1} was trained; {last_checkpoint()}; "
                f"resume with: {resume_hint(run_dir, dp)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        bar.close()
        if created and saved_step is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"\nstopped at once by a second Ctrl-C at step {ts.step}, before any checkpoint: removed {run_dir}",
                  file=sys.stderr)
        else:
            print(f"\nstopped at once by a second Ctrl-C at step {ts.step}; {last_checkpoint()}; "
                  f"resume with: {resume_hint(run_dir, dp)}", file=sys.stderr)
        return 130
    bar.close()
    times = RunTimes(t_start, start_step, time.perf_counter() - t_train, images_per_step, plan.payload is not None,
                     1 if dp is None else dp.world_size)
    if dp is not None:
        dp.close(together=True)  # the training is over: rank 0 samples and scores alone
        if not writer:
            return 0
    return finish_run(run_dir, cfg, net, diffusion, ts, data, device, times, stop, score=plan.score)


if __name__ == "__main__":
    sys.exit(main())
