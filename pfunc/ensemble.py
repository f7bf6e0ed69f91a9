"""Ensembles: N independently initialised members as one stacked ``(params, state)``, run under ``vmap``.

Every stacked leaf has a leading member dim ``N``. Forward, ``torch.func.grad``
and training-mode spectral norm all run as one vmapped call, and member ``k`` of the
result equals running member ``k`` alone.

``in_dims`` says, entry by entry, what is stacked and what is shared, in one vocabulary for
:func:`init`, :func:`call` and :func:`grad_and_value` (``torch.func.vmap``'s): ``0`` stacks an entry
(one slice per member), ``None`` shares it (one tensor, every member reads it: a frozen base weight
under N adapters, integer stride and padding buffers); for ``params`` and ``state`` give ``0``, ``None``
or a dict naming some entries (the entries it does not name are stacked). Gradients are only for what
is stacked.

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
TreeDims = Union[int, None, Mapping[str, Optional[int]]]
"""One tree's ``in_dims``: ``0`` (every entry stacked), ``None`` (every entry shared) or
``{key: 0 | None}`` for some entries (the others stacked)."""


def _tree_dims(api: str, what: str, tree: Mapping[str, Any], dims: Any) -> dict[str, Optional[int]]:
    """``dims`` for ``tree`` as ``{key: 0 | None}`` for every key, or an error naming the bad entry."""
    if dims is None or (type(dims) is int and dims == 0):
        return dict.fromkeys(tree, dims)
    if not isinstance(dims, Mapping):
        raise ValueError(f"{api}: in_dims for {what} must be 0 (stacked), None (shared) or a dict of them by key, got {dims!r}")
    unknown = sorted(set(dims) - set(tree))
    if unknown:
        raise ValueError(f"{api}: in_dims for {what} names keys {what} does not have: {unknown}")
    out: dict[str, Optional[int]] = {}
    for k in tree:
        d = dims.get(k, 0)
        if not (d is None or (type(d) is int and d == 0)):
            raise ValueError(f"{api}: in_dims for {what}['{k}'] must be 0 (stacked) or None (shared), got {d!r}")
        out[k] = d
    return out


def _pick(tree: Mapping[str, Any], dims: Mapping[str, Optional[int]], dim: Optional[int]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if dims[k] == dim}


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
    in_dims: tuple[TreeDims, TreeDims] = (0, 0),
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stacked ``(params, state)`` of ``len(gens)`` members, member ``k`` initialised from ``gens[k]``
    alone: its module values by ``reinit(module, gens[k])`` (``None``: the module's
    current values for every member), then ``net.init(generator=gens[k])``.

    ``in_dims = (params_dims, state_dims)`` (see the module docstring): an entry given ``None`` is
    shared, held once, without the member dim, with the first member's value (``gens[0]``'s; with
    ``reinit=None`` every member starts from the module's own, e.g. a pretrained base weight).

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
    if not (isinstance(in_dims, tuple) and len(in_dims) == 2):
        raise ValueError(f"ensemble.init: in_dims must be (params_dims, state_dims), got {in_dims!r}")
    if factory is not None and not callable(factory):
        raise TypeError(f"ensemble.init: factory must be a function returning an nn.Module, got {type(factory).__name__}")
    members = []
    for g in gens:
        if factory is not None:
            values = _factory_values(net, factory, g)
        else:
            values = reinit(net.module, g) if reinit is not None else None
        members.append(net.init(generator=g, values=values))
    p_dims = _tree_dims("ensemble.init", "params", members[0][0], in_dims[0])
    s_dims = _tree_dims("ensemble.init", "state", members[0][1], in_dims[1])
    params = _stack_members([p for p, _ in members], p_dims)
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}  # leaves, for torch.optim
    return params, _stack_members([s for _, s in members], s_dims)


def _stack_members(trees: Sequence[Mapping[str, Tensor]], dims: Mapping[str, Optional[int]]) -> dict[str, Tensor]:
    """Every entry stacked over the members, or (``None``) the first member's."""
    return {k: (torch.stack([t[k] for t in trees]) if dims[k] == 0 else trees[0][k]) for k in trees[0]}


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
    in_dims: tuple[Any, ...] = (0, 0),
    batched_args: bool = False,
    randomness: str = "error",
    **kwargs: Any,
) -> tuple[Any, dict[str, Tensor]]:
    """Every member's ``net(params_k, state_k, *args, training=..., **kwargs)`` in one ``torch.func.vmap``.

    ``in_dims = (params_dims, state_dims, *args_dims)``: ``params_dims`` and ``state_dims`` as in the
    module docstring (``0``, ``None`` or a dict by key); ``args_dims``, one per positional arg as
    ``vmap``'s (``0``: a leading member dim, ``None``: shared), all shared when left out. ``kwargs``
    are shared; ``batched_args=True`` is short for "every arg and kwarg has a leading member dim".
    ``randomness`` is passed to ``vmap`` (``"different"`` for per-member dropout). Returns
    ``(output, new_state)``, stacked where the inputs are; a shared state entry comes back shared
    (a call that changes it differently per member is an error naming it: stack it). Params that are
    not stacked (one net's), and entries stacking different member counts, are refused naming the
    first offender.

    >>> import torch, pfunc as pf
    >>> net = pf.parametrize(torch.nn.Linear(4, 2), {})
    >>> params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3), in_dims=({"bias": None}, 0))
    >>> params["weight"].shape, params["bias"].shape                  # bias: one, shared by all members
    (torch.Size([3, 2, 4]), torch.Size([2]))
    >>> out, _ = pf.ensemble.call(net, params, state, torch.randn(3, 5, 4), in_dims=({"bias": None}, 0, 0))
    >>> out.shape
    torch.Size([3, 5, 2])
    """
    api = "pf.ensemble.call"
    if not isinstance(in_dims, tuple) or len(in_dims) < 2:
        raise ValueError(f"{api}: in_dims must be (params_dims, state_dims, *args_dims), got {in_dims!r}")
    if batched_args and len(in_dims) > 2:
        raise ValueError(f"{api}: give in_dims for the args, or batched_args=True, not both")
    if len(in_dims) > 2 and len(in_dims) != 2 + len(args):
        raise ValueError(f"{api}: in_dims has {len(in_dims) - 2} entries for the {len(args)} positional args (after params and state)")
    p_dims = _tree_dims(api, "params", params, in_dims[0]) if isinstance(params, Mapping) else in_dims[0]
    s_dims = _tree_dims(api, "state", state, in_dims[1]) if isinstance(state, Mapping) else in_dims[1]
    n = check_stacked(net, params, state, in_dims=(p_dims, s_dims))
    arg_dims = tuple(in_dims[2:]) if len(in_dims) > 2 else ((0 if batched_args else None),) * len(args)
    _check_member_counts(api, [f"args[{i}]" for i in range(len(args))], args, arg_dims, n)
    kw_dims = 0 if batched_args else None
    if batched_args:
        _check_member_counts(api, [f"kwargs['{k}']" for k in kwargs], tuple(kwargs.values()), (0,) * len(kwargs), n)

    def one(p, s, a, kw):
        return net(p, s, *a, training=training, **kw)

    out, new_state = torch.func.vmap(one, in_dims=(p_dims, s_dims, arg_dims, kw_dims), randomness=randomness)(
        dict(params), dict(state), args, kwargs
    )
    return out, _shared_state_back(api, new_state, s_dims, n)


