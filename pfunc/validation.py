"""What a call is given, checked before anything runs: trees of tensors with the right keys, types and shapes.

A wrong tree must fail at the door with a message that names the offending entry, not deep in
torch (or, worse, silently: a bias of the wrong shape broadcasts, a missing entry used to fall
back to the module's own tensor). Every check here reads its inputs and writes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["check_mapping", "check_keys", "check_tensors", "check_training"]

_HINT = " (build params and state with net.init())"


def check_mapping(what: str, tree: Any) -> None:
    """``tree`` is a mapping (a dict of tensors), or a ``TypeError`` naming ``what``."""
    if not isinstance(tree, Mapping):
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
    """Every value is a ``Tensor``; the first tree's tensors have ``shapes`` where given; no ``meta``
    tensor (no data) sits among real ones. Errors name the first offender, with both shapes."""
    meta: Optional[str] = None
    real = False
    first = True
    for what, tree in trees.items():
        for k, t in tree.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}['{k}'] is {type(t).__name__}, expected a Tensor")
            if first and shapes is not None:
                s = shapes.get(k)
                if s is not None and t.shape != s:
                    raise ValueError(_shape_message(what, k, t.shape, s))
            if t.is_meta:
                meta = meta or f"{what}['{k}']"
            else:
                real = True
        first = False
    if meta is not None and real:
        raise ValueError(f"{meta} is a meta tensor (a shape without data) among real tensors; give it a value")


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
