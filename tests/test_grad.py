"""pfunc.grad: ``pf.grad`` / ``pf.grad_and_value`` equal ``torch.func``'s, at autograd's cost, touching nothing."""

import doctest
import gc
import sys
import weakref
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pfunc as pf
from pfunc.parametrizations import Orthogonal, SpectralNorm, WeightNorm

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}

Pair = namedtuple("Pair", "a b")


@dataclass
class Node:
    """A user pytree node registered with torch's pytree (what torch.func flattens with)."""

    w: torch.Tensor
    rest: dict


pytree.register_pytree_node(
    Node,
    lambda n: ([n.w, n.rest], None),
    lambda children, _: Node(children[0], children[1]),
)


# ---------------------------------------------------------------- drawn pytrees and functions
def _tensor(draw, g, dtype):
    shape = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    return torch.randn(shape, generator=g, dtype=dtype)


@st.composite
def _tree(draw, g, dtype, depth=0):
    kinds = ["tensor", "dict", "tuple", "list", "namedtuple", "node"] if depth < 2 else ["tensor"]
    kind = draw(st.sampled_from(kinds))
    sub = lambda: draw(_tree(g, dtype, depth + 1))  # noqa: E731
    if kind == "tensor":
        return _tensor(draw, g, dtype)
    if kind == "dict":
        return {f"k{i}": sub() for i in range(draw(st.integers(1, 3)))}
    if kind == "tuple":
        return tuple(sub() for _ in range(draw(st.integers(1, 3))))
    if kind == "list":
        return [sub() for _ in range(draw(st.integers(1, 3)))]
    if kind == "namedtuple":
        return Pair(sub(), sub())
    return Node(_tensor(draw, g, dtype), {"x": sub()})


