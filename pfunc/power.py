"""Pure power iteration for the largest singular values of a matrix.

No ``out=`` arguments and no in-place writes: every function returns new tensors,
so all of them run under ``torch.func.vmap`` (a stack of matrices, an ensemble)
and ``torch.func.grad``. The singular vectors are computed from ``W.detach()``:
gradients flow only through the final ``sigma = u^T W v``, as in torch's and
BigGAN's spectral norm.

Outside ``vmap`` the iteration is torch's own scheme, op for op (bitwise torch's
spectral norm). Under ``vmap`` it is one operation (``torch.ops.pfunc.power_iteration``, in
``pfunc/_vmap.py``) whose batching rule runs the kernel measured fastest for the device, sizes
and dtype on the whole stack at once. Under ``torch.compile``, from three iterations a call, it
is that operation as one opaque node; one or two iterations are plain products, which inductor
fuses for less than the node's fixed cost (``PLAIN_WHEN_COMPILED`` in ``pfunc/_power_kernels.py``).
BigGAN's iteration is the operation under ``vmap`` and plain ops under ``torch.compile``.

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
from . import _vmap
from ._power_kernels import normalize
from ._vmap import HAS_OPS, is_vmapped

_functorch = torch._C._functorch

__all__ = ["normalize", "power_iteration", "sigma", "gram_schmidt", "biggan_power_iteration"]


def _vmapped(*tensors: Tensor) -> bool:
    """Whether ``vmap`` batches any of ``tensors`` (then the operation's batching rule picks the kernel)."""
    if not HAS_OPS:
        return False
    for t in tensors:
        if is_vmapped(t):
            return True
    return False


def _detached(t: Tensor) -> Tensor:
    """``t.detach()`` where autograd or a ``torch.func`` transform could track ``t``; a plain tensor
    that needs no grad is used as it is (nothing computed from it alone is tracked, and a detach
    costs a dispatch per tensor per call). Not under ``torch.compile`` (see :func:`power_iteration`)."""
    if t.requires_grad or _functorch.is_functorch_wrapped_tensor(t):
        return t.detach()
    return t


def power_iteration(W: Tensor, u: Tensor, v: Tensor, n_iterations: int, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """torch's scheme: ``n_iterations`` of ``u <- W v / |W v|, v <- W^H u / |W^H u|``.

    Shapes: ``W (h, w)``, ``u (h,)``, ``v (w,)``; returns the new ``(u, v)``, detached.
    """
    if torch.compiler.is_compiling():
        # from PLAIN_WHEN_COMPILED + 1 iterations: one opaque node, whose kernel is chosen when it runs
        # (and compiles in a tenth of the time of 15 unrolled iterations); below, inductor fuses the
        # plain ops into code faster than the node's dispatch (item 5: 0.74x at 16 x 256 x 256)
        W, u, v = W.detach(), u.detach(), v.detach()
        if n_iterations <= kernels.PLAIN_WHEN_COMPILED or not HAS_OPS:
            return kernels.iterate_mv(W, u, v, n_iterations, eps)
        return torch.ops.pfunc.power_iteration(W, u, v, n_iterations, eps)
    if n_iterations > 0 and _vmapped(W, u, v):
        return _vmap.power_iteration(W, u, v, n_iterations, eps)  # detaches what autograd could track
    W, u, v = _detached(W), _detached(u), _detached(v)
    return kernels.iterate_mv(W, u, v, n_iterations, eps)


def _rows_under_vmap(W: Tensor, x: Tensor) -> bool:
    """Whether to write ``W x`` as a product with ``x`` as a row: on CPU under ``vmap``, where a
    vmapped ``torch.mv`` is a one-column ``bmm`` and the one-row ``bmm`` is the measured faster one."""
    return (
        HAS_OPS
        and not torch.compiler.is_compiling()
        and (is_vmapped(W) or is_vmapped(x))
        and W.device.type == "cpu"
    )


def sigma(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """The singular value estimate ``u^H W v`` (differentiable in ``W`` only).

    Outside ``vmap``: ``torch.vdot(u, torch.mv(W, v))``, as torch's spectral norm.
    """
    if _rows_under_vmap(W, v):
        return torch.vdot(u, v @ W.mT)
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
    if torch.compiler.is_compiling():  # one iteration: inductor fuses the plain ops (see power_iteration)
        new_us, new_vs = kernels.biggan_mv(W.detach(), us.detach(), eps)
        return _biggan_svs(W, new_us, new_vs), new_us, new_vs
    if _vmapped(W, us):
        new_us, new_vs = _vmap.biggan_power_iteration(W, us, eps)  # detaches what autograd could track
    else:
        new_us, new_vs = kernels.biggan_mv(_detached(W), _detached(us), eps)
    return _biggan_svs(W, new_us, new_vs), new_us, new_vs


def _biggan_svs(W: Tensor, us: Tensor, vs: Tensor) -> Tensor:
    """``svs[i] = u_i . W v_i``, differentiable in ``W``: per ``i`` with ``torch.mv`` as BigGAN-PyTorch,
    or one product with the ``k`` rows under ``vmap`` on CPU."""
    if _rows_under_vmap(W, vs):
        return ((vs @ W.mT) * us).sum(-1)
    return torch.stack([torch.dot(torch.mv(W, vs[i]), us[i]) for i in range(us.shape[0])])
