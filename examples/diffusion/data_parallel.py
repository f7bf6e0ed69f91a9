"""One model trained by several processes (``torchrun``): each rank's slice of the global batch, the
averaged functional gradient, one writer.

Under ``torchrun --nproc_per_node=N -m examples.diffusion.train ...`` every process (a *rank*) runs
the training loop on its own slice of every global batch, on ``torch.distributed`` (gloo on CPU,
NCCL on CUDA with the GPU of its ``LOCAL_RANK``). What each piece does:

* **The batch.** ``--batch-size`` is the global batch. Every rank draws the whole global batch's
  indices, times, noise and self-conditioning coin from the same generators, exactly as one process
  does, and keeps rows ``[r * B / N, (r + 1) * B / N)`` (:meth:`DataParallel.rows`). The random
  streams stay identical on every rank and equal to a 1-process run's, so an N-rank run follows the
  1-process run step for step (up to float summation order), and its checkpoints resume on any
  world size that divides the batch.
* **The gradient.** With equal slices, the mean over ranks of each rank's mean-loss gradient is the
  global batch's gradient. It is averaged by :func:`pfunc.distributed.all_reduce_grad` (bucketed,
  each bucket's all-reduce launched from the backward the moment its gradients are ready) when one
  eager backward makes the step, else by :func:`pfunc.distributed.all_reduce` of the accumulated
  gradient after the backward (``--grad-accum`` above 1, or ``--compile``). Every rank then clips
  and steps identical gradients on identical params: the optimizer step is the same everywhere.
* **The start.** Params and state are broadcast from rank 0 (DDP's rule); the random streams are
  checked identical (:func:`pfunc.distributed.check_identical`); params are checked again at every
  checkpoint.
* **Buffers.** DDP's rule: a module buffer a step changed (BatchNorm statistics) is broadcast from
  rank 0 after the step. A parametrization's state (spectral norm's ``u``, ``v``: keys under
  ``parametrizations.``) is left alone: it is a deterministic function of weights that are
  identical. The Unet has neither (weight standardization keeps no state), so nothing is sent.
* **Stopping.** Each step all-reduces ``[loss, stop]``: the global mean loss for ``losses.jsonl``, and
  whether any rank got Ctrl-C/SIGTERM, so every rank stops after the same step and rank 0 saves.
* **ZeRO** (``--zero``): :class:`torch.distributed.optim.ZeroRedundancyOptimizer` over AdamW keeps
  1/N of the optimizer state per rank; every checkpoint consolidates it on rank 0, so a checkpoint
  holds the full state and resumes with or without ``--zero`` on any world size.
* **Failures.** A collective that fails (a peer died: at once; a peer stalled: after
  ``--dist-timeout``) is a :class:`RankFailure` the command reports in one line.

>>> dp = DataParallel(rank=1, world_size=2, device=torch.device("cpu"), backend="gloo", timeout_s=60.0)
>>> dp.rows(8), dp.is_writer                    # rank 1 of 2 takes rows 4..7 of a global batch of 8
(slice(4, 8, None), False)
>>> is_module_buffer("1.running_mean"), is_module_buffer("0.parametrizations.weight.0._u")
(True, False)
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import pfunc as pf
from examples.commands import parent_launcher_command, shown_path
from examples.torchrun import Launch, backend_reason, join_process_group

from .cli import resolve_device
from .config import ConfigError
from .training import Generators, GradFn, Params, State

__all__ = [
    "RankFailure",
    "DataParallel",
    "rank_device",
    "choose_backend",
    "start_data_parallel",
    "is_module_buffer",
    "random_streams",
    "DEFAULT_TIMEOUT_S",
]

#: The default collective timeout: NCCL's own default (10 minutes). It bounds how long a stalled peer
#: holds the others, and must exceed the longest work one rank does alone between two collectives
#: (rank 0 writing a checkpoint; a first step compiled with ``--compile``).
DEFAULT_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """A collective failed on this rank: a peer died, or stalled past the timeout. The message is one line."""


def rank_device(spec: str, launch: Launch) -> torch.device:
    """The device of this rank for ``--device spec``: ``auto`` and ``cuda`` give ``cuda:LOCAL_RANK`` (one GPU per
    process), else the CPU for ``auto``. :class:`~.config.ConfigError` naming ``--device`` when that cannot work."""
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise ConfigError(
                f"--device {spec}: torchrun started {launch.local_world_size} processes on this machine, which has "
                f"{count} CUDA device(s); each process needs its own GPU: pass --nproc_per_node={count} (or --device cpu)"
            )
        return torch.device("cuda", launch.local_rank)
    device = resolve_device(spec)
    if device.type == "cuda" and launch.local_world_size > 1:
        raise ConfigError(f"--device {spec}: under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda (or auto)")
    if device.type == "mps":
        raise ConfigError(f"--device {spec}: torch.distributed cannot move MPS tensors; several processes train on --device cpu or cuda")
    return device


def choose_backend(requested: Optional[str], device: torch.device) -> str:
    """``--backend``: ``auto`` (or not given) is NCCL for a CUDA device, gloo otherwise; a choice that cannot move
    ``device``'s tensors, or that this torch lacks, is a :class:`~.config.ConfigError` naming ``--backend``."""
    backend = ("nccl" if device.type == "cuda" else "gloo") if requested in (None, "auto") else requested
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"--backend nccl moves CUDA tensors only, and this run is on {device}: use --backend gloo or --device cuda")
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available}[backend]
    if not available():
        raise ConfigError(f"--backend {backend}: this torch build has no {backend.upper()} (torch.distributed.is_{backend}_available() is False)")
    return backend


