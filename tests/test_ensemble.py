"""Ensembles: stacked members under vmap equal the per-member loop (forward, grad, training-mode SN)."""


import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P

import pfunc as pf
from pfunc.parametrizations import Orthogonal, SpectralNorm, WeightNorm


def _net():
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    return pf.parametrize(model, {"0.weight": SpectralNorm(), "2.weight": Orthogonal(), "4.weight": WeightNorm()})


def test_members_are_independent_and_reproducible_alone():
    net = _net()
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=7, n=4))
    w = params["0.parametrizations.weight.original"]
    assert w.shape[0] == 4 and not torch.equal(w[0], w[1])
    g = torch.Generator().manual_seed(7 + 2)  # member 2 alone, from its own generator
    solo_p, solo_s = net.init(generator=g, values=pf.ensemble.fresh_values(net.module, g))
    for k in solo_p:
        assert torch.equal(solo_p[k], params[k][2])
    for k in solo_s:
        assert torch.equal(solo_s[k], state[k][2])


def test_vmapped_forward_grad_and_training_state_equal_the_loop():
    net = _net()
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=5))
    x = torch.randn(8, 4)

    def loss(p, s, x):
        out, s = net(p, s, x, training=True)
        return out.pow(2).mean(), s

    grads, new_state = torch.func.vmap(torch.func.grad(loss, has_aux=True), in_dims=(0, 0, None))(params, state, x)
    for k in range(5):
        pk, sk = pf.ensemble.member(params, k), pf.ensemble.member(state, k)
        gk, nsk = torch.func.grad(loss, has_aux=True)(pk, sk, x)
        for name in gk:
            torch.testing.assert_close(grads[name][k], gk[name], atol=1e-6, rtol=1e-5)
        for name in nsk:
            torch.testing.assert_close(new_state[name][k], nsk[name], atol=1e-6, rtol=1e-5)


def test_call_with_per_member_inputs():
    net = _net()
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3))
    xs = torch.randn(3, 6, 4)
    out, _ = pf.ensemble.call(net, params, state, xs, training=False, batched_args=True)
    for k in range(3):
        ok, _ = net(pf.ensemble.member(params, k), pf.ensemble.member(state, k), xs[k], training=False)
        torch.testing.assert_close(out[k], ok, atol=1e-6, rtol=1e-5)


def test_torch_spectral_norm_cannot_be_vmapped_in_training_but_pfunc_can():
    """The reason this module exists: torch's in-place power iteration has no batching rule."""
    with pytest.raises(RuntimeError, match="same class"):
        torch.func.stack_module_state([P.spectral_norm(nn.Linear(4, 4)) for _ in range(3)])
    torch_sn = P.spectral_norm(nn.Linear(4, 4)).parametrizations.weight[0]
    with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::div.out"):
        torch.func.vmap(torch_sn)(torch.randn(3, 4, 4))
    net = pf.parametrize(nn.Linear(4, 4), {"weight": SpectralNorm()})
    params, state = pf.ensemble.init(net, pf.ensemble.generators(0, 3))
    out, new_state = pf.ensemble.call(net, params, state, torch.randn(2, 4), training=True)
    assert out.shape == (3, 2, 4)
    assert not torch.equal(new_state["parametrizations.weight.0._u"], state["parametrizations.weight.0._u"])


def test_empty_generators_is_a_clear_error():
    with pytest.raises(ValueError, match="one generator per member"):
        pf.ensemble.init(_net(), [])
    with pytest.raises(ValueError, match="n must be positive"):
        pf.ensemble.generators(0, 0)


# ---------------------------------------------------------------- pf.ensemble.grad_and_value
def _members_loss(net):
    def loss(p, s, x, y):
        out, s = net(p, s, x, training=True)
        return (out - y).pow(2).mean(), s

    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_summed_member_gradients_equal_vmapped_torch_func_member_by_member_with_spectral_norm_in_training(dtype):
    net = pf.parametrize(_net().module.to(dtype), {"0.weight": SpectralNorm(), "2.weight": Orthogonal(), "4.weight": WeightNorm()})
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=3, n=4))
    g = torch.Generator().manual_seed(1)
    x, ys = torch.randn(8, 4, generator=g, dtype=dtype), torch.randn(4, 8, 2, generator=g, dtype=dtype)
    loss = _members_loss(net)
    in_dims = (0, 0, None, 0)
    grads, (values, new_state) = pf.ensemble.grad_and_value(loss, has_aux=True, in_dims=in_dims)(params, state, x, ys)
    ref_grads, (ref_values, ref_state) = torch.func.vmap(torch.func.grad_and_value(loss, has_aux=True), in_dims=in_dims)(
        {k: v.detach() for k, v in params.items()}, state, x, ys
    )
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert values.shape == (4,) and not values.requires_grad
    for k in range(4):  # member by member, and against member k run alone
        solo_grads, (solo_value, solo_state) = torch.func.grad_and_value(loss, has_aux=True)(
            pf.ensemble.member(params, k), pf.ensemble.member(state, k), x, ys[k]
        )
        torch.testing.assert_close(values[k], ref_values[k], **tol)
        torch.testing.assert_close(values[k], solo_value, **tol)
        for name in params:
            torch.testing.assert_close(grads[name][k], ref_grads[name][k], **tol)
            torch.testing.assert_close(grads[name][k], solo_grads[name], **tol)
        for name in state:
            torch.testing.assert_close(new_state[name][k], ref_state[name][k], **tol)
            torch.testing.assert_close(new_state[name][k], solo_state[name], **tol)
    assert not torch.equal(new_state["0.parametrizations.weight.0._u"], state["0.parametrizations.weight.0._u"])
    assert all(p.grad is None for p in params.values())


