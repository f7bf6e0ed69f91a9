"""What a call is given, checked before anything runs: trees of tensors with the right keys, types and shapes.

A wrong tree must fail at the door with a message that names the offending entry, not deep in
torch (or, worse, silently: a bias of the wrong shape broadcasts, a missing entry used to fall
back to the module's own tensor). Every check here reads its inputs and writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["check_mapping", "check_keys", "check_tensors", "check_training"]

_HINT = " (build params and state with net.init())"


def check_mapping(what: str, tree: Any) -> None:
    """``tree`` is a mapping (a dict of tensors), or a ``TypeError`` naming ``what``."""
    if type(tree) is not dict and not isinstance(tree, Mapping):
        raise TypeError(
            f"{what} must be a dict of tensors keyed like the module's state_dict, got {type(tree).__name__}" + _HINT
        )


def check_keys(trees: Mapping[str, tuple[Mapping[str, Any], frozenset]], hint: str = _HINT) -> None:
    """Each ``(tree, expected keys)`` has exactly those keys; else a ``KeyError`` naming every missing and unexpected one."""
    problems = []
    for what, (tree, keys) in trees.items():
        missing = sorted(keys - tree.keys())
        extra = sorted(tree.keys() - keys)
        if missing:
            problems.append(f"{what} is missing {missing}")
        if extra:
            problems.append(f"{what} has unexpected {extra}")
    if problems:
        raise KeyError("; ".join(problems) + hint)


def check_tensors(
    trees: Mapping[str, Mapping[str, Any]],
    shapes: Optional[Mapping[str, torch.Size]] = None,
) -> None:
    """Every value of every tree is a ``Tensor``; the first tree's tensors have ``shapes`` where
    given; no ``meta`` tensor (a shape without data) sits among real ones, where torch would
    silently compute with uninitialised memory (``F.linear(x, meta_weight)`` returns a CPU tensor).
    Errors name the first offender, with both shapes for a shape."""
    meta = False
    for what, tree in trees.items():
        for k, t in tree.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}['{k}'] is {type(t).__name__}, expected a Tensor")
            meta = meta or t.is_meta
    if shapes:
        what, first = next(iter(trees.items()))
        for k, s in shapes.items():
            t = first.get(k)
            if t is not None and t.shape != s:
                raise ValueError(_shape_message(what, k, t.shape, s))
    if meta:
        offenders = [f"{what}['{k}']" for what, tree in trees.items() for k, t in tree.items() if t.is_meta]
        if len(offenders) < sum(len(tree) for tree in trees.values()):
            raise ValueError(f"{offenders[0]} is a meta tensor (a shape without data) among real tensors; give it a value")


def _shape_message(what: str, key: str, got: torch.Size, want: torch.Size) -> str:
    message = f"{what}['{key}'] has shape {tuple(got)}, but the net expects {tuple(want)}"
    if len(got) == len(want) + 1 and got[1:] == want:
        message += f" (a leading dim of {got[0]}: ensemble-stacked params given to a single net? use pf.ensemble.call)"
    elif len(want) == len(got) + 1 and want[1:] == got:
        message += " (one dim short: single-net params where stacked ensemble params were expected?)"
    return message


def check_training(training: Any) -> Optional[bool]:
    """``training`` itself if it is ``True``, ``False`` or ``None``; else a ``TypeError`` naming it."""
    if training is None or training is True or training is False:
        return training
    raise TypeError(
        f"training must be True, False or None (keep each layer's own mode), got {training!r} "
        f"of type {type(training).__name__}"
    )
