"""Flat buckets: which tensors travel together in one collective.

Leaves are grouped per (device, dtype) and filled in a given order, a bucket closing when
the next tensor would overflow the cap (DDP's ``bucket_cap_mb``); :func:`bucket_plan` shows the
plan :func:`~pfunc.distributed.all_reduce` would use, without communicating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .trees import Tree, flatten_tree

__all__ = ["DEFAULT_BUCKET_CAP_MB", "MB", "Bucket", "cap_bytes", "plan_buckets", "bucket_items", "bucket_plan"]

#: DDP's default bucket size (``bucket_cap_mb=25``).
DEFAULT_BUCKET_CAP_MB = 25.0
"""Largest bucket, in MiB, a tree is packed into for one collective: DDP's default ``bucket_cap_mb``."""
MB = 1024 * 1024


@dataclass
class Bucket:
    """Leaves that travel in one flat tensor: their indices, sizes, and the bucket's device, dtype and bytes."""

    device: torch.device
    dtype: torch.dtype
    members: list[int]  # leaf indices, in bucket order
    numels: list[int]
    nbytes: int

    @property
    def numel(self) -> int:
        return sum(self.numels)


def cap_bytes(bucket_cap_mb: Any, where: str) -> int:
    """``bucket_cap_mb`` in bytes (at least 1); ``TypeError``/``ValueError`` naming it when it is not a positive finite number."""
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(f"{where}: bucket_cap_mb must be a number of MB, got {type(bucket_cap_mb).__name__}")
    if not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0:
        raise ValueError(f"{where}: bucket_cap_mb must be positive and finite, got {bucket_cap_mb}")
    return max(1, int(bucket_cap_mb * MB))


def plan_buckets(items: Sequence[tuple[torch.device, torch.dtype, int, int]], order: Sequence[int], cap: int) -> list[Bucket]:
    """Buckets of at most ``cap`` bytes over ``items`` = ``(device, dtype, numel, element size)``
    (one item larger than ``cap`` gets a bucket of its own), one stream per (device, dtype),
    filled in ``order``. Buckets are listed by when their last member comes in ``order``: the
    order they complete, so the launch order, when leaves arrive in ``order``."""
    open_: dict[tuple[torch.device, torch.dtype], Bucket] = {}
    buckets: list[Bucket] = []
    rank_in_order = {i: r for r, i in enumerate(order)}
    for i in order:
        device, dtype, numel, itemsize = items[i]
        size = numel * itemsize
        b = open_.get((device, dtype))
        if b is not None and b.nbytes + size > cap:
            buckets.append(b)
            b = None
        if b is None:
            b = open_[(device, dtype)] = Bucket(device, dtype, [], [], 0)
        b.members.append(i)
        b.numels.append(numel)
        b.nbytes += size
    buckets.extend(open_.values())
    return sorted(buckets, key=lambda b: rank_in_order[b.members[-1]])


def bucket_items(tensors: Sequence[Tensor]) -> list[tuple[torch.device, torch.dtype, int, int]]:
    """``(device, dtype, numel, element size)`` of each tensor: the input of :func:`plan_buckets`."""
    return [(t.device, t.dtype, t.numel(), t.element_size()) for t in tensors]


def bucket_plan(tree: Tree, *, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> list[list[str]]:
    """The keys of each bucket :func:`all_reduce` would send, in launch order (no communication).

    Buckets are filled in the order of the tensors' key paths (a dict's keys sorted), one
    stream per (device, dtype), closing a bucket when the next tensor would overflow the cap,
    and go in the order they complete (by their last key):

    >>> import torch
    >>> bucket_plan({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.float64), "c": torch.zeros(1)})
    [['b'], ['a', 'c']]
    """
    where = "pfunc.distributed.bucket_plan"
    leaves = flatten_tree(tree, where, "tree")
    buckets = plan_buckets(bucket_items(leaves.tensors), range(len(leaves.tensors)), cap_bytes(bucket_cap_mb, where))
    return [[leaves.names[i] for i in b.members] for b in buckets]
