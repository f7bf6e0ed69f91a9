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

from .chain import seeded_global_rng
from .parametrize import Parametrized
from .tree import stack, tree_map, unstack
from .validation import check_mapping

__all__ = ["generators", "fresh_values", "init", "call", "check_stacked", "member", "stack", "unstack", "grad_and_value"]

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
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))  # a CUDA generator draws on CUDA
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
    factory: Optional[Callable[[], nn.Module]] = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stacked ``(params, state)`` of ``len(gens)`` members, member ``k`` initialised from ``gens[k]``
    alone: its module values by ``reinit(module, gens[k])`` (``None``: the module's
    current values for every member), then ``net.init(generator=gens[k])``.

    ``factory``, a function building the architecture anew (``lambda: MyNet(...)``), replaces
    ``reinit``: member ``k``'s values are the tensors of ``factory()`` built with the global RNG
    seeded from ``gens[k]``, so the architecture's own initialisation (kaiming fan-out, a ViT's
    truncated normal, ``nn.MultiheadAttention``'s ``_reset_parameters``, a constraint's
    ``sample()``) is drawn per member, reproducibly. Its tensors must have ``net.module``'s
    names and shapes.

    >>> import torch, pfunc as pf
    >>> net = pf.parametrize(torch.nn.Linear(4, 2), {})
    >>> p, s = init(net, generators(seed=0, n=3), factory=lambda: torch.nn.Linear(4, 2))
    >>> p["weight"].shape
    torch.Size([3, 2, 4])
    """
    if len(gens) == 0:
        raise ValueError("ensemble.init: gens is empty; pass one generator per member")
    if factory is not None and not callable(factory):
        raise TypeError(f"ensemble.init: factory must be a function returning an nn.Module, got {type(factory).__name__}")
    members = []
    for g in gens:
        if factory is not None:
            values = _factory_values(net, factory, g)
        else:
            values = reinit(net.module, g) if reinit is not None else None
        members.append(net.init(generator=g, values=values))
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in stack([p for p, _ in members]).items()}  # leaves, for torch.optim
    state = stack([s for _, s in members]) if members[0][1] else {}
    return params, state


def _factory_values(net: Parametrized, factory: Callable[[], nn.Module], generator: torch.Generator) -> dict[str, Tensor]:
    """The tensors of ``factory()`` built with the global RNG seeded from ``generator``, checked against ``net.module``."""
    with seeded_global_rng(generator, next(iter(net.module.parameters()), None)):
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"ensemble.init: factory() must return an nn.Module, got {type(model).__name__}")
    values = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    expected = {n: t for n, t in [*net.module.named_parameters(), *net.module.named_buffers()]}
    missing, extra = sorted(expected.keys() - values.keys()), sorted(values.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            f"ensemble.init: factory() built a {type(model).__name__} whose tensors differ from net.module's: "
            f"missing {missing}, unexpected {extra}"
        )
    return values


def call(
    net: Parametrized,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *args: Any,
    training: Optional[bool] = None,
    batched_args: bool = False,
    randomness: str = "error",
    **kwargs: Any,
) -> tuple[Any, dict[str, Tensor]]:
    """Every member's ``net(params_k, state_k, *args, training=..., **kwargs)`` in one ``torch.func.vmap``.

    ``args`` and ``kwargs`` are shared by all members unless ``batched_args`` (then each has a
    leading member dim). ``randomness`` is passed to ``vmap`` (``"different"`` for
    per-member dropout). Returns stacked ``(output, new_state)``. Params that are not
    stacked (one net's) are refused, naming the first tensor and both shapes.
    """
    check_stacked(net, params, state)

    def one(p, s, a, kw):
        return net(p, s, *a, training=training, **kw)

    dims = 0 if batched_args else None
    return torch.func.vmap(one, in_dims=(0, 0, dims, dims), randomness=randomness)(dict(params), dict(state), args, kwargs)


def check_stacked(net: Parametrized, params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> int:
    """The member count ``N`` of stacked ``(params, state)``: every tensor has the same leading dim
    ``N`` and params are ``N`` copies of ``net``'s shapes; else an error naming the first offender."""
    check_mapping("params", params)
    check_mapping("state", state)
    n = None
    for what, tree in (("params", params), ("state", state)):
        for k, t in tree.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}['{k}'] is {type(t).__name__}, expected a Tensor")
            want = net._shapes.get(k) if what == "params" else None
            if t.ndim == 0 or (want is not None and t.shape[1:] != want):
                expected = f"(N, {', '.join(map(str, want))})" if want is not None else "a leading member dim N"
                hint = " (one net's params? stack members with pf.ensemble.init or pf.ensemble.stack)" if want is not None and t.shape == want else ""
                raise ValueError(f"{what}['{k}'] has shape {tuple(t.shape)}, but stacked ensemble {what} need {expected}{hint}")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise ValueError(f"{what}['{k}'] stacks {t.shape[0]} members, but the trees before it stack {n}")
    if n is None:
        raise ValueError("ensemble: params and state are empty; nothing to stack members on")
    return n