@st.composite
def problems(draw):
    """``(args, argnums, has_aux, unused)``: 1-3 pytree arguments, a valid argnums, whether
    ``f`` returns aux, and whether it ignores its last argument."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 3))
    args = tuple(draw(_tree(g, dtype)) for _ in range(n))
    if draw(st.booleans()):
        argnums = draw(st.integers(-n, n - 1))
    else:
        argnums = tuple(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))
    return args, argnums, draw(st.booleans()), draw(st.booleans()) and n > 1


def _make_f(has_aux, unused):
    """A smooth scalar of every leaf, with products between arguments (so each gradient
    depends on the others) and, with ``has_aux``, a pytree of tensors as aux."""

    def f(*args):
        used = args[:-1] if unused else args
        leaves = pytree.tree_leaves(used)
        value = sum((torch.sin(t) * t).sum() * (i + 1) for i, t in enumerate(leaves))
        value = value + torch.stack([t.mean() for t in leaves]).prod()
        if has_aux:
            return value, {"first": leaves[0] * 2, "pair": (leaves[-1].exp(), value.detach())}
        return value

    return f


def _assert_trees_close(a, b, dtype):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **TOL[dtype])


@given(problems())
def test_grad_and_value_equals_torch_func_on_drawn_pytrees_and_argnums(problem):
    args, argnums, has_aux, unused = problem
    dtype = pytree.tree_leaves(args)[0].dtype
    f = _make_f(has_aux, unused)
    expected = torch.func.grad_and_value(f, argnums=argnums, has_aux=has_aux)(*args)
    got = pf.grad_and_value(f, argnums=argnums, has_aux=has_aux)(*args)
    _assert_trees_close(got, expected, dtype)
    expected_grad = torch.func.grad(f, argnums=argnums, has_aux=has_aux)(*args)
    _assert_trees_close(pf.grad(f, argnums=argnums, has_aux=has_aux)(*args), expected_grad, dtype)


@given(problems())
def test_grad_leaves_every_input_as_it_was_and_returns_nothing_attached(problem):
    args, argnums, has_aux, unused = problem
    leaves = pytree.tree_leaves(args)
    for i, t in enumerate(leaves):  # a mix of the caller's own leaves that require grad and plain tensors
        t.requires_grad_(i % 2 == 0)
    before = [(t.detach().clone(), t.requires_grad, t.is_leaf, t._version) for t in leaves]
    out = pf.grad_and_value(_make_f(has_aux, unused), argnums=argnums, has_aux=has_aux)(*args)
    for t, (value, requires_grad, is_leaf, version) in zip(leaves, before):
        assert torch.equal(t, value) and t.requires_grad == requires_grad and t.is_leaf == is_leaf
        assert t._version == version and t.grad is None
    for r in pytree.tree_leaves(out[0]) + [out[1] if not has_aux else out[1][0]]:
        assert not r.requires_grad and r.grad_fn is None


def test_a_non_leaf_input_keeps_its_graph_and_its_leaf_gets_no_grad():
    w = torch.randn(3, requires_grad=True)
    x = w * 2  # the caller's own graph
    fn_before = x.grad_fn
    g = pf.grad(lambda t: (t**3).sum())(x)
    assert x.grad_fn is fn_before and x.requires_grad and w.grad is None
    torch.testing.assert_close(g, 3 * x.detach() ** 2)
    x.sum().backward()  # the caller's graph still works
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))


def test_unused_inputs_and_constant_outputs_get_zeros_as_in_torch_func():
    x, y = torch.randn(3), torch.randn(2, 2)
    for f in (lambda a, b: a.sum(), lambda a, b: torch.tensor(1.0), lambda a, b: (a > 0).sum()):
        got = pf.grad(f, argnums=(0, 1))(x, y)
        expected = torch.func.grad(f, argnums=(0, 1))(x, y)
        for a, b in zip(got, expected):
            assert torch.equal(a, b) and a.shape == b.shape
    assert pf.grad(lambda d, a: a.sum())({}, x) == {}


@pytest.mark.parametrize("api", ["grad", "grad_and_value", "ensemble"])
def test_nothing_a_call_made_outlives_it_even_with_the_garbage_collector_off(api):
    # the fresh leaves, the forward's output and aux are freed when the caller drops the results:
    # no reference cycle keeps them (and their memory) until a collection
    made = []

    def f(p, x):
        out = p["w"] * x
        made.extend([weakref.ref(p["w"]), weakref.ref(out)])
        return out.sum(), {"out": out, "nested": [out * 2, (out,)]}

    p, x = {"w": torch.randn(3)}, torch.randn(3)
    if api == "ensemble":
        p, x = {"w": torch.randn(2, 3)}, torch.randn(2, 3)
        call = pf.ensemble.grad_and_value(f, has_aux=True)
    else:
        call = getattr(pf, api)(f, has_aux=True)
    gc.collect()
    gc.disable()
    try:
        result = call(p, x)
        assert made, "f never ran"
        del result
        alive = [r for r in made if r() is not None]
        assert not alive, f"{len(alive)} of {len(made)} tensors made inside the call outlive it"
    finally:
        gc.enable()


def test_aux_returning_a_differentiated_input_gives_back_the_callers_tensor():
    x = torch.randn(3)
    _, (_, aux) = pf.grad_and_value(lambda a: ((a**2).sum(), a), has_aux=True)(x)
    assert aux is x  # as torch.func: the unwrapped input is the caller's tensor


def test_works_under_no_grad_and_inference_mode_like_torch_func():
    x = torch.randn(4, dtype=torch.float64)
    f = lambda a: (a.sin() * a).sum()  # noqa: E731
    expected = torch.func.grad(f)(x)
    with torch.no_grad():
        assert torch.equal(pf.grad(f)(x), expected)
    with torch.inference_mode():
        xi = x.clone()
        torch.testing.assert_close(pf.grad(f)(xi), expected, rtol=1e-12, atol=1e-12)
        # per sample too (torch.func.grad itself gives zeros in inference mode on torch 2.4)
        torch.testing.assert_close(torch.func.vmap(pf.grad(lambda a: a.sin() * a))(xi), expected, rtol=1e-12, atol=1e-12)
        grads, value = pf.grad_and_value(f)(xi)
        torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-12)
        assert value.item() == pytest.approx(f(x).item())
    torch.testing.assert_close(pf.grad(f)(xi), expected, rtol=1e-12, atol=1e-12)  # an inference tensor, later


def test_complex_inputs_and_kwargs_as_torch_func():
    z = torch.randn(3, dtype=torch.complex128)
    w = torch.randn(3, dtype=torch.float64)
    f = lambda a, *, scale: (a.abs() ** 2 * scale).sum()  # noqa: E731
    torch.testing.assert_close(pf.grad(f)(z, scale=w), torch.func.grad(f)(z, scale=w), rtol=1e-12, atol=1e-12)


class _RecordsGradMode(torch.autograd.Function):
    """Identity whose backward records whether it runs with grad mode on (``create_graph=True``)."""

    seen: list = []

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        _RecordsGradMode.seen.append(torch.is_grad_enabled())
        return g

    generate_vmap_rule = True


def test_top_level_backward_has_no_create_graph_and_nested_ones_keep_torch_func():
    f = lambda x: _RecordsGradMode.apply(x).pow(2).sum()  # noqa: E731
    x = torch.randn(3)
    _RecordsGradMode.seen.clear()
    pf.grad(f)(x)
    assert _RecordsGradMode.seen == [False]  # autograd.grad without create_graph
    _RecordsGradMode.seen.clear()
    torch.func.grad(f)(x)
    assert _RecordsGradMode.seen == [True]  # what the top level avoids
    _RecordsGradMode.seen.clear()
    torch.func.vmap(pf.grad(f))(torch.randn(2, 3))
    assert _RecordsGradMode.seen == [True]  # inside vmap: torch.func's own


# ---------------------------------------------------------------- composition
def test_per_sample_gradients_under_vmap_equal_a_loop_and_torch_func():
    net = pf.parametrize(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), {"0.weight": Orthogonal(), "2.weight": WeightNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    params = {k: v.double() for k, v in params.items()}
    state = {k: v.double() for k, v in state.items()}
    net = pf.parametrize(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double(), {"0.weight": Orthogonal(), "2.weight": WeightNorm()})
    xs, ys = torch.randn(5, 1, 4, dtype=torch.float64), torch.randn(5, 1, 1, dtype=torch.float64)

    def loss(p, x, y):
        out, _ = net(p, state, x, training=False)
        return (out - y).pow(2).mean()

    per_sample = torch.func.vmap(pf.grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    expected = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for k in params:
        torch.testing.assert_close(per_sample[k], expected[k], rtol=1e-12, atol=1e-12)
        loop = torch.stack([pf.grad(loss)(params, xs[i], ys[i])[k] for i in range(5)])
        torch.testing.assert_close(per_sample[k], loop, rtol=1e-12, atol=1e-12)


def test_second_derivatives_nested_every_way_equal_torch_func():
    x = torch.randn(4, dtype=torch.float64)
    f = lambda a: (a.sin() * a.pow(2)).sum()  # noqa: E731
    inner = lambda g: (lambda a: g(f)(a).pow(2).sum())  # noqa: E731  # a scalar of the gradient
    expected = torch.func.grad(inner(torch.func.grad))(x)
    for outer, grad_ in ((torch.func.grad, pf.grad), (pf.grad, pf.grad), (pf.grad, torch.func.grad)):
        torch.testing.assert_close(outer(inner(grad_))(x), expected, rtol=1e-12, atol=1e-12)
    hess = torch.func.hessian(f)(x)
    torch.testing.assert_close(torch.func.jacrev(pf.grad(f))(x), hess, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(pf.grad(f))(x), hess, rtol=1e-12, atol=1e-12)
    v = torch.randn(4, dtype=torch.float64)
    _, hvp = torch.func.jvp(pf.grad(f), (x,), (v,))
    torch.testing.assert_close(hvp, hess @ v, rtol=1e-12, atol=1e-12)
    third = pf.grad(lambda a: pf.grad(lambda b: pf.grad(f)(b).sum())(a).sum())(x)
    expected3 = torch.func.grad(lambda a: torch.func.grad(lambda b: torch.func.grad(f)(b).sum())(a).sum())(x)
    torch.testing.assert_close(third, expected3, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_step_with_spectral_norm_state_as_aux_equals_torch_func(dtype):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).to(dtype)
    net = pf.parametrize(model, {"0.weight": SpectralNorm(), "2.weight": Orthogonal()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    params = {k: v.detach().requires_grad_() for k, v in params.items()}  # optimizer leaves, as in training
    x = torch.randn(6, 4, dtype=dtype)

    def loss(p, s):
        out, s = net(p, s, x, training=True)
        return out.pow(2).mean(), s

    got = pf.grad_and_value(loss, has_aux=True)(params, state)
    expected = torch.func.grad_and_value(loss, has_aux=True)({k: v.detach() for k, v in params.items()}, state)
    _assert_trees_close(got, expected, dtype)
    assert all(p.grad is None for p in params.values())


# ---------------------------------------------------------------- errors
def _vmapped(transform):
    return lambda f, **kw: (lambda *args: torch.func.vmap(transform(f, **kw))(*(a.unsqueeze(0) for a in args)))


ERRORS = [
    (lambda a: a * 2, {}, RuntimeError, r"scalar Tensor, got a tensor with 1 dims"),
    (lambda a: 1.0, {}, RuntimeError, r"return a Tensor, got float"),
    (lambda a: [a.sum(), 1], {"has_aux": True}, RuntimeError, r"has_aux=True, f must return a tuple \(output, aux\); got list"),
    (lambda a: (a.sum(), 1.5), {"has_aux": True}, RuntimeError, r"aux must be a pytree of Tensors.*aux is a float"),
    (lambda a: (a.sum(), {"n": None}), {"has_aux": True}, RuntimeError, r"aux\['n'\] is a NoneType"),
    (lambda a: a.sum(), {"argnums": 1}, RuntimeError, r"argnums=1: got argnum=1, but only 1 positional inputs"),
]


@pytest.mark.parametrize("where", ["top level", "inside vmap"])
@pytest.mark.parametrize("api", [pf.grad, pf.grad_and_value])
@pytest.mark.parametrize("f, kwargs, error, match", ERRORS)
def test_bad_functions_and_argnums_are_clear_errors_everywhere(where, api, f, kwargs, error, match):
    call = api if where == "top level" else _vmapped(api)
    with pytest.raises(error, match=match):
        call(f, **kwargs)(torch.randn(3))


@pytest.mark.parametrize("argnums, match", [
    ([0], r"argnums must be int or Tuple\[int, \.\.\.\], got: <class 'list'>"),
    ((), r"argnums must be non-empty"),
    ((0, 0), r"argnums elements must be unique"),
    (0.0, r"argnums must be int"),
])
def test_bad_argnums_are_refused_when_the_function_is_made(argnums, match):
    with pytest.raises(RuntimeError, match=match):
        pf.grad(lambda a: a.sum(), argnums=argnums)
    with pytest.raises(RuntimeError, match=r"names the same positional input twice"):
        pf.grad(lambda a, b: a.sum(), argnums=(0, -2))(torch.randn(2), torch.randn(2))


@pytest.mark.parametrize("where", ["top level", "inside vmap"])
def test_bad_differentiated_leaves_name_the_argument_and_the_key(where):
    wrap = (lambda g: g) if where == "top level" else (lambda g: (lambda *a: torch.func.vmap(g, in_dims=(None, 0))(*a)))
    f = lambda d, x: d["w"].sum() * x.sum()  # noqa: E731
    x = torch.randn(2, 3) if where == "inside vmap" else torch.randn(3)
    with pytest.raises(ValueError, match=r"args\[0\]\['n'\] is a int; every leaf of a differentiated argument must be a Tensor"):
        wrap(pf.grad(f))({"w": torch.randn(3), "n": 3}, x)
    with pytest.raises(RuntimeError, match=r"args\[0\]\['i'\] is a torch.int64 tensor; only Tensors of floating point"):
        wrap(pf.grad(f))({"w": torch.randn(3), "i": torch.arange(3)}, x)
    g = wrap(pf.grad(lambda d, x: d["w"].sum() * d["i"].sum() * x.sum(), argnums=1))({"w": torch.ones(3), "i": torch.arange(3)}, x)
    assert torch.equal(g, torch.full_like(x, 9.0))  # the same int tensor outside argnums is fine


def test_errors_from_torch_itself_pass_through_unchanged():
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for real scalar outputs"):
        pf.grad(lambda z: (z**2).sum())(torch.randn(3, dtype=torch.complex64))


# ---------------------------------------------------------------- compile, docs
@pytest.mark.compile
def test_compiled_grad_has_no_graph_break_and_equals_eager():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    net = pf.parametrize(model, {"0.weight": SpectralNorm(), "2.weight": WeightNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 8)

    def loss(p, s, x):
        out, s = net(p, s, x, training=True)
        return out.pow(2).mean(), s

    step = pf.grad_and_value(loss, has_aux=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(params, state, x)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    got, expected = compiled(params, state, x), step(params, state, x)
    _assert_trees_close(got, expected, torch.float32)
    assert not any(t.requires_grad for t in pytree.tree_leaves(got))
    nested = torch.compile(lambda p, s, xs: torch.func.vmap(pf.grad(loss, has_aux=True), in_dims=(None, None, 0))(p, s, xs), backend="aot_eager")
    per_sample = nested(params, state, x[:, None])
    expected = torch.func.vmap(torch.func.grad(loss, has_aux=True), in_dims=(None, None, 0))(params, state, x[:, None])
    _assert_trees_close(per_sample, expected, torch.float32)
    torch._dynamo.reset()


def test_docstring_examples_run():
    result = doctest.testmod(sys.modules["pfunc.grad"])
    assert result.failed == 0 and result.attempted > 0


# -- issue 17, item 5: None for what the loss does not reach, as loss.backward() leaves .grad -----
def test_materialize_grads_false_gives_none_for_unreached_params_so_adamw_steps_exactly_what_torch_steps():
    import copy

    from .third_party import Wav2Vec2Encoder

    torch.manual_seed(0)
    model = Wav2Vec2Encoder().train()
    twin = copy.deepcopy(model)
    net, params, state = pf.from_torch(model)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.5)
    pfunc_opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.5)
    g = torch.Generator().manual_seed(1)

    def loss_fn(p, x):
        return net(p, state, x, training=True)[0].pow(2).mean()

    for _ in range(2):
        x = torch.randn(2, 5, 8, generator=g)
        torch_opt.zero_grad(set_to_none=True)
        twin(x).pow(2).mean().backward()
        torch_opt.step()
        grads = pf.grad(loss_fn, materialize_grads=False)(params, x)
        assert [k for k, v in grads.items() if v is None] == ["masked_spec_embed"]
        for k, p in params.items():
            p.grad = grads[k]
        pfunc_opt.step()
    for k, v in twin.named_parameters():
        torch.testing.assert_close(params[k], v, rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert torch.equal(params["masked_spec_embed"], model.masked_spec_embed)  # never stepped, as torch

    # the default stays torch.func's (zeros), and so does every route inside a transform
    assert torch.equal(pf.grad(loss_fn)(params, x)["masked_spec_embed"], torch.zeros(8))
    per_member = torch.func.vmap(pf.grad(loss_fn, materialize_grads=False), in_dims=(None, 0))(params, x[:, None])
    assert torch.equal(per_member["masked_spec_embed"], torch.zeros(2, 8))
    with pytest.raises(TypeError, match="materialize_grads must be True or False"):
        pf.grad(loss_fn, materialize_grads=None)


def test_materialize_grads_false_with_a_loss_that_reaches_nothing_gives_all_none():
    value_only = pf.grad_and_value(lambda p: torch.tensor(1.0), materialize_grads=False)
    grads, value = value_only({"w": torch.ones(2)})
    assert grads == {"w": None} and value == 1.0