def _shared_state_back(api: str, new_state: dict[str, Tensor], s_dims: Mapping[str, Optional[int]], n: int) -> dict[str, Tensor]:
    """``new_state`` with every shared entry without its member dim. ``vmap`` returns an entry no
    member changed as the input expanded (member stride 0); one with a real member dim was changed
    per member, which a shared entry cannot hold."""
    for k, d in s_dims.items():
        if d is None and k in new_state:
            t = new_state[k]
            if n == 1 or t.stride(0) == 0:
                base = t._base
                new_state[k] = base if base is not None and base.shape == t.shape[1:] and t.stride(0) == 0 else t[0]
            else:
                raise ValueError(
                    f"{api}: state['{k}'] is shared (in_dims None), but the call changed it differently per member; "
                    "stack it (in_dims 0) to keep one per member"
                )
    return new_state


def _check_member_counts(api: str, names: Sequence[str], trees: Sequence[Any], dims: Sequence[Any], n: Optional[int]) -> Optional[int]:
    """Every tensor of ``trees[i]`` stacked along ``dims[i]`` (an int: all its tensors; a dict: per key)
    has the same member count (``n`` if given), else an error naming the first that differs."""
    first = None if n is None else ("params and state", n)
    for name, tree, d in zip(names, trees, dims):
        if d is None:
            continue
        if isinstance(tree, Mapping) and (isinstance(d, Mapping) or type(d) is int):
            items = [(f"{name}['{k}']", tree[k], d.get(k, 0) if isinstance(d, Mapping) else d) for k in tree]
        elif type(d) is int:
            leaves, _ = torch.utils._pytree.tree_flatten(tree)
            items = [(name, t, d) for t in leaves]
        else:
            continue  # a nested in_dims tree: vmap checks it
        for where, t, dim in items:
            if dim is None or not isinstance(t, Tensor):
                continue
            if t.ndim <= dim:
                raise ValueError(f"{api}: {where} has shape {tuple(t.shape)}, with no dim {dim} to stack members on")
            if first is None:
                first = (where, t.shape[dim])
            elif t.shape[dim] != first[1]:
                raise ValueError(f"{api}: {where} stacks {t.shape[dim]} members (dim {dim}), but {first[0]} stacks {first[1]}")
    return None if first is None else first[1]