def test_summed_member_route_takes_one_backward_without_create_graph():
    seen = []

    class Identity(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            seen.append(torch.is_grad_enabled())
            return g

    f = lambda w, x: (Identity.apply(w) * x).sum()  # noqa: E731
    ws, xs = torch.randn(5, 3), torch.randn(5, 3)
    grads, values = pf.ensemble.grad_and_value(f)(ws, xs)
    assert seen == [False]  # one backward for all 5 members, no create_graph
    assert torch.equal(grads, xs) and torch.equal(values, (ws * xs).sum(-1))
    seen.clear()
    torch.func.vmap(torch.func.grad(f))(ws, xs)
    assert seen == [True]


def test_a_differentiated_argument_shared_by_all_members_is_refused():
    f = lambda w, x: (w * x).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"in_dims\[0\] is None, but argument 0 is differentiated"):
        pf.ensemble.grad_and_value(f, in_dims=(None, 0))(torch.randn(3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"in_dims has 1 entries for 2 positional inputs"):
        pf.ensemble.grad_and_value(f, in_dims=(0,))(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"expected f\(\*args\) to return a scalar Tensor"):
        pf.ensemble.grad_and_value(lambda w: w * 2)(torch.randn(4, 3))


def test_summed_member_route_nests_inside_torch_func_as_the_vmapped_route():
    f = lambda w, x: (w.sin() * x).sum()  # noqa: E731
    ws, xs = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    outer = lambda w: pf.ensemble.grad_and_value(f)(w, xs)[0].pow(2).sum()  # noqa: E731
    expected = torch.func.grad(lambda w: torch.func.vmap(torch.func.grad(f))(w, xs).pow(2).sum())(ws)
    torch.testing.assert_close(torch.func.grad(outer)(ws), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pf.grad(outer)(ws), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.compile
def test_summed_member_route_compiles_without_graph_breaks():
    net = _net()
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3))
    x, ys = torch.randn(8, 4), torch.randn(3, 8, 2)
    step = pf.ensemble.grad_and_value(_members_loss(net), has_aux=True, in_dims=(0, 0, None, 0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(params, state, x, ys)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    # one graph that holds the step (once it held only a functorch query, the step running eagerly)
    assert explanation.graph_count == 1
    code = explanation.graphs[0].print_readable(print_output=False)
    assert code.count("torch._C._nn.linear") >= 3 and "matrix_exp" in code
    torch._dynamo.reset()
    got = torch.compile(step, backend="aot_eager")(params, state, x, ys)
    expected = step(params, state, x, ys)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# -- issue 17, item 6: partly shared ensembles (per-entry in_dims) -------------------------------
ENCODEC_INTS = {"stride": None, "kernel_size": None, "padding_total": None}


def test_encodec_integer_buffers_shared_run_as_an_ensemble_and_each_member_equals_its_solo_run():
    from .third_party import EncodecConv1d

    torch.manual_seed(0)
    net, _, _ = pf.from_torch(EncodecConv1d())
    gens = pf.ensemble.generators(seed=0, n=3)
    params, state = pf.ensemble.init(net, gens, in_dims=(0, ENCODEC_INTS))
    assert state["stride"].shape == () and params["conv.parametrizations.weight.original1"].shape[0] == 3
    x = torch.randn(2, 2, 9)
    out, new_state = pf.ensemble.call(net, params, state, x, training=True, in_dims=(0, ENCODEC_INTS))
    for k in range(3):
        solo, _ = net(pf.ensemble.member(params, k), pf.ensemble.member(state, k, ENCODEC_INTS), x, training=True)
        torch.testing.assert_close(out[k], solo, rtol=1e-6, atol=1e-6)
    assert new_state["stride"].shape == () and torch.equal(new_state["stride"], state["stride"])  # shared in, shared out
    # stacked (the only choice before), the padding arithmetic is vmap's data-dependent control flow
    stacked_params, stacked_state = pf.ensemble.init(net, gens)
    with pytest.raises(RuntimeError, match=r"data-dependent control flow|calling \.item\(\) on a Tensor"):
        pf.ensemble.call(net, stacked_params, stacked_state, x)


def test_call_takes_in_dims_for_its_args_and_refuses_member_counts_that_differ_naming_both():
    net = _net()
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3))
    xs = torch.randn(3, 6, 4)
    out, _ = pf.ensemble.call(net, params, state, xs, training=False, in_dims=(0, 0, 0))
    for k in range(3):
        ok, _ = net(pf.ensemble.member(params, k), pf.ensemble.member(state, k), xs[k], training=False)
        torch.testing.assert_close(out[k], ok, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"args\[0\] stacks 4 members \(dim 0\), but params and state stacks 3"):
        pf.ensemble.call(net, params, state, torch.randn(4, 6, 4), in_dims=(0, 0, 0))
    bad = {**params, "0.bias": torch.randn(4, 16)}
    with pytest.raises(ValueError, match=r"params\['2.bias'\] stacks 3 members, but params\['0.bias'\] stacks 4"):
        pf.ensemble.call(net, bad, state, xs[0])
    with pytest.raises(ValueError, match=r"in_dims for params names keys params does not have: \['nope'\]"):
        pf.ensemble.call(net, params, state, xs[0], in_dims=({"nope": None}, 0))
    with pytest.raises(ValueError, match="not both"):
        pf.ensemble.call(net, params, state, xs, in_dims=(0, 0, 0), batched_args=True)
    loss = lambda p, x: net(p, state_0, x, training=False)[0].pow(2).mean()  # noqa: E731
    state_0 = pf.ensemble.member(state, 0)
    with pytest.raises(ValueError, match=r"args\[1\] stacks 4 members \(dim 0\), but args\[0\]\['.*'\] stacks 3"):
        pf.ensemble.grad_and_value(loss, in_dims=(0, 0))(params, torch.randn(4, 6, 4))


