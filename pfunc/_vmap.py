"""The power iteration as one operation with its own batching rule, and whether ``vmap`` is batching a tensor.

``torch.ops.pfunc.power_iteration`` (torch's scheme) and ``torch.ops.pfunc.biggan_power_iteration``
(BigGAN's Gram-Schmidt step) are operators of a ``torch.library.Library`` on detached tensors
with leading batch dims that broadcast. Their ``FuncTorchBatched`` kernel (a batching rule, what
``torch.library.register_vmap`` installs, written directly: ``register_vmap``'s generic helper and
``custom_op``'s wrappers cost 70-80 µs more per call, as much as a 16 x 64 x 64 iteration) moves this
vmap level's batch dim to the front and runs the whole stack one level down, with ``vmap``'s
interpreter popped (as torch's own batching rules of ``autograd.Function`` do), so the kernel's
ops run once for the stack and not through ``vmap``'s dispatch layer one by one. The kernel is
the one :func:`pfunc._power_kernels.batched_kernel` picks for the device, sizes and dtype (a loop
of ``torch.mv``, a one-row or one-column ``bmm``, or an elementwise product; one GEMM when the
matrix is shared by the batch). :func:`power_iteration` and :func:`biggan_power_iteration` enter
the rule directly when ``vmap`` is the innermost transform (the dispatcher's round trip costs as
much as the rule). Without batch dims the op is torch's own scheme, op for op. Under
``torch.compile`` each op is one opaque node (a fake kernel gives the shapes), so there is no graph
break, and the kernel is chosen when the compiled code runs. No autograd formula is needed: the
iteration's outputs are detached by definition (gradients flow only through ``sigma = u^H W v``,
computed outside).

On torch before 2.5 (``HAS_OPS`` false) :mod:`pfunc.power` runs the kernels as plain ops, which
``vmap`` batches as one-column ``bmm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _power_kernels as kernels

__all__ = ["is_vmapped", "HAS_OPS", "power_iteration", "biggan_power_iteration"]

_functorch = torch._C._functorch


def is_vmapped(t: Tensor) -> bool:
    """True if ``t`` is batched by ``torch.func.vmap`` at any functorch level (also under ``grad``)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


HAS_OPS = hasattr(torch.library, "register_vmap")
"""torch >= 2.5 (the release whose ``register_vmap`` made Python batching rules of library ops a
supported use; the kernel below is written the same way). Older torch runs the plain kernels."""


def _flatten(W: Tensor, vectors: tuple[Tensor, ...], core: tuple[int, ...]):
    """Broadcast the leading dims of ``W`` (core 2) and ``vectors`` (core dims ``core``); flatten them to one.

    Returns ``(batch shape, W as (h, w) if one matrix serves the whole batch else (B, h, w), vectors (B, ...))``.
    """
    lead = [x.shape[: x.ndim - c] for x, c in zip(vectors, core)]
    wlead = W.shape[:-2]
    if all(b == wlead for b in lead):  # the common case (vmap over stacked everything): no broadcasting
        batch = wlead
    else:
        batch = torch.Size(torch.broadcast_shapes(wlead, *lead))
    flat = []
    for x, c, b in zip(vectors, core, lead):
        if b != batch:
            x = x.expand(*batch, *x.shape[x.ndim - c:])
        if len(batch) != 1:
            x = x.reshape(-1, *x.shape[x.ndim - c:])
        flat.append(x)
    if math.prod(wlead) == 1 and (len(batch) != 1 or batch[0] != 1):
        return batch, W.reshape(W.shape[-2:]), tuple(flat)
    if wlead != batch:
        W = W.expand(*batch, *W.shape[-2:])
    if len(batch) != 1:
        W = W.reshape(-1, *W.shape[-2:])
    return batch, W, tuple(flat)


def _unflatten(x: Tensor, batch: torch.Size, core: int) -> Tensor:
    return x if len(batch) == 1 else x.reshape(*batch, *x.shape[x.ndim - core:])


