"""Rank ``src``'s tree on every rank, bitwise, in byte buckets: :func:`broadcast`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .buckets import DEFAULT_BUCKET_CAP_MB, MB, cap_bytes, plan_buckets
from .process_group import resolve_group, run_collective
from .trees import Tree, check_devices, check_structure, flatten_tree

__all__ = ["broadcast"]


def _bytes_of(t: Tensor) -> Tensor:
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.contiguous().view(torch.uint8)


_ALIGN = 16  # every tensor starts 16-byte aligned in a byte bucket, so any dtype views back


def broadcast(
    tree: Tree,
    *,
    src: int = 0,
    group: Optional[dist.ProcessGroup] = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    check: bool = True,
) -> Tree:
    """Rank ``src``'s tree on every rank, as new tensors (``tree`` itself is never written).

    Bitwise: every leaf's bytes travel in byte buckets of at most ``bucket_cap_mb`` MB per
    device, whatever its dtype. Each output has its own storage and keeps its input's
    ``requires_grad`` (so broadcast params stay leaves for ``torch.optim``). Use it for the
    initial ``params`` and ``state`` and, by DDP's rule, for module buffers. ``check`` (on by
    default; this is a start-of-run call) first verifies that every rank's tree has the same
    keys, shapes and dtypes, since the other ranks' tensors are the receive buffers' template.

    Args:
        tree: a pytree of dense tensors.
        src: the rank (within ``group``) whose values everyone gets.
        group, bucket_cap_mb, check: as for :func:`all_reduce`.
    """
    where = "pfunc.distributed.broadcast"
    g = resolve_group(group, where)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < g.size:
        raise ValueError(f"{where}: src must be a rank in [0, {g.size}), got {src!r}")
    leaves = flatten_tree(tree, where, "tree")
    check_devices(leaves, g, where, "tree")
    cap = cap_bytes(bucket_cap_mb, where)
    if check:
        check_structure(leaves, g, where, "tree")
    global_src = src if g.pg is None else dist.get_global_rank(g.pg, src)
    tensors = leaves.tensors
    # every leaf as padded bytes: one stream of byte buckets per device, whatever the dtypes
    items = [(t.device, torch.uint8, _padded(t.numel() * t.element_size()), 1) for t in tensors]
    out: list[Optional[Tensor]] = [None] * len(tensors)
    for k, b in enumerate(plan_buckets(items, range(len(tensors)), cap)):
        if g.rank == src:
            flat = torch.zeros(b.numel, dtype=torch.uint8, device=b.device)
            offset = 0
            for i, n in zip(b.members, b.numels):
                raw = _bytes_of(tensors[i])
                flat[offset : offset + raw.numel()].copy_(raw)
                offset += n
        else:
            flat = torch.empty(b.numel, dtype=torch.uint8, device=b.device)
        what = f"the broadcast of bucket {k + 1} ({b.nbytes / MB:.2f} MB on {b.device})"
        run_collective(where, what, g, dist.broadcast, flat, global_src, group=g.pg)
        offset = 0
        for i, n in zip(b.members, b.numels):
            t = tensors[i]
            size = t.numel() * t.element_size()
            value = flat[offset : offset + size].clone()
            value = (value.view(torch.bool) if t.dtype == torch.bool else value.view(t.dtype)).view(t.shape)
            out[i] = value.requires_grad_(t.requires_grad)
            offset += n
    return leaves.unflatten(out)


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN
