"""Item 8: data parallel. The main job's training step on 1 process and on 2 (``torchrun``, gloo, CPU).

Every row is measured inside one 2-rank ``torchrun`` launch (``python -m torch.distributed.run
--standalone --nproc_per_node=2 -m benchmarks.distributed --worker ...``, one thread per rank); the
variants of a row are timed interleaved by :func:`benchmarks.timing.measure` on both ranks in step,
each sample starting and ending at a barrier (so a sample is the slower rank's time, wall clock).
Before timing, the workers check that the variants compute the same thing (the 2-rank averaged
gradient equals the 1-process gradient of the whole batch; every bucket size gives the same mean).

* ``step``: one optimizer step of the main job's CPU preset (the diffusion Unet, dim 16, mults
  1,2,4, 16x16 RGB, 0.62 M parameters; global batch 64; ``train_step``: gradient, clipping, AdamW,
  EMA). ``1 process``: rank 0 alone, the whole batch, one thread, no process group involved (rank 1
  waits at the barrier); ``1 process, 2 threads``: the same with ``torch.set_num_threads(2)`` (the
  other way to use the second core); ``2 processes``: 32 images each, the gradient averaged in 25 MB
  buckets launched from inside the backward (``pf.distributed.all_reduce_grad``: the main job's
  route); ``2 processes, after backward``: ``pf.grad_and_value``, then ``pf.distributed.all_reduce``;
  ``2 processes, no all-reduce``: the same compute without communication; ``all-reduce alone``: the
  step's gradient all-reduced by itself (25 MB buckets), no compute. ``all-reduce share`` is
  ``all-reduce alone / 2 processes`` (what the communication costs, were none of it hidden);
  ``step time the all-reduce adds`` is ``1 - no all-reduce / 2 processes`` (what it costs in the step,
  overlap included: within the noise when the share is small).
* ``step, bucket size``: the ``2 processes`` step with 1, 5 and 25 MB buckets (its gradient is
  2.5 MB: 3 buckets, then 1).
* ``all-reduce``: ``pf.distributed.all_reduce`` alone of a gradient shaped like the GPU preset's
  Unet (35.7 M float32 parameters in 276 tensors, 143 MB) with 1, 5 and 25 MB buckets.

The smoke sizes run the same rows on the tiny Unet of the tests. On ``--device cuda`` nothing is
measured here (no GPU was lent when this was written). What the NCCL path would be measured as on a
GPU: the main job's step on one GPU with no process group against ``torchrun --nproc_per_node=1``
(a 1-rank NCCL group: the overlapped all-reduce's hooks, bucket copies and the per-step loss
all-reduce are the whole overhead, as a 1-rank all-reduce moves nothing), then 1 vs N GPUs of one
machine at a fixed global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from .comparison import Comparison, MismatchError, Row, Variant
from .sizes import SMOKE, Sizes
from .timing import Timing, measure

__all__ = ["comparisons", "notes", "worker", "Session"]

FAMILY_NAME = "distributed"
WORLD = 2
STEP = ("1 process", "1 process, 2 threads", "2 processes", "2 processes, after backward", "2 processes, no all-reduce",
        "all-reduce alone")
MIN_ROUNDS = 20  # the step's variants differ by a few percent: 10 rounds left the no-all-reduce difference in the noise
BUCKETS_MB = (1.0, 5.0, 25.0)


def _bucket(mb: float) -> str:
    return f"{mb:g} MB buckets"


def _config(tiny: bool) -> dict[str, Any]:
    """The main job's CPU preset (or the tests' tiny config), as the step's TrainConfig fields."""
    if tiny:
        return dict(dim=8, dim_mults=(1, 2), image_size=8, channels=1, attn_heads=2, attn_dim_head=8, resnet_block_groups=4,
                    batch_size=4, timesteps=100)
    return {}


# ---------------------------------------------------------------------- the parent: launch, read, report
@dataclass
class Session:
    """One 2-rank launch that checks and times every row; run once, on the first row's check."""

    sizes: Sizes
    results: Optional[dict] = None
    seconds: float = 0.0

    def get(self) -> dict:
        if self.results is None:
            self.results = self._launch()
        return self.results

    def _launch(self) -> dict:
        tiny = self.sizes == SMOKE
        spec = {"tiny": tiny, "budget_s": self.sizes.budget_s, "max_repeats": self.sizes.max_repeats,
                "min_repeats": self.sizes.min_repeats if tiny else max(self.sizes.min_repeats, MIN_ROUNDS)}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
                 "benchmarks.distributed", "--worker", json.dumps(spec), "--out", out],
                cwd=root, env=env, capture_output=True, text=True, timeout=1800,
            )
            self.seconds = time.perf_counter() - t0
            if done.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"benchmarks.distributed: the 2-rank workers failed (exit {done.returncode}):\n"
                                   f"{(done.stdout + done.stderr)[-4000:]}")
            with open(out) as f:
                return json.load(f)


