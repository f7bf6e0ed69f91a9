"""Pure power iteration for the largest singular values of a matrix.

No ``out=`` arguments and no in-place writes: every function returns new tensors,
so all of them run under ``torch.func.vmap`` (a stack of matrices, an ensemble)
and ``torch.func.grad``. The singular vectors are computed from ``W.detach()``:
gradients flow only through the final ``sigma = u^T W v``, as in torch's and
BigGAN's spectral norm.

>>> W = torch.diag(torch.tensor([3.0, 1.0]))
>>> u, v = power_iteration(W, torch.tensor([1.0, 1.0]) / 2**0.5, torch.tensor([1.0, 1.0]) / 2**0.5, 20)
>>> round(float(sigma(W, u, v)), 4)
3.0
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pfunc._vmap import mv, mv_adjoint

__all__ = ["normalize", "power_iteration", "sigma", "gram_schmidt", "biggan_power_iteration"]


def normalize(x: Tensor, eps: float) -> Tensor:
    """``x / max(||x||, eps)`` along the last dim (``F.normalize`` without ``out=``)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def power_iteration(W: Tensor, u: Tensor, v: Tensor, n_iterations: int, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """torch's scheme: ``n_iterations`` of ``u <- W v / |W v|, v <- W^H u / |W^H u|``.

    Shapes: ``W (h, w)``, ``u (h,)``, ``v (w,)``; returns the new ``(u, v)``, detached.
    """
    W = W.detach()
    u, v = u.detach(), v.detach()
    for _ in range(n_iterations):
        u = normalize(mv(W, v), eps)
        v = normalize(mv_adjoint(W, u), eps)
    return u, v


def sigma(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """The singular value estimate ``u^H W v`` (differentiable in ``W`` only)."""
    return torch.vdot(u, mv(W, v))


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
    Wd = W.detach()
    new_us: list[Tensor] = []
    new_vs: list[Tensor] = []
    svs: list[Tensor] = []
    for i in range(us.shape[0]):
        v = normalize(gram_schmidt(mv_adjoint(Wd, us[i].detach()), new_vs), eps)
        new_vs.append(v)
        u = normalize(gram_schmidt(mv(Wd, v), new_us), eps)
        new_us.append(u)
        svs.append(torch.dot(mv(W, v), u))
    return torch.stack(svs), torch.stack(new_us), torch.stack(new_vs)
