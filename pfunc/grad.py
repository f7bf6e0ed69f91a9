"""``grad`` and ``grad_and_value``: ``torch.func``'s gradients at autograd's cost.

Same signatures, return order and pytree handling as :func:`torch.func.grad` and
:func:`torch.func.grad_and_value`, the same results (to rounding; bitwise where the same
kernels run), and the same errors (types and conditions; the messages also name the argument
and key at fault). What differs is how the gradient is computed at the top level:

* **top level, eager** (no ``torch.func`` transform running): the differentiated inputs are
  replaced by fresh leaves (``t.detach().requires_grad_()``, sharing the caller's storage),
  ``f`` runs under ``torch.enable_grad()`` and one backward of autograd's engine (what
  ``torch.autograd.grad`` calls) differentiates it without ``create_graph``.
  ``torch.func.grad`` differentiates with ``create_graph=True``, which keeps every saved
  tensor of the forward alive through the whole backward (on the diffusion Unet 2.35x the
  peak memory and about 1.3x the time of ``loss.backward()``, ``BENCHMARKS.md`` item 6).
* **inside** ``vmap``/``grad``/``jvp``/``jacrev``/``functionalize``, or inside the ``f`` of a
  top-level ``pf.grad``: ``torch.func.grad_and_value`` itself, so per-sample gradients, nesting
  and higher-order derivatives keep working (``pf.grad(pf.grad(f))`` differentiates the inner
  ``torch.func`` gradient with the outer autograd one).
* **under** ``torch.compile``: ``torch.func.grad_and_value`` (dynamo captures it whole: no
  graph break), called under ``torch.no_grad()`` at the top level so the compiled graph
  computes the gradient and records nothing for an outer backward. This compiled graph runs
  faster than a compiled forward plus AOTAutograd's compiled backward (``BENCHMARKS.md``
  item 5); dynamo cannot capture ``torch.autograd.grad`` itself without a graph break.
* under ``torch.inference_mode()``, where autograd records nothing: ``torch.func``, run with
  inference mode switched off for the gradient (older ``torch.func`` silently gave zeros there).

Nothing of the caller's is touched: its tensors keep their values, ``requires_grad`` and
graph, nothing accumulates in ``.grad``, and the returned gradients, value and aux are not
part of any autograd graph (``requires_grad=False``; a differentiated input returned in aux
comes back as the caller's own tensor, as in ``torch.func``). That last point is the one
difference from ``torch.func``: when the caller's inputs require grad, ``torch.func.grad``
returns results connected to the caller's graph (so ``torch.autograd`` can differentiate
through the gradient, at ``create_graph``'s cost); these never are. For a gradient of a
gradient, nest: ``pf.grad(pf.grad(f))`` or ``torch.func.grad(pf.grad(f))``.

>>> import torch, pfunc as pf
>>> params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
>>> def loss(p, x):
...     return ((x @ p["w"] + p["b"]) ** 2).mean()
>>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> grads, value = pf.grad_and_value(loss)(params, x)
>>> grads["w"], grads["b"], value
(tensor([1.5000, 2.5000]), tensor(4.), tensor(4.2500))
>>> per_sample = torch.func.vmap(pf.grad(loss), in_dims=(None, 0))(params, x[:, None])
>>> per_sample["w"].shape
torch.Size([2, 2])
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["grad", "grad_and_value"]

Argnums = Union[int, tuple[int, ...]]

_functorch = torch._C._functorch


def _in_transform() -> bool:
    """Whether a ``torch.func`` transform is running. (The depth of functorch's layer stack, which
    dynamo traces to the right constant; it breaks the graph on ``maybe_current_level`` inside a
    vmapped function, which left a compiled ``pf.ensemble.grad_and_value`` step all eager, and
    reads ``peek_interpreter_stack() is None`` as false at the top level.)"""
    return _functorch.get_dynamic_layer_stack_depth() != 0


def _check_argnums(api: str, argnums: Any) -> None:
    """``argnums``' type, uniqueness and non-emptiness (``torch.func``'s rules and messages)."""
    if isinstance(argnums, int):
        return
    if not isinstance(argnums, tuple) or not all(isinstance(a, int) for a in argnums):
        raise RuntimeError(f"{api}: argnums must be int or Tuple[int, ...], got: {type(argnums)} ({argnums!r})")
    if len(argnums) == 0:
        raise RuntimeError(f"{api}: argnums must be non-empty")
    if len(set(argnums)) != len(argnums):
        raise RuntimeError(f"{api}: argnums elements must be unique, got {argnums}")


def _positions(api: str, argnums: Argnums, num_args: int) -> tuple[int, ...]:
    """``argnums`` as non-negative positions into ``args`` (negatives count from the end)."""
    out = []
    for a in (argnums,) if isinstance(argnums, int) else argnums:
        if not -num_args <= a < num_args:
            raise RuntimeError(f"{api}: argnums={argnums}: got argnum={a}, but only {num_args} positional inputs")
        out.append(a % num_args)
    if len(set(out)) != len(out):
        raise RuntimeError(f"{api}: argnums={argnums} names the same positional input twice")
    return tuple(out)


def _where(tree: Any, index: int) -> str:
    """``index``-th leaf of ``tree`` as a key path (``"['w']"``), for error messages."""
    with_path = getattr(pytree, "tree_flatten_with_path", None)
    if with_path is None:  # pragma: no cover - torch without key paths
        return f" (leaf {index})"
    path, _ = with_path(tree)[0][index]
    return pytree.keystr(path)


def _check_leaf(api: str, leaf: Any, args: Sequence[Any], position: int, index: int) -> None:
    if not isinstance(leaf, Tensor):
        raise ValueError(
            f"{api}: args[{position}]{_where(args[position], index)} is a {type(leaf).__name__}; every leaf "
            "of a differentiated argument must be a Tensor (torch.func: 'Thing passed to transform API must be Tensor')"
        )
    if not (leaf.is_floating_point() or leaf.is_complex()):
        raise RuntimeError(
            f"{api}: args[{position}]{_where(args[position], index)} is a {leaf.dtype} tensor; only Tensors of "
            "floating point and complex dtype can be differentiated (pass it in an argument not in argnums)"
        )


def _check_output(api: str, has_aux: bool, out: Any) -> tuple[Tensor, Any]:
    """``(output, aux)`` of ``f``'s result, after ``torch.func``'s checks."""
    aux = None
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise RuntimeError(
                f"{api}: with has_aux=True, f must return a tuple (output, aux); got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        out, aux = out
    if not isinstance(out, Tensor):
        raise RuntimeError(f"{api}: expected f(*args) to return a Tensor, got {type(out).__name__}")
    if out.dim() != 0:
        raise RuntimeError(
            f"{api}: expected f(*args) to return a scalar Tensor, got a tensor with {out.dim()} dims "
            f"(shape {tuple(out.shape)}). Maybe you wanted to use the vjp or jacrev APIs instead?"
        )
    return out, aux


def _bad_aux(api: str, aux: Any) -> RuntimeError:
    for i, leaf in enumerate(pytree.tree_leaves(aux)):
        if not isinstance(leaf, Tensor):
            return RuntimeError(
                f"{api}: aux must be a pytree of Tensors (as torch.func requires); aux{_where(aux, i)} is a {type(leaf).__name__}"
            )
    return RuntimeError(f"{api}: aux must be a pytree of Tensors (as torch.func requires)")  # pragma: no cover


def _map_aux(api: str, aux: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` on every tensor of ``aux``, which must be a pytree of tensors (``torch.func``'s rule).

    Plain tuples, lists and dicts are walked here (the common case, at a fraction of the
    generic pytree's cost); any other node (namedtuple, registered classes) goes through
    ``torch.utils._pytree``, which is what ``torch.func`` flattens with.
    """
    return _walk_aux(api, aux, aux, fn)