@dataclass(frozen=True)
class _Spawned(Comparison):
    """A row measured by the workers: :meth:`check` and :meth:`run` read the session's results."""

    session: Any = None
    key: str = ""
    extra_of: Any = field(default=None, compare=False)

    def check(self) -> None:
        mismatch = self.session.get()[self.key]["mismatch"]
        if mismatch:
            raise MismatchError(f"{self.title}: {mismatch}")

    def run(self, *, budget_s: float, min_repeats: int = 10, max_repeats: int = 500, clock: str = "wall") -> Row:
        result = self.session.get()[self.key]
        timing = Timing(**{k: result["timing"][k] for k in ("medians", "q1", "q3", "repeats", "numbers", "clock", "wall_medians")})
        return Row(self, timing, self.extra_of(result, timing) if self.extra_of else {})

    def untimed(self) -> Row:
        return Row(self, None, {})


def _step_extras(result: dict, t: Timing) -> dict[str, str]:
    batch = result["batch"]
    share = t.medians["all-reduce alone"] / t.medians["2 processes"]
    adds = 1 - t.medians["2 processes, no all-reduce"] / t.medians["2 processes"]
    return {
        "images/s 1 process": f"{batch / t.medians['1 process']:.0f}",
        "images/s 2 processes": f"{batch / t.medians['2 processes']:.0f}",
        "all-reduce share of the 2-process step": f"{100 * share:.1f}%",
        "step time the all-reduce adds": f"{100 * adds:.0f}%",
        "gradient": f"{result['gradient_mb']:.1f} MiB",
    }


def _bucket_extras(result: dict, t: Timing) -> dict[str, str]:
    return {"buckets": ", ".join(f"{mb:g} MB: {n}" for mb, n in zip(BUCKETS_MB, result["buckets"])),
            "gradient": f"{result['gradient_mb']:.1f} MiB"}


