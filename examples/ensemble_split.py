"""The vmapped ensemble with its members split over torchrun's processes.

``torchrun --nproc_per_node=N -m examples.ensemble --members M`` gives each rank a contiguous
share of the members (:func:`member_share`: sizes differ by at most one) and each rank vmaps its
share through ``pf.ensemble.grad_and_value`` exactly as one process vmaps all of them: member
``k`` is initialised from ``--seed + k`` and draws its batches from ``--data-seed + k`` wherever it
runs, so its trajectory is the single-process run's member ``k`` (to float rounding: a vmap over
fewer members may pick other kernels). Members never talk to each other, so training needs no
communication at all; the ranks meet three times, over gloo: to collect the equality check,
the per-rank timings, and the trained members, which rank 0 stacks in member order, scores and
writes (``metrics.json``, ``members.pt``, ``ensemble.png``), as one process would.

A rank that dies makes the others fail at the next meeting (at once on gloo; a stalled one after
:data:`TIMEOUT_S`), with one line; Ctrl-C stops every rank, and rank 0 removes a run folder with
nothing in it yet.

>>> [list(member_share(5, rank, 2)) for rank in range(2)]
[[0, 1, 2], [3, 4]]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

import pfunc as pf
from examples.threads import choose_threads
from examples.progress import progress
from examples.run_folder import RunFolderError, new_run_folder
from examples.torchrun import Launch, LaunchError, backend_reason, join_process_group

__all__ = ["member_share", "run_split", "TIMEOUT_S"]

#: How long a rank waits for the others at a meeting: longer than the slowest rank's share of the
#: training takes after the fastest's (the shares differ by at most one member).
TIMEOUT_S = 600.0


def member_share(members: int, rank: int, world_size: int) -> range:
    """The members rank ``rank`` of ``world_size`` trains: a contiguous block, the first ``members % world_size``
    ranks one member more."""
    if not 1 <= world_size <= members or not 0 <= rank < world_size:
        raise ValueError(f"member_share: cannot split {members} members over {world_size} ranks (rank {rank})")
    base, extra = divmod(members, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class _Meeting:
    """The ranks' collectives, each failure one line naming what failed on which rank."""

    def __init__(self, launch: Launch):
        self.launch = launch

    def fail(self, what: str, e: BaseException) -> SystemExit:
        return SystemExit(f"error: rank {self.launch.rank} of {self.launch.world_size}: {what} failed ({backend_reason(e)}): "
                          f"another rank died, or did not get there within {TIMEOUT_S:g} s")

    def gather(self, obj: Any, what: str) -> Optional[list[Any]]:
        """Every rank's ``obj`` on rank 0, in rank order (``None`` on the other ranks)."""
        out: Optional[list[Any]] = [None] * self.launch.world_size if self.launch.is_writer else None
        try:
            dist.gather_object(obj, out, dst=0)
        except RuntimeError as e:
            raise self.fail(what, e) from None
        return out

    def from_writer(self, obj: Any, what: str) -> Any:
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            raise self.fail(what, e) from None
        return box[0]