def _power_iteration(W: Tensor, u: Tensor, v: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    if W.ndim == 2 and u.ndim == 1 and v.ndim == 1:
        return kernels.iterate_mv(W, u, v, n, eps)
    if W.ndim == 3 and u.ndim == 2 and v.ndim == 2 and W.shape[0] == u.shape[0] == v.shape[0]:
        B, h, w = W.shape  # the common case (vmap over stacked everything): nothing to broadcast
        return kernels.iterate_batched(W, u, v, n, eps, kernels.batched_kernel(W.device, W.dtype, B, h, w))
    batch, Wb, (us, vs) = _flatten(W, (u, v), (1, 1))
    if Wb.ndim == 2:
        us, vs = kernels.iterate_shared(Wb, us, vs, n, eps)
    else:
        B, h, w = Wb.shape
        us, vs = kernels.iterate_batched(Wb, us, vs, n, eps, kernels.batched_kernel(Wb.device, Wb.dtype, B, h, w))
    return _unflatten(us, batch, 1), _unflatten(vs, batch, 1)


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
    return _unflatten(new_us, batch, 2), _unflatten(new_vs, batch, 2)


def _to_front(in_dims, tensors: tuple[Tensor, ...], core: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Each tensor with this vmap level's dim first (size 1 where unbatched) and its other batch dims
    padded to a common count, so that leading dims broadcast the way the logical shapes do."""
    ranks = [t.ndim - c - (d is not None) for t, d, c in zip(tensors, in_dims, core)]
    top = max(ranks)
    out = []
    for t, d, rank in zip(tensors, in_dims, ranks):
        if d is None:
            t = t.unsqueeze(0)
        elif d != 0:
            t = t.movedim(d, 0)
        if rank < top:
            t = t.reshape(t.shape[0], *(1,) * (top - rank), *t.shape[1:])
        out.append(t)
    return tuple(out)


def _same_rank(tensors: list[Tensor], core: tuple[int, ...]) -> bool:
    rank = tensors[0].ndim - core[0]
    return all(t.ndim - c == rank for t, c in zip(tensors, core))


def _batched(op, kernel, W, others, core, rule_args):
    """The ``FuncTorchBatched`` kernel: unwrap this vmap level's batch dims, move them to the front
    and run the whole batch one level down, this level's interpreter popped as torch's own
    batching rules of ``autograd.Function`` do (``interpreter.lower()``), so the kernel's ops do not
    pass through ``vmap``'s dispatch layer one by one. Plain tensors outside any tracing mode go
    straight to ``kernel``; tensors still wrapped by an outer transform, or traced (``torch.compile``,
    ``make_fx``), call ``op`` again, detached, so an outer ``vmap`` batches it and a trace records one
    node. (``torch.library.register_vmap``'s helper does the same through pytrees and ``custom_op``'s
    wrappers, at several times the cost per call.)"""
    level = _functorch.peek_interpreter_stack().level()
    tensors, dims = [], []
    direct = torch._C._len_torch_dispatch_stack() == 0
    front = True  # every tensor batched at dim 0
    for t in (W, *others):
        t, d = _functorch._unwrap_batched(t, level)
        tensors.append(t)
        dims.append(d)
        front = front and d == 0
        direct = direct and type(t) in _PLAIN and not _functorch.is_functorch_wrapped_tensor(t)
    if not (front and _same_rank(tensors, core)) and any(d is not None for d in dims):
        tensors = _to_front(dims, tuple(tensors), core)
    # the kernel's results are detached by definition: nothing it computes may reach autograd
    tensors = [t.detach() if t.requires_grad or not direct else t for t in tensors]
    # and eagerly: with no transform left on the stack, a torch.compile that fell back to eager
    # around this vmap would compile the kernel's frames as graphs of their own (as torch._dynamo.disable)
    saved = callback = _UNSET
    try:
        saved = _functorch.pop_dynamic_layer_stack()
        callback = _set_eval_frame(None)
        outs = (kernel if direct else op)(*tensors, *rule_args)
    finally:  # an exception or a signal in the kernel leaves vmap's stack as it found it
        if callback is not _UNSET:
            _set_eval_frame(callback)
        if saved is not _UNSET:
            _functorch.push_dynamic_layer_stack(saved)
    if all(d is None for d in dims):
        return outs
    return tuple(_functorch._add_batch_dim(o, 0, level) for o in outs)


_PLAIN = (Tensor, torch.nn.Parameter)
"""Tensor types the kernels run on as they are, when no functorch transform wraps them (a ``FakeTensor``
or another subclass, and a tensor an outer ``jvp``, ``grad`` or ``vmap`` still wraps, go through the op,
detached: the kernel run on a dual tensor would give its vectors tangents)."""


def _power_iteration_rule(W: Tensor, u: Tensor, v: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """``power_iteration``'s batching rule."""
    return _batched(torch.ops.pfunc.power_iteration.default, _power_iteration, W, (u, v), (2, 1, 1), (n, eps))


def _biggan_power_iteration_rule(W: Tensor, us: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``biggan_power_iteration``'s batching rule."""
    return _batched(torch.ops.pfunc.biggan_power_iteration.default, _biggan_power_iteration, W, (us,), (2, 2), (eps,))


def _call(op, rule, *args):
    """``op(*args)`` on the tensors detached; when the innermost ``torch.func`` transform is ``vmap``
    and nothing traces, its batching ``rule`` is entered directly (the dispatcher's round trip to it
    costs about as much as the rule itself), and detaches there."""
    interpreter = _functorch.peek_interpreter_stack()
    if interpreter is not None and interpreter.key() == _VMAP and torch._C._len_torch_dispatch_stack() == 0:
        return rule(*args)
    return op(*(a.detach() if isinstance(a, Tensor) else a for a in args))


def power_iteration(W: Tensor, u: Tensor, v: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """``torch.ops.pfunc.power_iteration(W, u, v, n, eps)`` on detached tensors that ``vmap`` may batch."""
    return _call(torch.ops.pfunc.power_iteration.default, _power_iteration_rule, W, u, v, n, eps)


def biggan_power_iteration(W: Tensor, us: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``torch.ops.pfunc.biggan_power_iteration(W, us, eps)`` on detached tensors that ``vmap`` may batch."""
    return _call(torch.ops.pfunc.biggan_power_iteration.default, _biggan_power_iteration_rule, W, us, eps)


_VMAP = _functorch.TransformType.Vmap
_set_eval_frame = torch._C._dynamo.eval_frame.set_eval_frame
_UNSET = object()


if HAS_OPS:
    _LIB = torch.library.Library("pfunc", "DEF")  # kept alive: the ops live as long as this module

    _LIB.define("power_iteration(Tensor W, Tensor u, Tensor v, int n, float eps) -> (Tensor, Tensor)")
    _LIB.impl("power_iteration", _power_iteration, "CompositeExplicitAutograd")
    _LIB.impl("power_iteration", _power_iteration_rule, "FuncTorchBatched")

    @torch.library.register_fake("pfunc::power_iteration", lib=_LIB)
    def _(W, u, v, n, eps):
        batch = torch.broadcast_shapes(W.shape[:-2], u.shape[:-1], v.shape[:-1])
        return W.new_empty(*batch, W.shape[-2]), W.new_empty(*batch, W.shape[-1])

    _LIB.define("biggan_power_iteration(Tensor W, Tensor us, float eps) -> (Tensor, Tensor)")
    _LIB.impl("biggan_power_iteration", _biggan_power_iteration, "CompositeExplicitAutograd")
    _LIB.impl("biggan_power_iteration", _biggan_power_iteration_rule, "FuncTorchBatched")

    @torch.library.register_fake("pfunc::biggan_power_iteration", lib=_LIB)
    def _(W, us, eps):
        batch = torch.broadcast_shapes(W.shape[:-2], us.shape[:-2])
        k = us.shape[-2]
        return W.new_empty(*batch, k, W.shape[-2]), W.new_empty(*batch, k, W.shape[-1])
