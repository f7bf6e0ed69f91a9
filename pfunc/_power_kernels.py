"""The power iteration's kernels on explicit tensors, and the rule that picks one for a batch of matrices.

Unbatched, :func:`iterate_mv` is torch's scheme op for op (``torch.mv`` then ``x / max(|x|, eps)``),
so results are bitwise torch's spectral norm. A batch ``Ws (B, h, w)`` can multiply four ways
(``KERNELS``), equal to rounding; which is fastest depends on the device, the sizes, the dtype
and the CPU's BLAS, and :func:`batched_kernel` states the choice measured by
``python -m benchmarks.power_kernels`` (BENCHMARKS.md, item 4's note). One matrix shared by a
batch of vectors (an ensemble that shares a weight) is one matrix-matrix product per step.

These functions take plain tensors (batch dims explicit) and are called by the operations in
:mod:`pfunc._vmap`; :mod:`pfunc.power` is the public face.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

PLAIN_WHEN_COMPILED = 2
"""Up to this many iterations a call that ``torch.compile`` traces runs plain ops, which inductor
fuses into code faster than the operation's node (item 5: 0.74x at one iteration on 16 x 256 x 256);
from three iterations on the node, whose kernel is chosen when it runs, is as fast and compiles in a
tenth of the time of the unrolled iterations. Eager ``vmap`` always runs the operation: its batching
rule costs about 7 µs, less than ``vmap`` batching the plain ops one by one (BENCHMARKS.md, item 4)."""

__all__ = [
    "KERNELS",
    "normalize",
    "iterate_mv",
    "iterate_batched",
    "iterate_shared",
    "biggan_mv",
    "biggan_batched",
    "batched_kernel",
]

KERNELS = ("loop", "bmm", "bmm row", "elementwise")

Products = tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]


def normalize(x: Tensor, eps: float, dim: int = -1) -> Tensor:
    """``x / max(||x||, eps)`` along ``dim`` (``F.normalize`` without ``out=``)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(eps)


