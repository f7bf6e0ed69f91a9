"""The sweep behind pfunc's batched power-iteration kernel choice: each kernel's time per iteration.

A batched power iteration on ``Ws (B, h, w)`` can multiply in four ways, all giving the
same vectors to rounding:

* ``loop``: a Python loop of ``torch.mv`` over the B matrices (what unbatched code runs);
* ``bmm``: ``Ws @ v[..., None]`` and ``Ws.mT @ u[..., None]``: batched one-column products
  (what ``vmap`` makes of ``torch.mv``);
* ``bmm row``: the same products with the vector as a one-row left factor
  (``v[:, None] @ Ws.mT``, ``u[:, None] @ Ws``), which BLAS runs as another GEMV layout;
* ``elementwise``: ``(Ws * v[:, None, :]).sum(-1)`` and ``(Ws * u[..., None]).sum(-2)``
  (what pfunc ran under ``vmap`` on CPU before the choice was measured).

Run ``python -m benchmarks.power_kernels`` (one thread, process CPU time, as ``benchmarks.run``);
``--quick`` for a short look. :func:`pfunc._power_kernels.batched_kernel` states the rule drawn from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
from torch import Tensor

from pfunc import _power_kernels as kernels
from pfunc import power

from .timing import measure

__all__ = ["KERNELS", "VMAPPED", "sweep", "vmap_cost", "main"]

EPS = 1e-12


def _loop(Ws: Tensor, us: Tensor, vs: Tensor, n: int) -> tuple[Tensor, Tensor]:
    outs = [kernels.iterate_mv(W, u, v, n, EPS) for W, u, v in zip(Ws.unbind(0), us.unbind(0), vs.unbind(0))]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def _kernel(name: str) -> Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor]]:
    if name == "loop":
        return _loop
    return lambda Ws, us, vs, n: kernels.iterate_batched(Ws, us, vs, n, EPS, name)


KERNELS = kernels.KERNELS
VMAPPED = "pfunc vmap"

SIZES = ((32, 32), (64, 64), (128, 128), (256, 256), (512, 512), (1024, 256), (256, 1024))
BATCHES = (4, 16, 64)


def sweep(sizes=SIZES, batches=BATCHES, dtypes=(torch.float32,), budget_s: float = 0.4, iterations: int = 1):
    """Yield ``(dtype, B, h, w, {kernel: seconds per call})`` for every combination, checked equal first;
    ``"pfunc vmap"`` is :func:`pfunc.power.power_iteration` under ``torch.func.vmap`` on the same stack
    (the rule's kernel plus the operation's and ``vmap``'s per-call costs)."""
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for h, w in sizes:
            for B in batches:
                Ws = (torch.randn(B, h, w, generator=g) / w**0.5).to(dtype)
                us = kernels.normalize(torch.randn(B, h, generator=g).to(dtype), EPS)
                vs = kernels.normalize(torch.randn(B, w, generator=g).to(dtype), EPS)
                fns = {k: _kernel(k) for k in KERNELS}
                fns[VMAPPED] = torch.func.vmap(lambda W, u, v, n: power.power_iteration(W, u, v, n, EPS), in_dims=(0, 0, 0, None))
                ref = fns["loop"](Ws, us, vs, iterations)
                for k, fn in fns.items():
                    out = fn(Ws, us, vs, iterations)
                    tol = 1e-4 if dtype == torch.float32 else 1e-10
                    for a, b in zip(out, ref):
                        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
                t = measure(
                    {k: (lambda fn=fn: fn(Ws, us, vs, iterations)) for k, fn in fns.items()},
                    budget_s=budget_s, min_repeats=7, clock="cpu",
                )
                yield dtype, B, h, w, dict(t.medians)


def vmap_cost(budget_s: float = 1.0) -> dict[str, float]:
    """Seconds per call of ``torch.func.vmap`` over an identity of three tensors (16 x 64x64, 16 x 64,
    16 x 64), and of the same done with functorch's primitives alone (enter a vmap level, add and
    remove the batch dims): what ``vmap``'s Python front end (pytree flattening, checks) costs a call,
    which no code inside the vmapped function can avoid."""
    functorch = torch._C._functorch
    tensors = (torch.randn(16, 64, 64), torch.randn(16, 64), torch.randn(16, 64))
    identity = torch.func.vmap(lambda W, u, v: (W, u, v))

    def primitives():
        level = functorch._vmap_increment_nesting(16, "error")
        try:
            batched = [functorch._add_batch_dim(t, 0, level) for t in tensors]
            return tuple(functorch._remove_batch_dim(t, level, 16, 0) for t in batched)
        finally:
            functorch._vmap_decrement_nesting()

    for a, b in zip(identity(*tensors), primitives()):
        assert torch.equal(a, b)
    t = measure({"torch.func.vmap": lambda: identity(*tensors), "primitives": primitives},
                budget_s=budget_s, min_repeats=7, clock="cpu")
    return dict(t.medians)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three sizes, budget 0.1 s per row")
    parser.add_argument("--float64", action="store_true", help="float64 as well as float32")
    parser.add_argument("--iterations", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = ((64, 64), (256, 256), (1024, 256)) if args.quick else SIZES
    dtypes = (torch.float32, torch.float64) if args.float64 else (torch.float32,)
    print(f"# load: {os.getloadavg()}; torch {torch.__version__}; 1 thread; process CPU time; {args.iterations} iteration(s)")
    cost = vmap_cost(0.2 if args.quick else 1.0)
    print(f"# torch.func.vmap of an identity on 3 tensors: {cost['torch.func.vmap'] * 1e6:.1f} µs a call; "
          f"functorch's primitives doing the same: {cost['primitives'] * 1e6:.1f} µs")
    print("| dtype | B | size | " + " | ".join(KERNELS) + f" | fastest | rule picks | rule / fastest | {VMAPPED} | {VMAPPED} / fastest |")
    print("|" + "---|" * (len(KERNELS) + 8))
    for dtype, B, h, w, med in sweep(sizes, dtypes=dtypes, budget_s=0.1 if args.quick else 0.4, iterations=args.iterations):
        best = min(KERNELS, key=med.get)
        pick = kernels.batched_kernel(torch.device("cpu"), dtype, B, h, w)
        cells = " | ".join(f"{med[k] * 1e6:.0f} µs" for k in KERNELS)
        print(
            f"| {str(dtype).replace('torch.', '')} | {B} | {h}x{w} | {cells} | {best} | {pick} | **{med[pick] / med[best]:.2f}** "
            f"| {med[VMAPPED] * 1e6:.0f} µs | **{med[VMAPPED] / med[best]:.2f}** |",
            flush=True,
        )
    print(f"# load: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