def check_stacked(
    net: Parametrized,
    params: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *,
    in_dims: tuple[TreeDims, TreeDims] = (0, 0),
) -> int:
    """The member count ``N`` of stacked ``(params, state)``: every stacked tensor (``in_dims``, as
    for :func:`init`) has the same leading dim ``N`` and stacked params are ``N`` copies of ``net``'s
    shapes, shared ones ``net``'s shapes; else an error naming the first offender."""
    check_mapping("params", params)
    check_mapping("state", state)
    dims = (_tree_dims("ensemble", "params", params, in_dims[0]), _tree_dims("ensemble", "state", state, in_dims[1]))
    n, first = None, ""
    for what, tree, tree_dims in (("params", params, dims[0]), ("state", state, dims[1])):
        for k, t in tree.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}['{k}'] is {type(t).__name__}, expected a Tensor")
            want = net._shapes.get(k) if what == "params" else None
            if tree_dims[k] is None:
                if want is not None and t.shape != want:
                    raise ValueError(f"{what}['{k}'] is shared (in_dims None) and has shape {tuple(t.shape)}, but the net expects {tuple(want)}")
                continue
            if t.ndim == 0 or (want is not None and t.shape[1:] != want):
                expected = f"(N, {', '.join(map(str, want))})" if want is not None else "a leading member dim N"
                hint = " (one net's params? stack members with pf.ensemble.init or pf.ensemble.stack)" if want is not None and t.shape == want else ""
                raise ValueError(f"{what}['{k}'] has shape {tuple(t.shape)}, but stacked ensemble {what} need {expected}{hint}")
            if n is None:
                n, first = t.shape[0], f"{what}['{k}']"
            elif t.shape[0] != n:
                raise ValueError(f"{what}['{k}'] stacks {t.shape[0]} members, but {first} stacks {n}")
    if n is None:
        raise ValueError("ensemble: no entry of params or state is stacked; nothing to count members on")
    return n


def member(tree: Any, k: int, in_dims: TreeDims = 0) -> Any:
    """Member ``k`` of a stacked tree (with ``in_dims`` as for :func:`init`: shared entries as they are)."""
    if in_dims == 0:
        return tree_map(lambda t: t[k], tree)
    dims = _tree_dims("ensemble.member", "tree", tree, in_dims)
    return {key: (t[k] if dims[key] == 0 else t) for key, t in tree.items()}


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
    differentiated argument (``argnums``) must be stacked along dim 0 (``in_dims`` 0 there), or,
    for a dict (``params``), be given a dict of per-entry dims as in the module docstring: its
    shared entries (``None``) are read by every member and not differentiated, and its gradient
    holds the stacked entries only (what an optimizer of the members steps). Arguments stacking
    different member counts are an error naming both.
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
    from .grad import _check_argnums, _positions, _summed_member_route

    api = "pf.ensemble.grad_and_value(fn)(*args)"
    _check_argnums(api, argnums)

    def members_grad_and_value(*args: Any, **kwargs: Any) -> Any:
        if isinstance(in_dims, tuple) and len(in_dims) != len(args):
            raise ValueError(f"{api}: in_dims has {len(in_dims)} entries for {len(args)} positional inputs")
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        positions = _positions(api, argnums, len(args))
        _check_member_counts(api, [f"args[{i}]" for i in range(len(args))], args, dims, None)
        split = [p for p in positions if isinstance(dims[p], Mapping) and isinstance(args[p], Mapping)]
        if not split:
            return _summed_member_route(api, fn, argnums, has_aux, in_dims, randomness, args, kwargs)
        # a differentiated dict with shared entries: its stacked part is differentiated, its shared
        # part rides as one more (unmapped) argument, and fn sees the two merged
        new_args, new_dims = list(args), list(dims)
        layout = {}
        for p in split:
            d = _tree_dims(api, f"args[{p}]", args[p], dims[p])
            new_args[p], new_dims[p] = _pick(args[p], d, 0), 0
            layout[p] = (len(new_args), tuple(args[p]))
            new_args.append(_pick(args[p], d, None))
            new_dims.append(None)
        n_args = len(args)

        def merged(*a: Any, **kw: Any) -> Any:
            real = list(a[:n_args])
            for p, (q, keys) in layout.items():
                both = {**a[p], **a[q]}
                real[p] = {k: both[k] for k in keys}
            return fn(*real, **kw)

        nums = positions[0] if isinstance(argnums, int) else positions
        return _summed_member_route(api, merged, nums, has_aux, tuple(new_dims), randomness, tuple(new_args), kwargs)

    return members_grad_and_value
