"""Whether ``torch.func.vmap`` is batching a tensor, and the CPU matrix-vector products that depend on it.

Under ``vmap`` a ``torch.mv`` becomes a ``bmm`` with a one-column right side, which CPU
BLAS runs 4-6x slower than a loop of ``mv``; the same product written elementwise
(multiply, then sum) batches at full speed. On CUDA, and outside ``vmap``, ``torch.mv``
stays: it is exact to torch's own spectral norm there and never builds an ``(h, w)`` temporary.
"""

from __future__ import annotations

import torch
from torch import Tensor

_functorch = torch._C._functorch


def is_vmapped(t: Tensor) -> bool:
    """True if ``t`` is batched by ``torch.func.vmap`` at any functorch level (also under ``grad``)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def _elementwise(W: Tensor) -> bool:
    return (
        W.device.type == "cpu"
        and not W.is_complex()
        and not torch.compiler.is_compiling()
        and is_vmapped(W)
    )


def mv(W: Tensor, x: Tensor) -> Tensor:
    """``W x`` for ``W (h, w)``, ``x (w,)``: ``torch.mv``, or elementwise on CPU under ``vmap``."""
    if _elementwise(W):
        return (W * x.unsqueeze(-2)).sum(-1)
    return torch.mv(W, x)


def mv_adjoint(W: Tensor, y: Tensor) -> Tensor:
    """``W^H y`` for ``W (h, w)``, ``y (h,)``: ``torch.mv(W.mH, y)``, or elementwise on CPU under ``vmap``."""
    if _elementwise(W):
        return (W * y.unsqueeze(-1)).sum(-2)
    return torch.mv(W.mH, y)
