"""Do all ranks hold the same tree? :func:`check_same_structure` (keys, shapes, dtypes) and
:func:`check_identical` (values, bitwise, by a fingerprint computed where each tensor lives)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .process_group import resolve_group
from .trees import Tree, all_gather_rows, check_structure, flatten_tree

__all__ = ["check_same_structure", "check_identical", "fingerprint"]


def check_same_structure(tree: Tree, *, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks' trees have the same keys, shapes,
    dtypes and device types (the first difference is named). One tiny all-gather."""
    where = "pfunc.distributed.check_same_structure"
    g = resolve_group(group, where)
    check_structure(flatten_tree(tree, where, "tree"), g, where, "tree")


_PRIME = 2**31 - 1
_ROW = 64


def fingerprint(t: Tensor) -> Tensor:
    """Four int64 numbers computed from ``t``'s bytes, where ``t`` lives: bitwise-equal tensors
    agree; changing any element, or swapping two unequal ones, changes them.

    The bytes are read as int32 words (no copy for a contiguous tensor whose size allows it)
    laid out as rows of 64. Integer addition wraps, so the column and row sums (int32, mod
    2**32) come out the same in any summation order and run at memory speed; the 64 column
    sums and the row sums are then combined exactly in int64, weighted by position mod
    2**31 - 1. Result: the sum, the column-weighted sum, the row-weighted sum, the word count."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    size = flat.element_size()
    if size >= 4 or ((flat.numel() * size) % 4 == 0 and (flat.storage_offset() * size) % 4 == 0):
        words = flat.view(torch.int32)
    else:  # odd-sized half / byte tensors: widen each element (a copy)
        words = flat.view(torch.int16 if size == 2 else torch.uint8).to(torch.int32)
    n = words.numel()
    m = n // _ROW
    body, tail = words[: m * _ROW].view(m, _ROW), words[m * _ROW :].to(torch.int64)
    col_w = torch.arange(1, _ROW + 1, device=words.device, dtype=torch.int64)
    row_w = torch.arange(1, m + 1, device=words.device, dtype=torch.int64) % _PRIME
    cols = body.sum(0, dtype=torch.int32).to(torch.int64)
    rows = body.sum(1, dtype=torch.int32).to(torch.int64)
    total = cols.sum() + tail.sum()
    by_col = ((cols % _PRIME) * col_w).sum() + ((tail % _PRIME) * col_w[: tail.numel()]).sum()
    by_row = (((rows % _PRIME) * row_w) % _PRIME).sum() + (tail.sum() % _PRIME) * (m + 1)
    return torch.stack([total, by_col, by_row, torch.tensor(n, device=words.device)])


def check_identical(tree: Tree, *, group: Optional[dist.ProcessGroup] = None, what: str = "tree") -> None:
    """Raise ``ValueError`` on every rank unless every rank holds a bitwise-identical ``tree``.

    The structure is checked first; then each tensor's fingerprint (four int64 sums of its
    bytes, computed where the tensor lives) is all-gathered, and the error names the first
    key whose fingerprint differs and the ranks that disagree with rank 0. Costs one pass
    over the values and two small all-gathers: cheap next to a broadcast, so use it at start
    and after resume, or every N steps to catch silent divergence. ``what`` names the tree
    in the message (``"params"``).
    """
    where = "pfunc.distributed.check_identical"
    g = resolve_group(group, where)
    leaves = flatten_tree(tree, where, what)
    check_structure(leaves, g, where, what)
    if not leaves.tensors:
        return
    mine = torch.stack([fingerprint(t).cpu() for t in leaves.tensors])
    rows = all_gather_rows(mine, g, where, "the fingerprint all-gather")
    for i, name in enumerate(leaves.names):
        differing = [r for r in range(1, g.size) if not torch.equal(rows[r][i], rows[0][i])]
        if differing:
            n_bad = sum(any(not torch.equal(rows[r][j], rows[0][j]) for r in range(g.size)) for j in range(len(leaves.names)))
            ranks = ", ".join(str(r) for r in differing)
            raise ValueError(
                f"{where}: {what}['{name}'] differs between rank 0 and rank {ranks} "
                f"({n_bad} of {len(leaves.names)} tensors differ; broadcast from rank 0 to make them agree)"
            )