def is_module_buffer(key: str) -> bool:
    """Whether a ``state`` key is a module's buffer (``"1.running_mean"``) rather than a parametrization's own state
    (``"0.parametrizations.weight.0._u"``)."""
    return not (key.startswith("parametrizations.") or ".parametrizations." in key)


@dataclass
class DataParallel:
    """This rank's part in a data-parallel run over the default process group (see the module docstring)."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    timeout_s: float
    zero: bool = False
    bucket_cap_mb: float = pf.distributed.DEFAULT_BUCKET_CAP_MB
    local_world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes the run folder, the progress and the messages."""
        return self.rank == 0

    def resume_command(self, run_dir: Any) -> str:
        """The command that resumes ``run_dir`` on as many processes as this run: the launcher's own command line as it
        was typed (:func:`examples.commands.parent_launcher_command`: ``--standalone``, the ``--rdzv-*`` flags), else
        the ``torchrun`` beside this interpreter with the process count."""
        module = "examples.diffusion.train"
        launcher = parent_launcher_command(module)
        if launcher is None:
            torchrun = shown_path(os.path.join(os.path.dirname(sys.executable), "torchrun"))
            nodes = "" if self.local_world_size == self.world_size else "<this run's --nnodes and --rdzv-* flags> "
            launcher = f"{torchrun} {nodes}--nproc_per_node={self.local_world_size} -m {module}"
        return f"{launcher} --resume {shlex.quote(str(run_dir))}"

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` (which the world size divides)."""
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def failure(self, what: str, e: BaseException) -> RankFailure:
        """The one-line :class:`RankFailure` for a collective ``what`` that raised ``e``."""
        return RankFailure(
            f"rank {self.rank} of {self.world_size}: {what} failed ({backend_reason(e)}): another rank died, or stopped answering "
            f"for --dist-timeout {self.timeout_s:g} s"
        )

    def collective(self, what: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a collective; a backend failure becomes a :class:`RankFailure`."""
        try:
            return fn(*args, **kwargs)
        except RankFailure:
            raise
        except RuntimeError as e:  # pf.distributed.CollectiveError, torch's DistError, gloo's plain RuntimeError
            if isinstance(e, pf.distributed.CollectiveError) or _is_backend_error(e):
                raise self.failure(what, e) from e
            raise

    # ------------------------------------------------------------------ the start
    def gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (picklable: an outcome, a message), in rank order."""
        out: list[Any] = [None] * self.world_size
        self.collective(what, dist.all_gather_object, out, obj)
        return out

    def from_writer(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` (picklable: the run folder it made) on every rank."""
        box = [obj]
        self.collective(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def start_identical(self, params: Params, state: State, streams: Mapping[str, Tensor]) -> State:
        """Make ``params`` (in place: the optimizer holds them) and the returned state rank 0's, and check that every
        rank's random ``streams`` are the same (a ``ValueError`` naming the stream otherwise)."""
        first = self.collective("broadcasting the params from rank 0", pf.distributed.broadcast, params, bucket_cap_mb=self.bucket_cap_mb)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(first[k])
        state = self.collective("broadcasting the state from rank 0", pf.distributed.broadcast, state, bucket_cap_mb=self.bucket_cap_mb)
        self.collective("checking the random streams", pf.distributed.check_identical, dict(streams), what="random streams")
        return state

    # ------------------------------------------------------------------ the step
    def overlapped_grad_fn(self, loss_fn: Callable[..., Any]) -> GradFn:
        """``grad_fn(params, state, *batch) -> (grads, (loss, new_state))`` like ``pf.grad_and_value(loss_fn, has_aux=True)``,
        with ``grads`` already averaged over ranks: one backward on fresh leaves inside
        :func:`pfunc.distributed.all_reduce_grad`, each bucket on the wire as soon as its gradients are ready. ``loss``
        is this rank's. The first call checks that every rank has the same tree and graph; later calls skip that."""
        checked = False

        def grad_fn(params: Params, state: State, *batch: Any):
            nonlocal checked
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
                loss, new_state = loss_fn(leaves, state, *batch)
                grads = self.collective("the gradient all-reduce", pf.distributed.all_reduce_grad, loss, leaves,
                                        bucket_cap_mb=self.bucket_cap_mb, check=not checked)
            checked = True
            return grads, (loss.detach(), {k: v.detach() for k, v in new_state.items()})

        return grad_fn

    def averager(self) -> Callable[[Params], Params]:
        """``average(grads)``: the mean over ranks by :func:`pfunc.distributed.all_reduce` (the route after the backward).
        The first call checks the tree's structure across ranks; later calls skip that."""
        checked = False

        def average(grads: Params) -> Params:
            nonlocal checked
            out = self.collective("the gradient all-reduce", pf.distributed.all_reduce, grads, bucket_cap_mb=self.bucket_cap_mb, check=not checked)
            checked = True
            return out

        return average

    def agree(self, loss: float, stop: bool) -> tuple[float, bool]:
        """``(the mean of every rank's loss, whether any rank asked to stop)``: one small all-reduce."""
        mine = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=self.device)
        total = self.collective("the loss all-reduce", pf.distributed.all_reduce, {"x": mine}, op="sum", check=False)["x"].tolist()
        return total[0] / self.world_size, total[1] > 0

    def sync_buffers(self, before: State, after: State) -> State:
        """DDP's rule for buffers: the module buffers this step changed (not the same memory as ``before``'s), as rank 0
        has them; parametrization state and unchanged buffers as they are. Sends nothing when nothing changed."""
        changed = {k: v for k, v in after.items() if is_module_buffer(k) and not _same_memory(v, before.get(k))}
        if not changed:
            return after
        fresh = self.collective("broadcasting the buffers from rank 0", pf.distributed.broadcast, changed, bucket_cap_mb=self.bucket_cap_mb)
        return {**after, **fresh}

    # ------------------------------------------------------------------ checkpoints
    def make_optimizer(self, params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW as :func:`~.training.make_optimizer`, sharded over the ranks by ``ZeroRedundancyOptimizer`` with ``--zero``."""
        from .training import ADAMW_BETAS, make_optimizer

        if not self.zero:
            return make_optimizer(params, lr, weight_decay)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(list(params.values()), optimizer_class=torch.optim.AdamW, lr=lr, betas=ADAMW_BETAS,
                                       weight_decay=weight_decay)

    def before_save(self, optimizer: torch.optim.Optimizer, params: Params) -> None:
        """On every rank before rank 0 writes a checkpoint: check the params are still identical everywhere, and gather a
        sharded optimizer's full state on rank 0 (``consolidate_state_dict(to=0)``)."""
        self.collective("checking the params", pf.distributed.check_identical, params, what="params")
        if self.zero:
            self.collective("gathering the optimizer state on rank 0", optimizer.consolidate_state_dict, to=0)

    def close(self, *, together: bool = False) -> None:
        """Leave the process group. ``together`` (a run that ended normally): first wait at a barrier until every rank
        is done, so none exits while another still holds the connection (without it, 2 of 26 runs of 2 CPU ranks here
        had the rank that exited first abort at exit: "terminate called without an active exception", SIGABRT; with
        it, none of 45); without ``together`` (a failure: a peer may be gone) leave at once."""
        if not dist.is_initialized():
            return
        if together:
            self.collective("waiting for every rank to finish", dist.barrier)
        dist.destroy_process_group()


def random_streams(gens: Generators) -> dict[str, Tensor]:
    """The training run's random streams as tensors (generator states, the data order and its position), to check
    that every rank draws the same global batches."""
    sd = gens.state_dict()
    order = sd["order"]
    return {"order.generator": order["generator"], "order.perm": order["perm"], "order.pos": torch.tensor(order["pos"]),
            "noise": sd["noise"], "coin": sd["coin"]}


def _same_memory(a: Tensor, b: Optional[Tensor]) -> bool:
    return b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _is_backend_error(e: BaseException) -> bool:
    """A failure of the process group's backend (a dead or stalled peer), not a bug: torch's ``DistError`` family, or
    gloo's and ZeRO's plain ``RuntimeError`` texts."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
                                   "pair closure", "NCCL"))


def start_data_parallel(launch: Launch, device: torch.device, backend: str, *, timeout_s: float, zero: bool,
                        bucket_cap_mb: float) -> DataParallel:
    """Join torchrun's process group (:func:`examples.torchrun.join_process_group`, every collective bounded by
    ``timeout_s``) and return this rank's :class:`DataParallel`. ``LaunchError`` when the rendezvous fails."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    join_process_group(launch, backend, timeout_s)
    return DataParallel(launch.rank, launch.world_size, device, backend, timeout_s, zero, bucket_cap_mb, launch.local_world_size)