def comparisons(sizes: Sizes = SMOKE, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """The rows (CPU only: see the module docstring for the GPU); all measured by one 2-rank launch."""
    if torch.device(device).type != "cpu" or not torch.distributed.is_available():
        return iter(())
    session = Session(sizes)
    model = "tiny Unet (tests)" if sizes == SMOKE else "CPU preset Unet"
    nothing = Variant(lambda: None)
    step = _Spawned(FAMILY_NAME, {"row": "step", "model": model}, {v: nothing for v in STEP}, "1 process",
                    (("2 processes", "1 process"), ("2 processes, after backward", "2 processes")),
                    session=session, key="step", extra_of=_step_extras)
    buckets = {_bucket(mb): nothing for mb in BUCKETS_MB}
    ratios = ((_bucket(1), _bucket(25)), (_bucket(5), _bucket(25)))
    step_buckets = _Spawned(FAMILY_NAME, {"row": "step, bucket size", "model": model}, buckets, _bucket(25), ratios,
                            session=session, key="step_buckets", extra_of=_bucket_extras)
    alone = _Spawned(FAMILY_NAME, {"row": "all-reduce", "model": "GPU preset Unet's gradient" if sizes != SMOKE else model},
                     buckets, _bucket(25), ratios, session=session, key="all_reduce", extra_of=_bucket_extras)
    return iter((step, step_buckets, alone))


def notes(sizes: Sizes, device: torch.device | str) -> list[str]:
    """The notes under the family's table."""
    if torch.device(device).type != "cpu":
        return ["Not measured on CUDA: see the family's description for what the NCCL rows would be."]
    return [f"{WORLD} ranks on the machine's cores, one thread each, gloo over loopback TCP; samples are wall time between "
            "barriers (the slower rank). On 2 shared cores the 2-process rows compete with other jobs for both cores, the "
            "1-process row for one."]


# ---------------------------------------------------------------------- the workers
def _timed(variants: dict, spec: dict) -> Timing:
    """``measure`` on every rank in step: the same repeats everywhere (rank 0's estimate), a barrier around each sample."""
    import torch.distributed as dist

    for fn in variants.values():  # one untimed call each, then rank 0's estimate of a round
        fn()
        dist.barrier()
    t0 = time.perf_counter()
    for fn in variants.values():
        fn()
        dist.barrier()
    rounds = torch.tensor([max(spec["min_repeats"], min(spec["max_repeats"], int(spec["budget_s"] / max(time.perf_counter() - t0, 1e-9))))])
    dist.broadcast(rounds, 0)
    n = int(rounds)
    return measure(variants, budget_s=0.0, min_repeats=n, max_repeats=n, warmup=1, min_sample_s=0.0, sync=dist.barrier, clock="wall")


def _close(a: dict, b: dict, rtol: float, atol: float) -> Optional[str]:
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def worker(spec: dict, out: str) -> None:
    """One rank: build the step, check the variants agree, time the rows; rank 0 writes ``out`` (JSON)."""
    import torch.distributed as dist

    import pfunc as pf
    from examples.diffusion.config import PRESETS, TrainConfig
    from examples.diffusion.data_parallel import DataParallel
    from examples.diffusion.model import build_model
    from examples.diffusion.training import MicroBatch, TrainState, make_grad_fn, make_loss_fn, make_optimizer, train_step

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    cfg = TrainConfig(**{**PRESETS["cpu"], **_config(spec["tiny"])})
    _, net, diffusion = build_model(cfg)
    p0, state = net.init(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    b, shape = cfg.batch_size, (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    full = MicroBatch(torch.rand(shape, generator=g) * 2 - 1, torch.randint(0, cfg.timesteps, (b,), generator=g),
                      torch.randn(shape, generator=g), False)
    rows = slice(rank * b // WORLD, (rank + 1) * b // WORLD)
    part = MicroBatch(full.x0[rows], full.t[rows], full.noise[rows], False)
    loss_fn = make_loss_fn(net, diffusion)
    plain = make_grad_fn(loss_fn)
    dps = {mb: DataParallel(rank, WORLD, torch.device("cpu"), "gloo", 600.0, bucket_cap_mb=mb) for mb in BUCKETS_MB}
    dp = dps[25.0]
    results: dict = {}

    # checks: the averaged half-batch gradients are the whole batch's; every bucket size gives the same
    whole, _ = plain(p0, state, full.x0, full.t, full.noise, False)
    routes = {"overlapped": dp.overlapped_grad_fn(loss_fn)(p0, state, part.x0, part.t, part.noise, False)[0],
              "after": dp.averager()(plain(p0, state, part.x0, part.t, part.noise, False)[0])}
    routes.update({mb: d.overlapped_grad_fn(loss_fn)(p0, state, part.x0, part.t, part.noise, False)[0] for mb, d in dps.items()})
    step_mismatch = next((f"{name}: {m}" for name in ("overlapped", "after") if (m := _close(routes[name], whole, 1e-4, 1e-6))), None)
    bucket_mismatch = next((f"{mb:g} MB: {m}" for mb in BUCKETS_MB if (m := _close(routes[mb], routes[25.0], 0, 0))), None)

    def trained(grad_fn, micro, average=None, threads=1):
        params = {k: v.detach().clone().requires_grad_() for k, v in p0.items()}
        ts = TrainState(params, dict(state), {k: v.detach().clone() for k, v in params.items()}, make_optimizer(params, 1e-4, 0.0), 0)

        def step():
            torch.set_num_threads(threads)
            train_step(ts, grad_fn, [micro], max_grad_norm=1.0, ema_decay=0.995, ema_every=1, ema_after=100, average=average)
            torch.set_num_threads(1)
        return step

    idle = lambda: None  # noqa: E731 - rank 1 during the 1-process variants
    step_variants = {
        "1 process": trained(plain, full) if rank == 0 else idle,
        "1 process, 2 threads": trained(plain, full, threads=2) if rank == 0 else idle,
        "2 processes": trained(dp.overlapped_grad_fn(loss_fn), part),
        "2 processes, after backward": trained(plain, part, dp.averager()),
        "2 processes, no all-reduce": trained(plain, part),
        "all-reduce alone": lambda: pf.distributed.all_reduce(whole, check=False),
    }
    results["step"] = {"mismatch": step_mismatch, "timing": _timed(step_variants, spec), "batch": b}
    results["step_buckets"] = {
        "mismatch": bucket_mismatch,
        "timing": _timed({_bucket(mb): trained(dps[mb].overlapped_grad_fn(loss_fn), part) for mb in BUCKETS_MB}, spec),
        "buckets": [len(pf.distributed.bucket_plan(p0, bucket_cap_mb=mb)) for mb in BUCKETS_MB],
    }
    nbytes = sum(v.numel() * v.element_size() for v in p0.values())
    results["step"]["gradient_mb"] = results["step_buckets"]["gradient_mb"] = nbytes / 2**20

    # the all-reduce alone, of the GPU preset's gradient (the tiny Unet's under the smoke sizes)
    shapes = p0 if spec["tiny"] else build_model(TrainConfig(**PRESETS["gpu"]))[1].init()[0]
    gen = torch.Generator().manual_seed(10 + rank)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in shapes.items()}
    means = {mb: pf.distributed.all_reduce(grads, bucket_cap_mb=mb) for mb in BUCKETS_MB}
    results["all_reduce"] = {
        "mismatch": next((f"{mb:g} MB: {m}" for mb in BUCKETS_MB if (m := _close(means[mb], means[25.0], 0, 0))), None),
        "timing": _timed({_bucket(mb): (lambda mb=mb: pf.distributed.all_reduce(grads, bucket_cap_mb=mb, check=False)) for mb in BUCKETS_MB}, spec),
        "buckets": [len(pf.distributed.bucket_plan(grads, bucket_cap_mb=mb)) for mb in BUCKETS_MB],
        "gradient_mb": sum(v.numel() * v.element_size() for v in grads.values()) / 2**20,
    }
    if rank == 0:
        for r in results.values():
            r["timing"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(r["timing"]).items()}
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.distributed --worker SPEC --out FILE``: one rank (started by torchrun; see :class:`Session`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=main.__doc__)
    parser.add_argument("--worker", required=True, help="the JSON spec the parent passes")
    parser.add_argument("--out", required=True, help="where rank 0 writes the results (JSON)")
    args = parser.parse_args(argv)
    worker(json.loads(args.worker), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
