"""The power iteration as one operation with its own batching rule, and whether ``vmap`` is batching a tensor.

``torch.ops.pfunc.power_iteration`` (torch's scheme) and ``torch.ops.pfunc.biggan_power_iteration``
(BigGAN's Gram-Schmidt step) are ``torch.library.custom_op``s on detached tensors with leading
batch dims that broadcast. Their ``vmap`` rule moves the batch to the front and calls the op
again, so under ``vmap`` the op sees the whole stack and runs the kernel that
:func:`pfunc._power_kernels.batched_kernel` picks for the device, sizes and dtype (a loop of
``torch.mv``, a batched ``bmm``, or an elementwise product; one GEMM when the matrix is shared
by the batch). Without batch dims the op is torch's own scheme, op for op. Under
``torch.compile`` each op is one opaque node (a fake kernel gives the shapes), so there is no
graph break, and the kernel is chosen when the compiled code runs. No autograd formula is
needed: the iteration's outputs are detached by definition (gradients flow only through
``sigma = u^H W v``, computed outside).

``register_vmap`` exists from torch 2.5; on older torch (``HAS_OPS`` false) :mod:`pfunc.power`
runs the same kernels as plain ops, which ``vmap`` batches as ``bmm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _power_kernels as kernels

__all__ = ["is_vmapped", "HAS_OPS"]

_functorch = torch._C._functorch


def is_vmapped(t: Tensor) -> bool:
    """True if ``t`` is batched by ``torch.func.vmap`` at any functorch level (also under ``grad``)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


HAS_OPS = hasattr(torch.library, "register_vmap") and hasattr(torch.library, "custom_op")


def _flatten(W: Tensor, vectors: tuple[Tensor, ...], core: tuple[int, ...]):
    """Broadcast the leading dims of ``W`` (core 2) and ``vectors`` (core dims ``core``); flatten them to one.

    Returns ``(batch shape, W as (h, w) if one matrix serves the whole batch else (B, h, w), vectors (B, ...))``.
    """
    batch = torch.broadcast_shapes(W.shape[:-2], *(x.shape[: x.ndim - c] for x, c in zip(vectors, core)))
    B = math.prod(batch)
    flat = tuple(x.expand(*batch, *x.shape[x.ndim - c:]).reshape(B, *x.shape[x.ndim - c:]) for x, c in zip(vectors, core))
    if math.prod(W.shape[:-2]) == 1:
        return batch, W.reshape(W.shape[-2:]), flat
    return batch, W.expand(*batch, *W.shape[-2:]).reshape(B, *W.shape[-2:]), flat


def _power_iteration(W: Tensor, u: Tensor, v: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    if W.ndim == 2 and u.ndim == 1 and v.ndim == 1:
        return kernels.iterate_mv(W, u, v, n, eps)
    batch, Wb, (us, vs) = _flatten(W, (u, v), (1, 1))
    if Wb.ndim == 2:
        us, vs = kernels.iterate_shared(Wb, us, vs, n, eps)
    else:
        B, h, w = Wb.shape
        us, vs = kernels.iterate_batched(Wb, us, vs, n, eps, kernels.batched_kernel(Wb.device, Wb.dtype, B, h, w))
    return us.reshape(*batch, us.shape[-1]), vs.reshape(*batch, vs.shape[-1])


def _biggan_power_iteration(W: Tensor, us: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if W.ndim == 2 and us.ndim == 2:
        return kernels.biggan_mv(W, us, eps)
    batch, Wb, (ub,) = _flatten(W, (us,), (2,))
    if Wb.ndim == 2:
        kernel = "shared"
    else:
        B, h, w = Wb.shape
        kernel = kernels.batched_kernel(Wb.device, Wb.dtype, B, h, w)
    new_us, new_vs = kernels.biggan_batched(Wb, ub, eps, kernel)
    return new_us.reshape(*batch, *new_us.shape[-2:]), new_vs.reshape(*batch, *new_vs.shape[-2:])


def _to_front(info, in_dims, tensors: tuple[Tensor, ...], core: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Each tensor with this vmap level's dim first (size 1 where unbatched) and its other batch dims
    padded to a common count, so that leading dims broadcast the way the logical shapes do."""
    ranks = [t.ndim - c - (d is not None) for t, d, c in zip(tensors, in_dims, core)]
    top = max(ranks)
    out = []
    for t, d, rank in zip(tensors, in_dims, ranks):
        t = t.unsqueeze(0) if d is None else t.movedim(d, 0)
        out.append(t.reshape(t.shape[0], *(1,) * (top - rank), *t.shape[1:]))
    return tuple(out)


if HAS_OPS:

    @torch.library.custom_op("pfunc::power_iteration", mutates_args=())
    def power_iteration_op(W: Tensor, u: Tensor, v: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
        """torch's scheme, ``n >= 1`` iterations, on ``W (*b, h, w)``, ``u (*b, h)``, ``v (*b, w)`` (``*b`` broadcast)."""
        return _power_iteration(W, u, v, n, eps)

    @power_iteration_op.register_fake
    def _(W, u, v, n, eps):
        batch = torch.broadcast_shapes(W.shape[:-2], u.shape[:-1], v.shape[:-1])
        return W.new_empty(*batch, W.shape[-2]), W.new_empty(*batch, W.shape[-1])

    def _power_iteration_vmap(info, in_dims, W, u, v, n, eps):
        W, u, v = _to_front(info, in_dims[:3], (W, u, v), (2, 1, 1))
        return power_iteration_op(W, u, v, n, eps), (0, 0)

    torch.library.register_vmap("pfunc::power_iteration", _power_iteration_vmap)

    @torch.library.custom_op("pfunc::biggan_power_iteration", mutates_args=())
    def biggan_power_iteration_op(W: Tensor, us: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """One BigGAN iteration on ``W (*b, h, w)``, ``us (*b, k, h)``: new ``us (*b, k, h)``, ``vs (*b, k, w)``."""
        return _biggan_power_iteration(W, us, eps)

    @biggan_power_iteration_op.register_fake
    def _(W, us, eps):
        batch = torch.broadcast_shapes(W.shape[:-2], us.shape[:-2])
        k = us.shape[-2]
        return W.new_empty(*batch, k, W.shape[-2]), W.new_empty(*batch, k, W.shape[-1])

    def _biggan_vmap(info, in_dims, W, us, eps):
        W, us = _to_front(info, in_dims[:2], (W, us), (2, 2))
        return biggan_power_iteration_op(W, us, eps), (0, 0)

    torch.library.register_vmap("pfunc::biggan_power_iteration", _biggan_vmap)
