"""Pure power iteration for the largest singular values of a matrix.

No ``out=`` arguments and no in-place writes: every function returns new tensors,
so all of them run under ``torch.func.vmap`` (a stack of matrices, an ensemble)
and ``torch.func.grad``. The singular vectors are computed from ``W.detach()``:
gradients flow only through the final ``sigma = u^T W v``, as in torch's and
BigGAN's spectral norm.

Outside ``vmap`` the iteration is torch's own scheme, op for op (bitwise torch's
spectral norm). Under ``vmap`` and under ``torch.compile`` it is one operation
(``torch.ops.pfunc.power_iteration``, see :mod:`pfunc._vmap`) whose batching rule runs
the kernel measured fastest for the device, sizes and dtype on the whole stack at once.

>>> W = torch.diag(torch.tensor([3.0, 1.0]))
>>> u, v = power_iteration(W, torch.tensor([1.0, 1.0]) / 2**0.5, torch.tensor([1.0, 1.0]) / 2**0.5, 20)
>>> round(float(sigma(W, u, v)), 4)
3.0
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _power_kernels as kernels
from ._power_kernels import normalize
from ._vmap import HAS_OPS, is_vmapped

__all__ = ["normalize", "power_iteration", "sigma", "gram_schmidt", "biggan_power_iteration"]


def _as_op(*tensors: Tensor) -> bool:
    """Run the iteration as the custom operation: under ``torch.compile`` (one opaque node) or
    when ``vmap`` batches any input (its batching rule picks the kernel)."""
    if not HAS_OPS:
        return False
    if torch.compiler.is_compiling():
        return True
    return any(is_vmapped(t) for t in tensors)


def power_iteration(W: Tensor, u: Tensor, v: Tensor, n_iterations: int, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """torch's scheme: ``n_iterations`` of ``u <- W v / |W v|, v <- W^H u / |W^H u|``.

    Shapes: ``W (h, w)``, ``u (h,)``, ``v (w,)``; returns the new ``(u, v)``, detached.
    """
    W, u, v = W.detach(), u.detach(), v.detach()
    if n_iterations <= 0:
        return u, v
    if _as_op(W, u, v):
        return torch.ops.pfunc.power_iteration(W, u, v, n_iterations, eps)
    return kernels.iterate_mv(W, u, v, n_iterations, eps)


def _rows_under_vmap(W: Tensor, x: Tensor) -> bool:
    """Whether to write ``W x`` as a product with ``x`` as a row: on CPU under ``vmap``, where a
    vmapped ``torch.mv`` is a one-column ``bmm`` and the one-row ``bmm`` is the measured faster one."""
    return (
        HAS_OPS
        and W.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and (is_vmapped(W) or is_vmapped(x))
    )


def sigma(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """The singular value estimate ``u^H W v`` (differentiable in ``W`` only).

    Outside ``vmap``: ``torch.vdot(u, torch.mv(W, v))``, as torch's spectral norm.
    """
    if _rows_under_vmap(W, v):
        return torch.vdot(u, (v.unsqueeze(-2) @ W.mT).squeeze(-2))
    return torch.vdot(u, torch.mv(W, v))


def gram_schmidt(x: Tensor, ys: Sequence[Tensor]) -> Tensor:
    """``x`` minus its projections on each of ``ys`` in turn (BigGAN's ``gram_schmidt``)."""
    for y in ys:
        x = x - torch.dot(x, y) / torch.dot(y, y) * y
    return x


def biggan_power_iteration(W: Tensor, us: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, Tensor]:
    """One BigGAN power iteration for the top ``k`` singular values (Gram-Schmidt deflation).

    Shapes: ``W (h, w)``, ``us (k, h)``; returns ``(svs (k,), us (k, h), vs (k, w))``.
    ``us`` and ``vs`` are detached; ``svs[i] = v_i W^T u_i`` carries gradients to ``W``.
    """
    Wd, ud = W.detach(), us.detach()
    if _as_op(Wd, ud):
        new_us, new_vs = torch.ops.pfunc.biggan_power_iteration(Wd, ud, eps)
    else:
        new_us, new_vs = kernels.biggan_mv(Wd, ud, eps)
    if _rows_under_vmap(W, new_vs):
        return ((new_vs @ W.mT) * new_us).sum(-1), new_us, new_vs
    svs = [torch.dot(torch.mv(W, new_vs[i]), new_us[i]) for i in range(us.shape[0])]
    return torch.stack(svs), new_us, new_vs
