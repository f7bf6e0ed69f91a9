"""The gradient all-reduce overlapped with the backward: :func:`all_reduce_in_backward`, :func:`all_reduce_grad`.

The autograd graph is walked before the backward to predict the order in which the engine
produces the inputs' gradients; buckets are filled in that order by tensor hooks and each is
launched the moment it is complete, so the last layers' gradients are on the wire while the
first layers' are still being computed.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from typing import Any, Iterator, Optional, Sequence

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import DEFAULT_BUCKET_CAP_MB, Bucket, bucket_items, cap_bytes, plan_buckets
from .process_group import Group, resolve_group
from .reduction import Op, Pending, check_op
from .trees import Leaves, Tree, check_devices, check_structure, flatten_tree

__all__ = ["all_reduce_in_backward", "all_reduce_grad", "arrival_order", "check_output"]


def arrival_order(output: Tensor, tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """``(order, unreachable)``: the inputs whose gradient the backward of ``output`` computes, in
    the order autograd's engine produces them, and the inputs it never reaches.

    The engine runs a node once every consumer of its output has run, the highest sequence
    number first (nodes made later in the forward run earlier; a leaf's AccumulateGrad runs as
    soon as it is ready), so the walk replays that schedule: a leaf's gradient is final when
    its AccumulateGrad node would run, a non-leaf input's when its ``grad_fn`` would. The
    order only decides how buckets are filled; correctness never depends on it."""
    by_node: dict[int, list[int]] = {}
    leaf_of: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.grad_fn is not None:
            by_node.setdefault(id(t.grad_fn), []).append(i)
        else:
            leaf_of.setdefault(id(t), []).append(i)
    root = output.grad_fn
    if root is None:  # the output is itself a leaf input
        order = leaf_of.get(id(output), [])
        reached = set(order)
        return order, [i for i in range(len(tensors)) if i not in reached]
    deps: dict[int, int] = {}
    nodes = {id(root): root}
    stack = [root]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is None:
                continue
            deps[id(nxt)] = deps.get(id(nxt), 0) + 1
            if id(nxt) not in nodes:
                nodes[id(nxt)] = nxt
                stack.append(nxt)
    order: list[int] = []
    ready = [(-_sequence_nr(root), 0, root)]
    count = 1
    while ready:
        _, _, node = heapq.heappop(ready)
        order.extend(by_node.get(id(node), ()))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            order.extend(leaf_of.get(id(variable), ()))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            deps[id(nxt)] -= 1
            if deps[id(nxt)] == 0:
                heapq.heappush(ready, (-_sequence_nr(nxt), count, nxt))
                count += 1
    reached = set(order)
    return order, [i for i in range(len(tensors)) if i not in reached]


def _sequence_nr(node: Any) -> int:
    get = getattr(node, "_sequence_nr", None)
    return get() if get is not None else 0


class _BackwardPending(Pending):
    """Buckets filled by tensor hooks during a backward; each is launched when complete, in order
    (with ``overlap=False`` only at :meth:`wait`, after the backward)."""

    def __init__(self, where: str, g: Group, leaves: Leaves, buckets: list[Bucket], op: Op, overlap: bool):
        super().__init__(where, g, leaves, buckets, op)
        self._overlap = overlap
        self._slot: dict[int, tuple[int, int]] = {}  # leaf -> (bucket, offset)
        for k, b in enumerate(buckets):
            offset = 0
            for i, n in zip(b.members, b.numels):
                self._slot[i] = (k, offset)
                offset += n
        self._missing = [len(b.members) for b in buckets]
        self._arrived = [False] * len(leaves.tensors)
        self._lock = threading.Lock()

    def _buffer(self, k: int) -> Tensor:
        flat = self._flats[k]
        if flat is None:
            b = self._buckets[k]
            flat = self._flats[k] = torch.empty(b.numel, dtype=b.dtype, device=b.device)
        return flat

    def _zero(self, i: int) -> None:
        """Leaf ``i`` gets no gradient from this backward: it counts as zeros (autograd's materialize_grads)."""
        k, offset = self._slot[i]
        self._buffer(k)[offset : offset + self._leaves.tensors[i].numel()].zero_()
        self._arrived[i] = True
        self._missing[k] -= 1

    def _launch_ready(self) -> None:
        while self._launched < len(self._buckets) and self._missing[self._launched] == 0:
            self._launch(self._launched)

    def _on_grad(self, i: int, grad: Tensor) -> None:
        name = self._leaves.names[i]
        if grad.layout != torch.strided:
            raise TypeError(f"{self._where}: the gradient of '{name}' is {grad.layout}; only dense gradients are supported")
        with self._lock:
            if self._arrived[i] or self._result is not None:
                raise RuntimeError(
                    f"{self._where}: a second gradient of '{name}' arrived in one block; run one backward "
                    "per all_reduce_in_backward (sum micro-batch gradients before the last one)"
                )
            k, offset = self._slot[i]
            self._buffer(k)[offset : offset + grad.numel()].copy_(grad.detach().reshape(-1))
            self._arrived[i] = True
            self._missing[k] -= 1
            if self._overlap:
                self._launch_ready()

    def _finish_launches(self) -> None:
        with self._lock:
            for i, arrived in enumerate(self._arrived):
                if not arrived:  # reachable, but the backward produced no gradient for it
                    self._zero(i)
            self._launch_ready()


@contextlib.contextmanager
def all_reduce_in_backward(
    output: Tensor,
    inputs: Tree,
    *,
    op: Op = "mean",
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    check: bool = True,
) -> Iterator[Pending]:
    """Within the block, the one backward of ``output`` all-reduces its gradients w.r.t. ``inputs``
    bucket by bucket, each bucket's all-reduce starting the moment its last gradient is ready.

    On entry the autograd graph of ``output`` is walked to predict the order in which the
    engine will produce the gradients, and the buckets are filled in that order, so the first
    bucket (the last layers') goes on the wire while autograd still computes the first layers'
    gradients. Inputs the graph does not reach count as zeros from the start. A hook on every
    input tensor copies its gradient into its bucket; buckets launch in order, the same on every
    rank. The hooks are removed when the block exits; ``pending.wait()`` (after the backward)
    launches what is left and gives the reduced tree.

    ``check`` all-gathers, with the structure's hash, a hash of the predicted order: if the
    ranks' graphs differ (data-dependent control flow) every rank falls back to filling buckets
    in ``inputs``' order and launching them after the backward, which is always safe. Only with
    ``check=False`` must the graph be the same on every rank.

    One top-level ``torch.autograd.grad`` or ``.backward()`` of ``output`` per block; not inside
    ``torch.func`` transforms (their gradients fire no tensor hooks).

    >>> # leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    >>> # loss, state = loss_fn(leaves, state, x)
    >>> # with pf.distributed.all_reduce_in_backward(loss, leaves) as pending:
    >>> #     loss.backward()                       # or torch.autograd.grad(loss, ...)
    >>> # grads = pending.wait()                    # the mean over ranks
    """
    where = "pfunc.distributed.all_reduce_in_backward"
    check_output(output, where)
    g = resolve_group(group, where)
    leaves = flatten_tree(inputs, where, "inputs")
    for name, t in zip(leaves.names, leaves.tensors):
        if not t.requires_grad:
            raise ValueError(f"{where}: inputs['{name}'] does not require grad, so no gradient would ever reach it")
    check_op(op, leaves, where, "inputs")
    check_devices(leaves, g, where, "inputs")
    cap = cap_bytes(bucket_cap_mb, where)
    order, unreachable = arrival_order(output, leaves.tensors)
    overlap = True
    if check:
        overlap = check_structure(leaves, g, where, "inputs", plan=(order, unreachable))
    if not overlap:
        order, unreachable = list(range(len(leaves.tensors))), []
    pending = _BackwardPending(where, g, leaves, plan_buckets(bucket_items(leaves.tensors), order + unreachable, cap), op, overlap)
    for i in unreachable:
        pending._zero(i)
    handles = []
    skipped = set(unreachable)
    try:
        for i, t in enumerate(leaves.tensors):
            if i not in skipped:
                handles.append(t.register_hook(_Hook(pending, i)))
        yield pending
    finally:
        for h in handles:
            h.remove()


class _Hook:
    """A tensor hook that hands the gradient of input ``i`` to its bucket and leaves it unchanged."""

    __slots__ = ("pending", "i")

    def __init__(self, pending: _BackwardPending, i: int):
        self.pending, self.i = pending, i

    def __call__(self, grad: Tensor) -> None:
        self.pending._on_grad(self.i, grad)


def check_output(output: Any, where: str) -> None:
    """``ValueError`` unless ``output`` is a one-element tensor with autograd history (the loss)."""
    if not isinstance(output, Tensor) or output.numel() != 1:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"{where}: output must be a one-element tensor (the loss), got {shape}")
    if not output.requires_grad:
        raise ValueError(f"{where}: output does not require grad; it was computed without autograd history")