def test_a_shared_state_entry_changed_per_member_is_an_error_naming_it():
    class Ema(nn.Module):  # an EMA of its outputs, assigned (as EMA modules do)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("ema", torch.zeros(3))

        def forward(self, x):
            y = self.lin(x)
            if self.training:
                self.ema = 0.9 * self.ema + 0.1 * y.mean(0).detach()
            return y

    net = pf.parametrize(Ema(), {})
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=2), in_dims=(0, None))
    assert state["ema"].shape == (3,)
    with pytest.raises(ValueError, match=r"state\['ema'\] is shared \(in_dims None\), but the call changed it differently per member"):
        pf.ensemble.call(net, params, state, torch.randn(4, 3), training=True, in_dims=(0, None))
    out, new_state = pf.ensemble.call(net, params, state, torch.randn(4, 3), training=False, in_dims=(0, None))
    assert out.shape == (2, 4, 3) and new_state["ema"] is state["ema"]


def test_n_low_rank_adapters_on_one_frozen_base_train_in_one_vmapped_step_each_equal_to_training_it_alone():
    import torch.nn.functional as F

    from pfunc.parametrizations import LowRankAdapter

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    net = pf.parametrize(base, {"0.weight": LowRankAdapter(rank=2), "2.weight": LowRankAdapter(rank=2)})
    adapter = sorted(k for k in net.param_keys if k.endswith(("original1", "original2")))
    shared = {k: None for k in net.param_keys if k not in adapter}  # the base: weights and biases
    n = 4
    params, _ = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=n), reinit=None, in_dims=(shared, 0))
    assert params["0.parametrizations.weight.original0"].shape == (16, 6)  # one frozen base
    assert params["0.parametrizations.weight.original1"].shape == (n, 2, 6)  # n adapters
    frozen = {k: params[k].detach().clone() for k in shared}
    xs, ys = torch.randn(n, 8, 6), torch.randn(n, 8, 3)

    def loss(p, x, y):
        return F.mse_loss(net(p, {}, x)[0], y)

    step = pf.ensemble.grad_and_value(loss, in_dims=(shared, 0, 0))
    trained = {k: params[k] for k in adapter}
    opt = torch.optim.SGD(trained.values(), lr=0.5, momentum=0.9)
    solo = [{k: pf.ensemble.member(params, m, shared)[k].detach().clone().requires_grad_() for k in adapter} for m in range(n)]
    solo_opts = [torch.optim.SGD(s.values(), lr=0.5, momentum=0.9) for s in solo]
    for _ in range(3):
        grads, losses = step({**params, **trained}, xs, ys)
        assert sorted(grads) == adapter  # gradients for what is stacked only
        for k, p in trained.items():
            p.grad = grads[k]
        opt.step()
        for m in range(n):
            g, value = pf.grad_and_value(loss)({**frozen, **solo[m]}, xs[m], ys[m])
            torch.testing.assert_close(losses[m], value, rtol=1e-6, atol=1e-7)
            for k, p in solo[m].items():
                p.grad = g[k]
            solo_opts[m].step()
    for m in range(n):
        for k in adapter:
            torch.testing.assert_close(trained[k][m], solo[m][k], rtol=1e-5, atol=1e-6, msg=lambda e: f"member {m} {k}: {e}")
    assert not torch.equal(trained[adapter[1]][0], trained[adapter[1]][1])  # members differ: own A, own data
    for k, v in frozen.items():
        assert torch.equal(params[k], v)  # the base is never written
