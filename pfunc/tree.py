"""Parameter pytrees: torch's key layout, stacking for ensembles, moving between devices.

``params`` and ``state`` are plain ``dict[str, Tensor]`` keyed exactly as the
``state_dict`` of the ``torch.nn.utils.parametrize``'d twin of the module, so a
parametrized ``"0.weight"`` is stored as ``"0.parametrizations.weight.original"``
and the first parametrization's spectral-norm vector as
``"0.parametrizations.weight.0._u"``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import optree
import torch
from torch import Tensor

__all__ = [
    "chain_prefix",
    "original_key",
    "step_key",
    "stack",
    "unstack",
    "tree_map",
    "to",
    "merge",
    "pick",
    "pick_steps",
]

Tree = Any


def chain_prefix(name: str) -> str:
    """``"a.b.weight" -> "a.b.parametrizations.weight"``: where a tensor's chain keeps its tensors."""
    owner, _, leaf = name.rpartition(".")
    return f"{owner}.parametrizations.{leaf}" if owner else f"parametrizations.{leaf}"


def original_key(name: str, original: str) -> str:
    """Key of one original (``"original"`` or ``"original0"``...) of tensor ``name``."""
    return f"{chain_prefix(name)}.{original}"


def step_key(name: str, index: int, local: str) -> str:
    """Key of tensor ``local`` owned by the ``index``-th parametrization of tensor ``name``."""
    return f"{chain_prefix(name)}.{index}.{local}"


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """``optree.tree_map`` over tensors (``None`` stays a leaf-less node)."""
    return optree.tree_map(fn, tree, *rest, namespace="torch")


def stack(trees: Sequence[Tree]) -> Tree:
    """One tree whose every leaf is ``torch.stack`` of the matching leaves (a new leading dim).

    >>> stack([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"].shape
    torch.Size([2, 2])
    """
    if not trees:
        raise ValueError("stack: trees is empty; need at least one tree to stack")
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees, namespace="torch")


def unstack(tree: Tree) -> list[Tree]:
    """Inverse of :func:`stack`: the list of trees along the leading dim of every leaf."""
    leaves, spec = optree.tree_flatten(tree, namespace="torch")
    if not leaves:
        return []
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != n:
            raise ValueError(f"unstack: every leaf needs the same leading dim {n}; got shape {tuple(leaf.shape)}")
    return [optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(n)]


def to(tree: Tree, *args: Any, **kwargs: Any) -> Tree:
    """``Tensor.to(*args, **kwargs)`` on every leaf (device and/or dtype moves of params and state)."""
    return optree.tree_map(lambda t: t.to(*args, **kwargs), tree, namespace="torch")


def merge(params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` and ``state`` as one ``state_dict``-shaped mapping (detached)."""
    overlap = params.keys() & state.keys()
    if overlap:
        raise ValueError(f"merge: keys in both params and state: {sorted(overlap)}")
    return {k: v.detach() for k, v in {**params, **state}.items()}


def pick(tree: Mapping[str, Tensor], keys: Sequence[str]) -> list[Tensor]:
    """``[tree[k] for k in keys]``, as a function: torch 2.4's dynamo fails on comprehensions
    that close over a loop variable."""
    return [tree[k] for k in keys]


def pick_steps(tree: Mapping[str, Tensor], steps: Sequence[Sequence[tuple[str, str]]]) -> list[dict[str, Tensor]]:
    """Per chain step, ``{local name: tree[global key]}`` (``steps`` as ``(local, global)`` pairs)."""
    return [{local: tree[key] for local, key in keys} for keys in steps]