def run_split(args: argparse.Namespace, launch: Launch) -> dict:
    """:func:`examples.ensemble.main`'s work on rank ``launch.rank``: its share of the members, then rank 0 writes.

    Returns the metrics (with ``"run_folder"`` and the losses of every member) on rank 0, ``{}`` elsewhere.
    Exits with one line on a failure (status 1) or Ctrl-C (130)."""
    try:
        join_process_group(launch, "gloo", TIMEOUT_S)
    except LaunchError as e:
        raise SystemExit(f"error: {e}") from None
    meeting = _Meeting(launch)
    out: Optional[Path] = None
    try:
        if launch.is_writer:
            try:
                out = new_run_folder(args.results_dir, f"{args.members}members")
            except RunFolderError as e:
                print(f"error: --results-dir: {e}", file=sys.stderr)
        out = meeting.from_writer(out, "hearing the run folder from rank 0")
        if out is None:
            raise SystemExit(1)
        result = _run_share(args, launch, meeting, out)
        try:  # leave together: a rank that exits while another still holds the connection can abort at exit
            dist.barrier()
        except RuntimeError as e:
            raise meeting.fail("waiting for every rank to finish", e) from None
        return result
    except KeyboardInterrupt:
        if launch.is_writer and out is not None:
            empty = out.is_dir() and not any(out.iterdir())
            if empty:
                out.rmdir()
            what = "it was empty and is removed" if empty else "it holds what was written before the interrupt"
            print(f"\ninterrupted; run folder {out}: {what}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_share(args: argparse.Namespace, launch: Launch, meeting: _Meeting, out: Path) -> dict:
    from examples.ensemble import (compare_speed, evaluate, far_points, max_abs_diff, spectral_mlp, spirals, train_ensemble,
                                   train_solo, write_results)

    writer = launch.is_writer
    say = print if writer else (lambda *a, **k: None)
    note = choose_threads(args.threads)
    if note and writer:
        print(note, file=sys.stderr)
    share = member_share(args.members, launch.rank, launch.world_size)
    shares = [member_share(args.members, r, launch.world_size) for r in range(launch.world_size)]
    say(f"run folder: {out}")
    say(f"{launch.world_size} processes, members " + ", ".join(f"{s.start}-{s.stop - 1} on rank {r}" for r, s in enumerate(shares)))
    g = torch.Generator().manual_seed(12345)
    train_data = spirals(args.train_size, args.noise, g)
    test_data = spirals(4096, args.noise, g)
    net, _ = spectral_mlp(args.hidden)
    seed, data_seed = args.seed + share.start, args.data_seed + share.start  # member k: args.seed + k, wherever it runs

    # 1. member k vmapped with this rank's share == member k trained alone (on the rank that holds it)
    k, n = args.check_member, args.check_steps
    mine = None
    if k in share:
        p_ens, s_ens, _ = train_ensemble(net, train_data, len(share), n, args.batch, args.lr, seed, data_seed)
        p_solo, s_solo, _ = train_solo(net, train_data, k, n, args.batch, args.lr, args.seed, args.data_seed)
        mine = (max_abs_diff(pf.ensemble.member(p_ens, k - share.start), p_solo),
                max_abs_diff(pf.ensemble.member(s_ens, k - share.start), s_solo))
    found = meeting.gather(mine, "collecting the equality check")
    if writer:
        diff_params, diff_state = next(d for d in found if d is not None)
        say(f"member {k} after {n} steps, vmapped vs alone: max|params diff| {diff_params:.2e}, max|state diff| {diff_state:.2e}")

    # 2. speed, every rank its own share at once
    if writer:
        print(f"timing one training step both ways on every rank (~{args.timing_budget:g} s)...", file=sys.stderr)
    speed = compare_speed(net, train_data, len(share), args.batch, args.lr, seed, args.timing_budget, args.timing_repeats)
    speeds = meeting.gather(speed, "collecting the timings")
    if writer:
        for r, (s, sp) in enumerate(zip(shares, speeds)):
            say(f"rank {r}, {len(s)} members, one training step: vmapped pfunc {1e3 * sp['vmapped_seconds_per_step']:.2f} ms, "
                f"loop of torch modules {1e3 * sp['torch_loop_seconds_per_step']:.2f} ms -> {sp['speedup']:.1f}x")

    # 3. train this rank's share; rank 0 stacks every member in order, scores and writes
    t0 = time.perf_counter()
    bar = progress(args.steps, desc=f"ensemble of {args.members}, members {share.start}-{share.stop - 1} here", unit="step",
                   log_every=max(1, args.steps // 10)) if writer else None
    params, state, losses = train_ensemble(net, train_data, len(share), args.steps, args.batch, args.lr, seed, data_seed,
                                           on_step=(lambda l: bar.update(loss=float(l.mean()))) if bar else (lambda l: None))
    if bar:
        bar.close()
    parts = meeting.gather((params, state, losses), "collecting the trained members")
    seconds = time.perf_counter() - t0  # until every rank's share is trained
    if not writer:
        return {}
    params = {key: torch.cat([p[key] for p, _, _ in parts]) for key in params}
    state = {key: torch.cat([s[key] for _, s, _ in parts]) for key in state}
    losses = torch.cat([l for _, _, l in parts], dim=1)
    scores = evaluate(net, params, state, test_data, far_points(4096, g))
    metrics = {
        "equality": {"member": k, "steps": n, "max_abs_diff_params": diff_params, "max_abs_diff_state": diff_state},
        "speed": speeds[0],
        "speed_per_rank": speeds,
        "processes": launch.world_size,
        "members_per_rank": [[s.start, s.stop] for s in shares],
        "accuracy": scores,
        "train_seconds": seconds,
        "args": {key: str(v) for key, v in vars(args).items()},
    }
    write_results(out, net, params, state, losses, train_data, metrics)
    return {**metrics, "losses": losses, "run_folder": str(out)}