def _walk_aux(api: str, aux: Any, tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    # A module-level function, not a closure that calls itself: such a closure is a reference
    # cycle that would keep aux, and the fresh leaves through fn, alive until the garbage
    # collector runs (forever with it off; tests/test_grad.py checks nothing outlives a call).
    if isinstance(tree, Tensor):
        return fn(tree)
    kind = type(tree)
    if kind is dict:
        return {k: _walk_aux(api, aux, v, fn) for k, v in tree.items()}
    if kind is tuple:
        return tuple([_walk_aux(api, aux, x, fn) for x in tree])
    if kind is list:
        return [_walk_aux(api, aux, x, fn) for x in tree]
    leaves, spec = pytree.tree_flatten(tree)
    if len(leaves) == 1 and leaves[0] is tree:  # a leaf that is not a tensor
        raise _bad_aux(api, aux)
    return pytree.tree_unflatten([_walk_aux(api, aux, x, fn) for x in leaves], spec)


def _checked(api: str, func: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """``func`` with its output checked, for the routes that hand it to ``torch.func``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        out, aux = _check_output(api, has_aux, func(*args, **kwargs))
        return (out, _map_aux(api, aux, lambda t: t)) if has_aux else out

    return run


def _check_inputs(api: str, args: Sequence[Any], positions: tuple[int, ...]) -> None:
    for p in positions:
        for i, leaf in enumerate(pytree.tree_leaves(args[p])):
            _check_leaf(api, leaf, args, p, i)


class _Nesting(threading.local):
    depth = 0  # how many top-level grad_and_value calls are running f in this thread


_NESTING = _Nesting()


def _outermost() -> bool:
    """Whether a gradient taken now is the outermost one: no ``torch.func`` transform is running
    and no top-level :func:`grad_and_value` is running ``f``."""
    return not _in_transform() and _NESTING.depth == 0


def _autograd_ok() -> bool:
    """Whether the autograd route applies: eager, outermost, and autograd records (not inference
    mode; dynamo cannot trace ``is_inference_mode_enabled``, hence the ``is_compiling`` first)."""
    return not torch.compiler.is_compiling() and _outermost() and not torch.is_inference_mode_enabled()


def _fresh(t: Tensor) -> Tensor:
    """A new leaf that requires grad, sharing ``t``'s storage (a copy for an inference tensor,
    which cannot require grad outside inference mode)."""
    f = t.detach()
    if f.is_inference():
        f = f.clone()
    return f.requires_grad_()


def _differentiable(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


class _Leaves:
    """The fresh leaves standing for the differentiated arguments, and how to give gradients
    back their structure."""

    def __init__(self, api: str, args: Sequence[Any], positions: tuple[int, ...]):
        self.args = list(args)
        self.fresh: list[Tensor] = []
        self.callers: list[Tensor] = []
        self.rebuilds: list[tuple[int, Callable[[list[Tensor]], Any]]] = []
        for p in positions:
            arg = args[p]
            if type(arg) is dict and all(_differentiable(v) for v in arg.values()):
                keys, flat = tuple(arg), list(arg.values())
                rebuild: Callable[[list[Tensor]], Any] = lambda gs, keys=keys: dict(zip(keys, gs))  # noqa: E731
            else:
                flat, spec = pytree.tree_flatten(arg)
                for i, t in enumerate(flat):
                    _check_leaf(api, t, args, p, i)
                rebuild = lambda gs, spec=spec: pytree.tree_unflatten(gs, spec)  # noqa: E731
            fresh = [_fresh(t) for t in flat]
            self.args[p] = rebuild(fresh)
            self.fresh += fresh
            self.callers += flat
            self.rebuilds.append((len(fresh), rebuild))

    def structure(self, argnums: Argnums, grads: list[Tensor]) -> Any:
        """``grads`` (one per fresh leaf) in the structure of the differentiated arguments."""
        per_arg, start = [], 0
        for n, rebuild in self.rebuilds:
            per_arg.append(rebuild(grads[start:start + n]))
            start += n
        return per_arg[0] if isinstance(argnums, int) else tuple(per_arg)

    def release(self, t: Tensor) -> Tensor:
        """``t`` without its graph: the caller's tensor for a fresh leaf, ``t.detach()`` otherwise."""
        if not t.requires_grad:
            return t
        if t.is_leaf:
            for fresh, caller in zip(self.fresh, self.callers):
                if fresh is t:
                    return caller
        return t.detach()


# The engine call behind torch.autograd.grad (torch >= 2.3). For a real scalar output and plain
# tensors, autograd.grad's own work before it is only argument normalisation, the
# __torch_function__ dispatch and the ones_like seed; calling it directly saves ~10 us a step.
_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _differentiate(output: Tensor, leaves: list[Tensor], materialize_grads: bool = True) -> list[Optional[Tensor]]:
    """``d output / d leaf`` for every leaf by one backward of autograd's engine (no
    ``create_graph``; the graph is freed as the backward goes); for leaves ``output`` does not
    reach, zeros (``materialize_grads``) or ``None``. Exactly ``torch.autograd.grad(output, leaves,
    allow_unused=True, materialize_grads=materialize_grads)``."""
    if not (leaves and output.requires_grad):
        return [torch.zeros_like(t) for t in leaves] if materialize_grads else [None] * len(leaves)
    if _run_backward is not None and not output.is_complex() and not torch.overrides.has_torch_function((output, *leaves)):
        seed = torch.ones_like(output, memory_format=torch.preserve_format)
        grads = list(_run_backward((output,), (seed,), False, False, tuple(leaves), True, False))
    else:  # complex outputs (autograd.grad's error), tensor subclasses and modes: the public call
        grads = list(torch.autograd.grad(output, leaves, allow_unused=True))
    if materialize_grads:
        for i, g in enumerate(grads):
            if g is None:
                grads[i] = torch.zeros_like(leaves[i])
    return grads


def _assemble(api: str, argnums: Argnums, has_aux: bool, leaves: _Leaves, grads: list[Tensor], value: Tensor, aux: Any) -> Any:
    """``torch.func``'s return structure: ``(grads, value)`` or ``(grads, (value, aux))``, nothing attached to a graph."""
    grad_input = leaves.structure(argnums, grads)
    if has_aux:
        return grad_input, (leaves.release(value), _map_aux(api, aux, leaves.release))
    return grad_input, leaves.release(value)


def _autograd_route(
    api: str, func: Callable[..., Any], argnums: Argnums, has_aux: bool, args: tuple, kwargs: dict, materialize_grads: bool = True
) -> Any:
    """Fresh leaves, ``f`` under ``enable_grad``, one ``torch.autograd.grad`` without ``create_graph``."""
    positions = _positions(api, argnums, len(args))
    with torch.enable_grad():
        leaves = _Leaves(api, args, positions)
        _NESTING.depth += 1
        try:
            output, aux = _check_output(api, has_aux, func(*leaves.args, **kwargs))
        finally:
            _NESTING.depth -= 1
        grads = _differentiate(output, leaves.fresh, materialize_grads)
    return _assemble(api, argnums, has_aux, leaves, grads, output, aux)


def _func_route(api: str, func: Callable[..., Any], argnums: Argnums, has_aux: bool, args: tuple, kwargs: dict) -> Any:
    """``torch.func.grad_and_value`` (inside a transform, a nested gradient, inference mode, compiling)."""
    positions = _positions(api, argnums, len(args))
    _check_inputs(api, args, positions)
    inner = torch.func.grad_and_value(_checked(api, func, has_aux), argnums, has_aux)
    if torch.compiler.is_compiling() and _outermost():
        # compiling the outermost gradient: record nothing for an outer backward, so the compiled
        # graph is an inference graph that computes the gradient (torch.func re-enables grad inside)
        with torch.no_grad():
            return inner(*args, **kwargs)
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        # torch.func.grad under inference mode silently returns zeros on older torch (2.4 does);
        # differentiating needs autograd to record, so leave inference mode for the gradient
        with torch.inference_mode(False):
            return inner(*args, **kwargs)
    return inner(*args, **kwargs)


def _route(
    api: str, func: Callable[..., Any], argnums: Argnums, has_aux: bool, args: tuple, kwargs: dict, materialize_grads: bool = True
) -> Any:
    if not torch.compiler.is_compiling() and not _in_transform() and _NESTING.depth == 0 and not torch.is_inference_mode_enabled():
        return _autograd_route(api, func, argnums, has_aux, args, kwargs, materialize_grads)
    return _func_route(api, func, argnums, has_aux, args, kwargs)


def _check_materialize_grads(api: str, materialize_grads: Any) -> None:
    if materialize_grads is not True and materialize_grads is not False:
        raise TypeError(f"{api}: materialize_grads must be True or False, got {materialize_grads!r}")


def grad_and_value(
    func: Callable[..., Any], argnums: Argnums = 0, has_aux: bool = False, *, materialize_grads: bool = True
) -> Callable[..., Any]:
    """``(gradients, value)`` of scalar ``func`` with respect to the inputs ``argnums``, as
    :func:`torch.func.grad_and_value`, computed by ``torch.autograd.grad`` at the top level.

    ``func(*args, **kwargs)`` returns a scalar tensor, or ``(scalar, aux)`` when ``has_aux``
    (``aux`` a pytree of tensors). ``argnums`` is an int or a tuple of ints; each
    differentiated argument is a pytree (dict, tuple, list, namedtuple or a node registered
    with ``torch.utils._pytree``) of floating-point or complex tensors, and its gradient has
    the same structure and shapes. Returns ``(grads, value)``, or ``(grads, (value, aux))``
    with ``has_aux``; ``grads`` is one tree for an int ``argnums`` and a tuple of trees for a
    tuple. Works under ``no_grad``.

    Inputs the value does not reach get zeros, as from ``torch.func.grad``; with
    ``materialize_grads=False`` (``torch.autograd.grad``'s word) they get ``None``, as ``.grad`` is
    left by ``loss.backward()``, so a loop that assigns these gradients to ``.grad`` steps exactly
    the tensors torch's optimizers would (they skip a ``None`` gradient: no weight decay, no moment
    update). ``None`` needs autograd to say what is unreached, so it is given at the top level,
    eagerly; inside ``vmap``/``grad``/other transforms and under ``torch.compile``, where the
    gradient is ``torch.func``'s, unreached inputs get zeros either way.

    >>> import torch, pfunc as pf
    >>> def loss(p, state, x):
    ...     y = p["w"] * x + state["shift"]
    ...     return y.pow(2).sum(), {"shift": state["shift"] + 1}      # state rides as aux
    >>> p, state = {"w": torch.tensor(2.0)}, {"shift": torch.tensor(1.0)}
    >>> grads, (value, new_state) = pf.grad_and_value(loss, has_aux=True)(p, state, torch.tensor(3.0))
    >>> grads, value, new_state
    ({'w': tensor(42.)}, tensor(49.), {'shift': tensor(2.)})
    """
    api = "pf.grad_and_value(f)(*args)"
    _check_argnums(api, argnums)
    _check_materialize_grads(api, materialize_grads)

    @functools.wraps(func, updated=())
    def grad_and_value_f(*args: Any, **kwargs: Any) -> Any:
        return _route(api, func, argnums, has_aux, args, kwargs, materialize_grads)

    return grad_and_value_f


def grad(
    func: Callable[..., Any], argnums: Argnums = 0, has_aux: bool = False, *, materialize_grads: bool = True
) -> Callable[..., Any]:
    """Gradients of scalar ``func`` with respect to the inputs ``argnums``, as
    :func:`torch.func.grad`: ``grads``, or ``(grads, aux)`` with ``has_aux``.

    See :func:`grad_and_value` for the arguments, the structure of ``grads`` and
    ``materialize_grads=False`` (``None`` for what the loss does not reach, as ``loss.backward()``
    leaves ``.grad``); this drops the value. Nests and composes like ``torch.func.grad``:

    >>> import torch, pfunc as pf
    >>> x = torch.tensor(0.5)
    >>> bool(torch.allclose(pf.grad(pf.grad(torch.sin))(x), -torch.sin(x)))   # second derivative
    True
    >>> xs = torch.tensor([0.0, 1.0, 2.0])
    >>> torch.func.vmap(pf.grad(lambda t: t ** 3))(xs)                        # per-sample
    tensor([ 0.,  3., 12.])
    """
    api = "pf.grad(f)(*args)"
    _check_argnums(api, argnums)
    _check_materialize_grads(api, materialize_grads)

    @functools.wraps(func, updated=())
    def grad_f(*args: Any, **kwargs: Any) -> Any:
        grads, rest = _route(api, func, argnums, has_aux, args, kwargs, materialize_grads)
        return (grads, rest[1]) if has_aux else grads

    return grad_f


def _summed_member_route(
    api: str,
    fn: Callable[..., Any],
    argnums: Argnums,
    has_aux: bool,
    in_dims: Any,
    randomness: str,
    args: tuple,
    kwargs: dict,
) -> Any:
    """``vmap(grad_and_value(fn))`` as one vmapped forward and one ``torch.autograd.grad`` of the
    summed member values at the top level; ``vmap(torch.func.grad_and_value(fn))`` elsewhere."""
    positions = _positions(api, argnums, len(args))
    if isinstance(in_dims, tuple):
        if len(in_dims) != len(args):
            raise ValueError(f"{api}: in_dims has {len(in_dims)} entries for {len(args)} positional inputs")
        dims = in_dims
    else:
        dims = (in_dims,) * len(args)
    for p in positions:
        if not (isinstance(dims[p], int) and not isinstance(dims[p], bool) and dims[p] == 0):
            raise ValueError(
                f"{api}: in_dims[{p}] is {dims[p]!r}, but argument {p} is differentiated (argnums={argnums}): "
                "a differentiated argument must be stacked along dim 0, one slice per member"
            )
    if not _autograd_ok():
        per_member = torch.func.vmap(grad_and_value(fn, argnums, has_aux), in_dims=in_dims, randomness=randomness)
        if torch.compiler.is_compiling() and _outermost():
            with torch.no_grad():  # as in _func_route: an inference graph that computes the gradient
                return per_member(*args, **kwargs)
        return per_member(*args, **kwargs)
    with torch.enable_grad():
        leaves = _Leaves(api, args, positions)
        out = torch.func.vmap(_checked(api, fn, has_aux), in_dims=in_dims, randomness=randomness)(*leaves.args, **kwargs)
        values, aux = out if has_aux else (out, None)
        # member k's value reads only member k's slice (vmap), so d(sum)/d(slice k) = d value_k / d slice k
        grads = _differentiate(values.sum(), leaves.fresh)
    return _assemble(api, argnums, has_aux, leaves, grads, values, aux)
