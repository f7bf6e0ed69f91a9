"""The state a training run starts from: restored from its checkpoint on ``--resume``, or new, in a new run folder.

:func:`start_run` is the step between the checks (:mod:`.train_plan`) and the training loop: rank 0 makes
the run folder (with ``data.png``) and every rank hears its name; a folder half-made when the run is
stopped is removed.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from examples.images import save_image_grid

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig
from .data_parallel import DataParallel
from .folders import new_timestamped_folder
from .interrupt import StopNow
from .run_outputs import LOSSES, truncate_losses
from .train_plan import Plan
from .training import Generators, TrainState, initial_train_state, make_optimizer
from .training_checkpoint import CHECKPOINT, restore

__all__ = ["start_run"]


def start_run(plan: Plan, cfg: TrainConfig, device: torch.device, gens: Generators, args: argparse.Namespace,
              parser: argparse.ArgumentParser, dp: Optional[DataParallel]) -> tuple[Optional[TrainState], Optional[Path], int]:
    """``(train state, run folder, exit status)``: restored from the checkpoint, or new in a new run folder (rank 0 makes
    it); the state is ``None`` when the run cannot start (the message is printed; the status says how it ended)."""
    writer = dp is None or dp.is_writer
    net = plan.net
    factory = make_optimizer if dp is None else dp.make_optimizer
    if plan.payload is not None:
        run_dir = plan.run_dir
        where = str(run_dir / CHECKPOINT)
        try:
            ts = restore(plan.payload, net, cfg, device, gens, where, factory)
        except ConfigError as e:  # the same on every rank: rank 0 says it
            if dp is None:
                parser.error(str(e))
            if writer:
                print(f"error: {e}\n({parser.prog} --help explains every flag)", file=sys.stderr)
            return None, run_dir, 2
        except CheckpointError as e:
            if writer:
                print(f"error: {e}", file=sys.stderr)
            return None, run_dir, 1
        if writer:
            try:
                truncate_losses(run_dir / LOSSES, ts.step)
            except OSError as e:
                print(f"error: cannot rewrite {run_dir / LOSSES}: {e.strerror or e}", file=sys.stderr)
                return None, run_dir, 1
            print(f"resuming {run_dir} at step {ts.step}/{cfg.steps}")
        return ts, run_dir, 0
    run_dir = None
    if writer:
        try:
            run_dir = new_timestamped_folder(args.results_dir, f"{cfg.dataset}_{cfg.image_size}px_dim{cfg.dim}")
        except OSError as e:
            print(f"error: cannot create the run folder under --results-dir {args.results_dir!r}: {e.strerror or e}", file=sys.stderr)
    if dp is not None:
        run_dir = dp.from_writer(run_dir, "hearing the run folder from rank 0")
    if run_dir is None:
        return None, None, 1
    try:
        ts = initial_train_state(net, cfg.seed, device, cfg.lr, cfg.weight_decay, factory)
        if writer:
            save_image_grid(run_dir / "data.png", plan.data[: cfg.num_samples].cpu(), nrow=int(math.sqrt(cfg.num_samples)) or 1, scale=4)
    except (OSError, ValueError) as e:
        if writer:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"error: cannot write in the new run folder {run_dir}: {e}; removed it", file=sys.stderr)
        return None, run_dir, 1
    except (KeyboardInterrupt, StopNow):  # before the loop that turns a signal into a clean stop: leave no half-made folder
        if writer:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return ts, run_dir, 0
