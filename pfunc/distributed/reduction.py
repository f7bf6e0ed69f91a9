"""The bucketed all-reduce of a tree: :func:`all_reduce` and its in-flight handle :class:`Pending`."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import DEFAULT_BUCKET_CAP_MB, MB, Bucket, bucket_items, cap_bytes, plan_buckets
from .process_group import Group, resolve_group, run_collective
from .trees import Leaves, Tree, check_devices, check_structure, flatten_tree

__all__ = ["Op", "Pending", "all_reduce", "check_op"]

Op = Literal["mean", "sum"]


def check_op(op: Any, leaves: Leaves, where: str, argname: str) -> None:
    """``ValueError``/``TypeError`` unless ``op`` is ``"mean"``/``"sum"`` and every tensor's dtype can be reduced with it."""
    if op not in ("mean", "sum"):
        raise ValueError(f"{where}: op must be 'mean' or 'sum', got {op!r}")
    for name, t in zip(leaves.names, leaves.tensors):
        if t.dtype == torch.bool:
            raise TypeError(f"{where}: {argname}['{name}'] is bool; it cannot be summed or averaged")
        if op == "mean" and not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{where}: {argname}['{name}'] is {t.dtype}; op='mean' needs floating or complex tensors (use op='sum')")


class Pending:
    """Bucket all-reduces in flight; :meth:`wait` gives the reduced tree (the same tree on every call)."""

    def __init__(self, where: str, g: Group, leaves: Leaves, buckets: list[Bucket], op: Op):
        self._where = where
        self._g = g
        self._leaves = leaves
        self._buckets = buckets
        self._op = op
        self._flats: list[Optional[Tensor]] = [None] * len(buckets)
        self._works: list[Any] = [None] * len(buckets)
        self._launched = 0
        self._result: Optional[Tree] = None

    @property
    def buckets(self) -> int:
        """How many collectives (one per bucket) this reduction runs."""
        return len(self._buckets)

    @property
    def bucket_keys(self) -> list[list[str]]:
        """The keys in each bucket, in launch order."""
        return [[self._leaves.names[i] for i in b.members] for b in self._buckets]

    @property
    def launched(self) -> int:
        """How many of the bucket all-reduces have started so far (in order, 0 to launched - 1)."""
        return self._launched

    def _what(self, k: int) -> str:
        """Bucket ``k``'s all-reduce, as an error message names it."""
        b = self._buckets[k]
        return f"the all-reduce of bucket {k + 1} of {len(self._buckets)} ({b.dtype} on {b.device}, {b.nbytes / MB:.2f} MB)"

    def _launch(self, k: int) -> None:
        flat = self._flats[k]
        assert flat is not None and k == self._launched
        if self._op == "mean" and self._g.size > 1:
            flat.div_(self._g.size)  # before the sum, as DDP does: no overflow in half precision
        self._works[k] = run_collective(self._where, self._what(k), self._g, dist.all_reduce, flat, op=dist.ReduceOp.SUM,
                                        group=self._g.pg, async_op=True)
        self._launched += 1

    def _pack(self, k: int) -> None:
        b = self._buckets[k]
        self._flats[k] = torch.cat([self._leaves.tensors[i].detach().reshape(-1) for i in b.members])

    def _finish_launches(self) -> None:
        """Hook of the backward route: buckets not launched yet go now."""

    def wait(self) -> Tree:
        """Block until every bucket is reduced (on CUDA: until the current stream is ordered after
        them) and return the reduced tree; its tensors may be views of one bucket each."""
        if self._result is not None:
            return self._result
        self._finish_launches()
        out: list[Optional[Tensor]] = [None] * len(self._leaves.tensors)
        for k, (b, work) in enumerate(zip(self._buckets, self._works)):
            run_collective(self._where, self._what(k), self._g, work.wait)
            flat = self._flats[k]
            assert flat is not None
            for i, piece in zip(b.members, flat.split(b.numels)):
                out[i] = piece.view(self._leaves.tensors[i].shape)
        self._result = self._leaves.unflatten(out)
        self._flats = [None] * len(self._buckets)
        self._works = [None] * len(self._buckets)
        return self._result


def all_reduce(
    tree: Tree,
    *,
    op: Op = "mean",
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    async_op: bool = False,
    check: bool = True,
) -> Any:
    """The mean (``op="mean"``) or sum over ranks of every tensor of ``tree``, as a new tree.

    The tensors are packed into flat buckets of at most ``bucket_cap_mb`` MB per (device,
    dtype) and each bucket is one ``torch.distributed.all_reduce``, launched as soon as it
    is packed, so packing the next bucket overlaps the previous one's communication.
    ``tree``'s tensors are never written; the results are views of the new buckets (shapes
    and dtypes as the inputs', no autograd history). With ``async_op`` the call returns a
    :class:`Pending` at once, and ``pending.wait()`` gives the tree: do other work between.

    ``check`` first all-gathers a 64-bit hash of the keys, shapes, dtypes and devices, and
    raises ``ValueError`` naming the first differing key on every rank when they differ
    (otherwise a mismatch hangs, or reduces garbage). It costs one tiny all-gather (and a
    host sync on CUDA); pass ``check=False`` in a hot loop whose structure cannot change.

    Args:
        tree: a pytree (e.g. ``dict[str, Tensor]``) of dense tensors; ``None`` leaves pass through.
        op: ``"mean"`` (floating and complex tensors) or ``"sum"``.
        group: the process group (default: the world).
        bucket_cap_mb: the bucket size limit (DDP's default 25).
        async_op: return a :class:`Pending` instead of the tree.
        check: verify the structure across ranks first.
    """
    where = "pfunc.distributed.all_reduce"
    g = resolve_group(group, where)
    leaves = flatten_tree(tree, where, "tree")
    check_op(op, leaves, where, "tree")
    check_devices(leaves, g, where, "tree")
    cap = cap_bytes(bucket_cap_mb, where)
    if check:
        check_structure(leaves, g, where, "tree")
    pending = Pending(where, g, leaves, plan_buckets(bucket_items(leaves.tensors), range(len(leaves.tensors)), cap), op)
    for k in range(pending.buckets):
        pending._pack(k)
        pending._launch(k)
    return pending if async_op else pending.wait()