def member(tree: Any, k: int) -> Any:
    """Member ``k`` of a stacked tree."""
    return tree_map(lambda t: t[k], tree)


def grad_and_value(
    fn: Callable[..., Any],
    argnums: Union[int, tuple[int, ...]] = 0,
    has_aux: bool = False,
    *,
    in_dims: Any = 0,
    randomness: str = "error",
) -> Callable[..., Any]:
    """Every member's ``(gradients, value)`` of the per-member loss ``fn`` over stacked trees:
    ``torch.func.vmap(torch.func.grad_and_value(fn, argnums, has_aux), in_dims, randomness=...)``,
    computed as one vmapped forward and one ``torch.autograd.grad`` of the summed member values.

    ``fn`` is written for one member, as for :func:`pfunc.grad_and_value`: it returns a scalar,
    or ``(scalar, aux)`` with ``has_aux``. ``in_dims`` and ``randomness`` are ``vmap``'s; every
    differentiated argument (``argnums``) must be stacked along dim 0 (``in_dims`` 0 there).
    Returns stacked ``(grads, values)``, or ``(grads, (values, aux))``: ``values`` is ``(N,)``,
    leaf ``k`` of ``grads`` and ``aux`` is member ``k``'s, equal (to rounding) to the vmapped
    ``torch.func`` route, which costs ``create_graph=True``'s time and memory. Inside a
    ``torch.func`` transform, and under ``torch.compile``, it is that route.

    Why the sum works: under ``vmap`` member ``k``'s value reads only member ``k``'s slice, so
    the gradient of the sum with respect to slice ``k`` is member ``k``'s own gradient. It is
    not valid when ``fn`` mixes members, which only happens outside ``vmap``'s view: ``fn``
    reading the stacked trees from a closure (or a shared argument it indexes by member), or
    statistics over the member dim computed outside ``fn``. Within ``fn`` (batch norm, dropout
    with ``randomness="different"``, spectral norm's power iteration) everything is per member.

    >>> import torch, pfunc as pf
    >>> from pfunc.parametrizations import SpectralNorm
    >>> net = pf.parametrize(torch.nn.Linear(4, 1), {"weight": SpectralNorm()})
    >>> params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3))
    >>> def loss(p, s, x, y):
    ...     out, s = net(p, s, x, training=True)
    ...     return (out - y).pow(2).mean(), s                     # state rides as aux
    >>> x, y = torch.randn(8, 4), torch.randn(3, 8, 1)            # shared inputs, per-member targets
    >>> step = pf.ensemble.grad_and_value(loss, has_aux=True, in_dims=(0, 0, None, 0))
    >>> grads, (losses, state) = step(params, state, x, y)
    >>> losses.shape, grads["parametrizations.weight.original"].shape
    (torch.Size([3]), torch.Size([3, 1, 4]))
    """
    from .grad import _check_argnums, _summed_member_route

    api = "pf.ensemble.grad_and_value(fn)(*args)"
    _check_argnums(api, argnums)

    def members_grad_and_value(*args: Any, **kwargs: Any) -> Any:
        return _summed_member_route(api, fn, argnums, has_aux, in_dims, randomness, args, kwargs)

    return members_grad_and_value
