"""A tree's tensors in an order every rank agrees on, and the cross-rank structure check.

:func:`flatten_tree` lists a pytree's tensors by key path (refusing what no collective can move:
non-tensors, sparse, meta and DTensor leaves); :func:`check_structure` all-gathers a hash of the
keys, shapes, dtypes and device types and, when ranks differ, raises the same ``ValueError``
naming the first difference on every rank, instead of a hang or a reduction of garbage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from .process_group import Group, run_collective

__all__ = ["Tree", "Leaves", "flatten_tree", "check_devices", "signature", "digest", "all_gather_rows", "check_structure", "first_difference"]

Tree = Any


def _path(path: Sequence[Any]) -> str:
    if not path:
        return "<root>"
    return ".".join(str(p) for p in path)


@dataclass(frozen=True)
class Leaves:
    """A tree's tensors in the order of their key paths (so every rank agrees on it, whatever
    dict order optree uses in this process: importing ``torch.utils._cxx_pytree``, as dynamo
    does, switches the "torch" namespace to insertion order for good)."""

    tensors: list[Tensor]
    names: list[str]
    spec: Any  # optree PyTreeSpec
    positions: list[int]  # positions[i]: where tensors[i] sits in the spec's flattening order

    def unflatten(self, values: list[Any]) -> Any:
        """The tree with ``values[i]`` in place of ``tensors[i]``."""
        leaves: list[Any] = [None] * len(values)
        for i, v in zip(self.positions, values):
            leaves[i] = v
        return optree.tree_unflatten(self.spec, leaves)


def flatten_tree(tree: Tree, where: str, argname: str) -> Leaves:
    """``tree``'s tensors as :class:`Leaves` in key-path order; ``TypeError``/``ValueError`` naming ``argname[key]`` for a leaf no collective can move."""
    paths, leaves, spec = optree.tree_flatten_with_path(tree, namespace="torch")
    names = [_path(p) for p in paths]
    dtensor = _dtensor_type()
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{where}: {argname}['{name}'] is a {type(leaf).__name__}, not a Tensor; every leaf must be a tensor")
        if dtensor is not None and isinstance(leaf, dtensor):
            raise TypeError(
                f"{where}: {argname}['{name}'] is a DTensor; reduce sharded tensors with their own placements "
                "(redistribute / FSDP2), not by packing their local shards"
            )
        if leaf.layout != torch.strided:
            raise TypeError(f"{where}: {argname}['{name}'] has layout {leaf.layout}; only dense (strided) tensors are supported")
        if leaf.device.type == "meta":
            raise ValueError(f"{where}: {argname}['{name}'] is on the meta device and has no values to communicate")
    order = sorted(range(len(names)), key=names.__getitem__)
    return Leaves([leaves[i] for i in order], [names[i] for i in order], spec, order)


def _dtensor_type() -> Optional[type]:
    try:  # public since torch 2.5; torch 2.4 has it under torch.distributed._tensor
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def check_devices(leaves: Leaves, g: Group, where: str, argname: str) -> None:
    """``ValueError`` naming the first tensor on a device the group's backend cannot move."""
    if g.device_types is None:
        return
    for name, t in zip(leaves.names, leaves.tensors):
        if t.device.type not in g.device_types:
            backend = dist.get_backend(g.pg)
            raise ValueError(
                f"{where}: {argname}['{name}'] is on {t.device}, which the '{backend}' backend of the process "
                f"group cannot move (it handles {sorted(g.device_types)}); move the tree first, e.g. "
                "pf.tree.to(tree, device)"
            )


def signature(leaves: Leaves) -> list[tuple[str, tuple[int, ...], str, str]]:
    """``[(key, shape, dtype, device type)]`` of every tensor: what must agree across ranks."""
    return [(n, tuple(t.shape), str(t.dtype).replace("torch.", ""), t.device.type) for n, t in zip(leaves.names, leaves.tensors)]


def digest(obj: Any) -> int:
    """A 63-bit hash of ``repr(obj)``, identical in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little") >> 1


def all_gather_rows(row: Tensor, g: Group, where: str, what: str) -> list[Tensor]:
    """Every rank's ``row`` (a small tensor), on the CPU, in rank order."""
    row = row.to(g.gather_device(where))
    out = [torch.empty_like(row) for _ in range(g.size)]
    run_collective(where, what, g, dist.all_gather, out, row, group=g.pg)
    return [t.cpu() for t in out]


def check_structure(leaves: Leaves, g: Group, where: str, argname: str, plan: Any = None) -> bool:
    """Raise ValueError on every rank unless every rank has the same keys, shapes, dtypes and
    device types. With ``plan``, also compare it: ``True`` when every rank has the same plan."""
    keys = signature(leaves)
    mine = torch.tensor([digest(keys), digest(plan)], dtype=torch.int64)
    rows = all_gather_rows(mine, g, where, "the structure check (an all-gather)")
    if len({int(r[0]) for r in rows}) != 1:
        everyone: list[Any] = [None] * g.size
        run_collective(where, "the structure check (an all-gather)", g, dist.all_gather_object, everyone, keys, group=g.pg)
        raise ValueError(f"{where}: {argname} differs across ranks: {first_difference(everyone)}")
    return len({int(r[1]) for r in rows}) == 1


def first_difference(signatures: list[Any]) -> str:
    sig0 = signatures[0]
    entries0 = {name: rest for name, *rest in sig0}
    for rank, sig in enumerate(signatures[1:], start=1):
        entries = {name: rest for name, *rest in sig}
        for name, *rest in sig0:
            if name not in entries:
                return f"key '{name}' is on rank 0 but not on rank {rank}"
            if entries[name] != rest:
                (s0, d0, v0), (s1, d1, v1) = rest, entries[name]
                return f"key '{name}' is {_describe(s0, d0, v0)} on rank 0 but {_describe(s1, d1, v1)} on rank {rank}"
        for name, *_ in sig:
            if name not in entries0:
                return f"key '{name}' is on rank {rank} but not on rank 0"
    return "the structure signatures differ"  # unreachable


def _describe(shape: tuple[int, ...], dtype: str, device: str) -> str:
    return f"{tuple(shape)} {dtype} on {device}"