# ------------------------------------------------------------------------------------ one matrix
def iterate_mv(W: Tensor, u: Tensor, v: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """torch's scheme on ``W (h, w)``, ``u (h,)``, ``v (w,)``: ``n`` times ``u <- W v/|W v|, v <- W^H u/|W^H u|``."""
    for _ in range(n):
        u = normalize(torch.mv(W, v), eps)
        v = normalize(torch.mv(W.mH, u), eps)
    return u, v


def gram_schmidt(x: Tensor, ys: list[Tensor]) -> Tensor:
    """``x`` minus its projections on each of ``ys`` in turn, along the last dim (BigGAN's ``gram_schmidt``)."""
    for y in ys:
        x = x - (x * y).sum(-1, keepdim=True) / (y * y).sum(-1, keepdim=True) * y
    return x


def _gram_schmidt_1d(x: Tensor, ys: list[Tensor]) -> Tensor:
    for y in ys:
        x = x - torch.dot(x, y) / torch.dot(y, y) * y
    return x


def biggan_mv(W: Tensor, us: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One BigGAN iteration on ``W (h, w)``, ``us (k, h)``: the new ``(us (k, h), vs (k, w))``."""
    new_us: list[Tensor] = []
    new_vs: list[Tensor] = []
    for i in range(us.shape[0]):
        v = normalize(_gram_schmidt_1d(torch.mv(W.mH, us[i]), new_vs), eps)
        new_vs.append(v)
        u = normalize(_gram_schmidt_1d(torch.mv(W, v), new_us), eps)
        new_us.append(u)
    return torch.stack(new_us), torch.stack(new_vs)


# ------------------------------------------------------------------------------------ a batch
def _products(kernel: str) -> Products:
    """``(W x, W^H y)`` for ``Ws (B, h, w)``, ``x (B, w)``, ``y (B, h)`` by ``kernel``."""
    if kernel == "bmm":
        return (lambda W, x: (W @ x.unsqueeze(-1)).squeeze(-1)), (lambda W, y: (W.mH @ y.unsqueeze(-1)).squeeze(-1))
    if kernel == "bmm row":
        return (lambda W, x: (x.unsqueeze(-2) @ W.mT).squeeze(-2)), (lambda W, y: (y.unsqueeze(-2) @ W.conj()).squeeze(-2))
    if kernel == "elementwise":
        return (lambda W, x: (W * x.unsqueeze(-2)).sum(-1)), (lambda W, y: (W.conj() * y.unsqueeze(-1)).sum(-2))
    raise ValueError(f"power iteration: no batched product called {kernel!r} (one of {', '.join(KERNELS)})")


_SHARED: Products = ((lambda W, x: x @ W.mT), (lambda W, y: y @ W.conj()))


def iterate_batched(Ws: Tensor, us: Tensor, vs: Tensor, n: int, eps: float, kernel: str) -> tuple[Tensor, Tensor]:
    """torch's scheme on ``Ws (B, h, w)``, ``us (B, h)``, ``vs (B, w)`` with the products of ``kernel``."""
    if kernel == "loop":
        pairs = [iterate_mv(W, u, v, n, eps) for W, u, v in zip(Ws.unbind(0), us.unbind(0), vs.unbind(0))]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    if kernel == "bmm row":  # the vectors stay (B, 1, n) rows: one bmm, one norm, one division a step
        u, v, Wt, Wc = us.unsqueeze(-2), vs.unsqueeze(-2), Ws.mT, Ws.conj()
        for _ in range(n):
            u = normalize(torch.bmm(v, Wt), eps)
            v = normalize(torch.bmm(u, Wc), eps)
        return u.squeeze(-2), v.squeeze(-2)
    if kernel == "bmm":  # (B, n, 1) columns
        u, v, WH = us.unsqueeze(-1), vs.unsqueeze(-1), Ws.mH
        for _ in range(n):
            u = normalize(torch.bmm(Ws, v), eps, dim=-2)
            v = normalize(torch.bmm(WH, u), eps, dim=-2)
        return u.squeeze(-1), v.squeeze(-1)
    Wx, WHy = _products(kernel)
    for _ in range(n):
        us = normalize(Wx(Ws, vs), eps)
        vs = normalize(WHy(Ws, us), eps)
    return us, vs


def iterate_shared(W: Tensor, us: Tensor, vs: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """torch's scheme for one ``W (h, w)`` and a batch of vectors ``us (B, h)``, ``vs (B, w)``: one GEMM per step."""
    Wx, WHy = _SHARED
    for _ in range(n):
        us = normalize(Wx(W, vs), eps)
        vs = normalize(WHy(W, us), eps)
    return us, vs


def biggan_batched(Ws: Tensor, us: Tensor, eps: float, kernel: str) -> tuple[Tensor, Tensor]:
    """One BigGAN iteration on ``Ws (B, h, w)`` (or one shared ``(h, w)``), ``us (B, k, h)``: ``(us, vs)`` batched."""
    if kernel == "loop":
        pairs = [biggan_mv(W, u, eps) for W, u in zip(Ws.unbind(0), us.unbind(0))]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    Wx, WHy = _SHARED if kernel == "shared" else _products(kernel)
    new_us: list[Tensor] = []
    new_vs: list[Tensor] = []
    for i in range(us.shape[-2]):
        v = normalize(gram_schmidt(WHy(Ws, us[:, i]), new_vs), eps)
        new_vs.append(v)
        u = normalize(gram_schmidt(Wx(Ws, v), new_us), eps)
        new_us.append(u)
    return torch.stack(new_us, 1), torch.stack(new_vs, 1)


# ------------------------------------------------------------------------------------ the choice
def batched_kernel(device: torch.device, dtype: torch.dtype, B: int, h: int, w: int) -> str:
    """The kernel for a power iteration on ``B`` matrices ``(h, w)`` of ``dtype`` on ``device``.

    CUDA (and any non-CPU device) keeps the batched product ``bmm``: one launch instead of
    ``B``. On CPU the rule is the one measured by ``python -m benchmarks.power_kernels``
    (BENCHMARKS.md, item 4's note).
    """
    if device.type != "cpu":
        return "bmm"
    itemsize = dtype.itemsize
    if B * h * w * itemsize > _STACK_BYTES and h * w * itemsize >= _MATRIX_BYTES:
        return "loop"
    return "bmm row"


_STACK_BYTES = 16 * 2**20
"""Above this the stack outgrows the caches: the loop reads each matrix once per iteration (both
products while it is cached), the batched products read the whole stack twice. Measured on the
shared AMD EPYC (load 5-6): 64 MiB stacks of 256 KiB-1 MiB matrices, 15 iterations, one-row bmm
2.7-3.2x the loop (3 iterations: 2.0-2.2x); 16 MiB stacks 0.7-1.1x; at load 3.7, one iteration,
64 MiB: 1.05x."""
_MATRIX_BYTES = 256 * 2**10
"""From this matrix size a Python loop's per-matrix cost (~10 µs an iteration) is a small part of its products."""