def all_reduce_grad(
    output: Tensor,
    inputs: Tree,
    *,
    op: Op = "mean",
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    check: bool = True,
) -> Tree:
    """The gradient of scalar ``output`` w.r.t. the tree ``inputs``, averaged (or summed) over
    ranks, each bucket's all-reduce overlapping the rest of the backward.

    ``torch.autograd.grad(output, inputs)`` inside :func:`all_reduce_in_backward`; inputs the
    output does not depend on get zeros. Use it at the top level, on leaves made for the step:

    >>> # leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    >>> # loss, state = loss_fn(leaves, state, x)
    >>> # grads = pf.distributed.all_reduce_grad(loss, leaves)   # == all_reduce(local grads)

    Args:
        output: a one-element tensor (the local loss).
        inputs: a tree of tensors that require grad.
        op, group, bucket_cap_mb: as for :func:`all_reduce`.
        check: as for :func:`all_reduce_in_backward`.
    """
    where = "pfunc.distributed.all_reduce_grad"
    check_output(output, where)
    with all_reduce_in_backward(output, inputs, op=op, group=group, bucket_cap_mb=bucket_cap_mb, check=check) as pending:
        tensors = optree.tree_leaves(inputs, namespace="torch")
        torch.autograd.grad(output, tensors, allow_unused=True)
    return pending.wait()
