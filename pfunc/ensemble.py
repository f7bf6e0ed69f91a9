"""Ensembles: N independently initialised members as one stacked ``(params, state)``, run under ``vmap``.

Every leaf of a stacked tree has a leading member dim ``N``. Forward, ``torch.func.grad``
and training-mode spectral norm all run as one vmapped call, and member ``k`` of the
result equals running member ``k`` alone.

>>> import torch, pfunc as pf
>>> from pfunc.parametrizations import SpectralNorm
>>> net = pf.parametrize(torch.nn.Linear(4, 2), {"weight": SpectralNorm()})
>>> params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3))
>>> params["parametrizations.weight.original"].shape
torch.Size([3, 2, 4])
>>> out, state = pf.ensemble.call(net, params, state, torch.randn(5, 4), training=True)
>>> out.shape
torch.Size([3, 5, 2])
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .parametrize import Parametrized
from .tree import stack, tree_map, unstack

__all__ = ["generators", "fresh_values", "init", "call", "member", "stack", "unstack"]

Reinit = Callable[[nn.Module, torch.Generator], Mapping[str, Tensor]]


def generators(seed: int, n: int, device: Union[str, torch.device] = "cpu") -> list[torch.Generator]:
    """``n`` generators seeded ``seed, seed + 1, ...``: one per member, reproducible alone."""
    if n <= 0:
        raise ValueError(f"generators: n must be positive, got {n}")
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def fresh_values(module: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """New initial values of every tensor of ``module``, as its layers' ``reset_parameters``
    would draw them, seeded from ``generator`` (the module itself is not touched).

    Tensors of layers without ``reset_parameters`` keep the module's current values.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    twin = copy.deepcopy(module)
    devices = sorted({t.device for t in twin.parameters() if t.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=[d.index or 0 for d in devices]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for m in twin.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
    values = {n: t.detach() for n, t in twin.named_parameters()}
    values.update({n: t.detach() for n, t in twin.named_buffers()})
    return values


def init(
    net: Parametrized,
    gens: Sequence[torch.Generator],
    *,
    reinit: Optional[Reinit] = fresh_values,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stacked ``(params, state)`` of ``len(gens)`` members, member ``k`` initialised from ``gens[k]``
    alone: its module values by ``reinit(module, gens[k])`` (``None``: the module's
    current values for every member), then ``net.init(generator=gens[k])``.
    """
    if len(gens) == 0:
        raise ValueError("ensemble.init: gens is empty; pass one generator per member")
    members = []
    for g in gens:
        values = reinit(net.module, g) if reinit is not None else None
        members.append(net.init(generator=g, values=values))
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in stack([p for p, _ in members]).items()}  # leaves, for torch.optim
    state = stack([s for _, s in members]) if members[0][1] else {}
    return params, state


def call(
    net: Parametrized,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *args: Any,
    training: Optional[bool] = None,
    batched_args: bool = False,
    randomness: str = "error",
) -> tuple[Any, dict[str, Tensor]]:
    """Every member's ``net(params_k, state_k, *args, training=...)`` in one ``torch.func.vmap``.

    ``args`` are shared by all members unless ``batched_args`` (then each has a
    leading member dim). ``randomness`` is passed to ``vmap`` (``"different"`` for
    per-member dropout). Returns stacked ``(output, new_state)``.
    """

    def one(p, s, *a):
        return net(p, s, *a, training=training)

    arg_dims = tuple(0 if batched_args else None for _ in args)
    return torch.func.vmap(one, in_dims=(0, 0, *arg_dims), randomness=randomness)(dict(params), dict(state), *args)


def member(tree: Any, k: int) -> Any:
    """Member ``k`` of a stacked tree."""
    return tree_map(lambda t: t[k], tree)
