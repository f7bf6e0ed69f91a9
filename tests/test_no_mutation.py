"""Principle 1: no pfunc call touches the module (type, tensors, values, attributes), in train and eval."""

import pytest
import torch
from torch import nn

import pfunc as pf
from pfunc.parametrizations import Mask, Orthogonal, Skew, SpectralNorm, Symmetric, WeightNorm


class CayleyMap(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("Id", torch.eye(n))

    def forward(self, X):
        return torch.linalg.solve(self.Id + X, self.Id - X)

    def right_inverse(self, A):
        return torch.linalg.solve(self.Id + A, self.Id - A)


def _snapshot(module):
    return [
        (
            type(m),
            sorted(m.__dict__),
            {n: (id(t), t.detach().clone(), t.requires_grad) for n, t in m._parameters.items() if t is not None},
            {n: (id(t), t.detach().clone()) for n, t in m._buffers.items() if t is not None},
            m.training,
        )
        for m in module.modules()
    ]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ta, da, pa, ba, tra), (tb, db, pb, bb, trb) in zip(a, b):
        assert ta is tb and da == db and tra == trb
        assert pa.keys() == pb.keys() and ba.keys() == bb.keys()
        for k in pa:
            assert pa[k][0] == pb[k][0] and torch.equal(pa[k][1], pb[k][1]) and pa[k][2] == pb[k][2]
        for k in ba:
            assert ba[k][0] == bb[k][0] and torch.equal(ba[k][1], bb[k][1])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_pfunc_call_mutates_the_module_or_its_parametrizations(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 3))
    getattr(model, mode)()
    cayley = CayleyMap(4)
    watched = nn.ModuleList([model, cayley])
    before = _snapshot(watched)
    net = pf.parametrize(
        model,
        {
            "0.weight": [Skew(), cayley],
            "2.weight": SpectralNorm(),
            "3.weight": WeightNorm(),
            "4.weight": [Symmetric(), Orthogonal()],
            "4.bias": Mask(p_drop=0.5),
        },
    )
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 4)
    for training in (True, False, None):
        out, state = net(params, state, x, training=training)
        values, state = net.materialize(params, state, training=training)
        net.apply(values, x)
    torch.func.grad(lambda p: net(p, state, x)[0].sum())(params)
    Q = torch.linalg.qr(torch.randn(3, 3))[0]
    params, state = net.assign(params, state, {"4.weight": Q, "0.bias": torch.zeros(4)})
    net2, p2, s2 = net.register(params, state, "0.bias", torch.nn.Identity())
    net3, p3, s3 = net2.remove(p2, s2, "0.weight", leave_parametrized=True)
    net3.remove(p3, s3, "3.weight", leave_parametrized=True)
    twin = pf.to_torch(net, params, state)
    twin(x)
    pf.ensemble.init(net, pf.ensemble.generators(0, 2))
    _assert_same(before, _snapshot(watched))


def test_failed_calls_leave_params_and_state_unchanged():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": [Skew(), CayleyMap(3)], "bias": Mask(p_drop=0.5)})
    params, state = net.init()
    kept_p = {k: v.detach().clone() for k, v in params.items()}
    kept_s = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError):
        net.assign(params, state, {"bias": torch.zeros(3), "nope": torch.zeros(3)})  # second key fails
    with pytest.raises(ValueError):
        net.register(params, state, "weight", lambda X: X[:-1])
    skew = pf.parametrize(nn.Linear(3, 3), {"weight": Skew()})
    with pytest.raises(ValueError, match="gives 'parametrizations.weight.original' the shape"):
        skew.assign(*skew.init(), {"weight": torch.eye(4)})
    for k in params:
        assert torch.equal(params[k], kept_p[k])
    for k in state:
        assert torch.equal(state[k], kept_s[k])


class _Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        y = self.inner(x) * self.scale
        raise RuntimeError("boom in forward")


def test_a_forward_that_raises_leaves_the_module_holding_its_own_tensors():
    module = _Raises()
    originals = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    net = pf.parametrize(module, {"inner.weight": Skew()})
    params, state = net.init()
    with pytest.raises(RuntimeError, match="boom in forward"):
        net(params, state, torch.randn(2, 3))
    now = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    assert now.keys() == originals.keys()
    assert all(now[n] is originals[n] for n in now)  # the very same objects, swapped back
    assert isinstance(module.inner.weight, nn.Parameter)


def test_forward_sees_the_materialized_tensors_through_parameters_and_attributes():
    seen = {}

    class Peek(nn.Linear):
        def forward(self, x):
            seen["attr"] = self.weight
            seen["listed"] = dict(self.named_parameters())["weight"]
            return super().forward(x)

    net = pf.parametrize(Peek(3, 3), {"weight": Skew()})
    params, state = net.init()
    values, _ = net.materialize(params, state)
    net.apply(values, torch.randn(2, 3))
    # one tensor, the call's value (a copy-on-write copy of it, so the forward cannot write values)
    assert seen["attr"] is seen["listed"] and torch.equal(seen["attr"], values["weight"])


def test_nested_calls_of_the_same_net_restore_in_order():
    inner_out = {}

    class Recurse(nn.Linear):
        def forward(self, x, depth=0):
            if depth == 0:
                inner_out["y"] = net.apply(other, x, depth=1)
            return super().forward(x)

    net = pf.parametrize(Recurse(3, 3), {"weight": Skew()})
    params, state = net.init()
    values, _ = net.materialize(params, state)
    other = {k: v + 1 for k, v in values.items()}
    x = torch.randn(2, 3)
    out = net.apply(values, x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, values["weight"], values["bias"]))
    torch.testing.assert_close(inner_out["y"], torch.nn.functional.linear(x, other["weight"], other["bias"]))
    assert isinstance(net.module.weight, nn.Parameter)


def test_a_submodule_replaced_after_building_still_gets_the_values():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    net = pf.parametrize(model, {"0.weight": Skew()})
    params, state = net.init()
    values, _ = net.materialize(params, state)
    model[1] = nn.Linear(3, 2)   # the caller edits the module; pfunc's values must still be what runs
    x = torch.randn(4, 3)
    expected = torch.func.functional_call(model, values, (x,))
    torch.testing.assert_close(net.apply(values, x), expected)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


# -- issue 17, item 3: the caller's params are never written -------------------------------------
def _bitwise_copy(tree):
    return {k: v.detach().clone() for k, v in tree.items()}


def _assert_bitwise_unchanged(tree, before):
    for k, v in tree.items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, f"the call wrote the caller's '{k}'"


def test_a_pruners_forward_hook_writing_bias_data_does_not_write_the_callers_params():
    from .third_party import structured_pruned_mlp

    model = structured_pruned_mlp()
    net, params, state = pf.from_torch(model)
    mask = state["0.parametrizations.weight.0.mask"]
    assert not mask.all() and (params["0._bias"][~mask] != 0).all()  # the hook has entries to zero
    before = _bitwise_copy(params)
    x = torch.randn(3, 6)
    out, _ = net(params, state, x, training=True)
    _assert_bitwise_unchanged(params, before)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # and it computes what torch computes
    pf.grad(lambda p: net(p, state, x, training=True)[0].sum())(params)
    _assert_bitwise_unchanged(params, before)
    torch.func.grad(lambda p: net(p, state, x, training=True)[0].sum())(params)
    _assert_bitwise_unchanged(params, before)


class _ClampsItsWeight(nn.Linear):
    """A forward that writes its own parameter under ``no_grad`` (weight clipping, as WGAN code does)."""

    def forward(self, x):
        with torch.no_grad():
            self.weight.clamp_(-0.1, 0.1)
        return super().forward(x)


def test_a_forward_writing_its_weight_in_place_leaves_the_callers_params_bitwise_unchanged_in_every_route():
    torch.manual_seed(0)
    net = pf.parametrize(_ClampsItsWeight(4, 3), {})
    params, state = net.init()
    before = _bitwise_copy(params)
    x = torch.randn(2, 4)
    out, _ = net(params, state, x)
    _assert_bitwise_unchanged(params, before)
    torch.testing.assert_close(out, x @ before["weight"].clamp(-0.1, 0.1).T + before["bias"])
    net.apply(params, x)
    _assert_bitwise_unchanged(params, before)
    pf.grad(lambda p: net(p, state, x)[0].sum())(params)
    _assert_bitwise_unchanged(params, before)
    stacked = pf.tree.stack([params, params])
    stacked_before = _bitwise_copy(stacked)
    torch.func.vmap(lambda p: net(p, state, x)[0])(stacked)
    _assert_bitwise_unchanged(stacked, stacked_before)


def test_a_users_parametrization_returning_its_input_does_not_let_the_forward_write_the_original():
    torch.manual_seed(0)
    net = pf.parametrize(_ClampsItsWeight(4, 3), {"weight": lambda X: X})  # the original itself, as the value
    params, state = net.init()
    before = _bitwise_copy(params)
    net(params, state, torch.randn(2, 4))
    _assert_bitwise_unchanged(params, before)


@pytest.mark.parametrize("name", ["Symmetric", "Skew", "Cayley", "MatrixExp", "SPD", "Orthogonal", "SpectralNorm",
                                  "WeightNorm", "WeightStandardization", "Positive", "Bounded", "Mask", "LowRankAdapter"])
def test_every_builtin_parametrization_returns_new_storage_so_calls_hand_it_over_without_a_copy(name):
    # pfunc.Parametrized hands chains of built-ins to the module uncopied: that is only safe if none
    # of them returns its input or a view of it
    import pfunc.parametrizations as builtins

    kwargs = {"LowRankAdapter": {"rank": 2}, "Bounded": {"low": -1.0, "high": 1.0}}.get(name, {})
    net = pf.parametrize(nn.Linear(4, 4), {"weight": getattr(builtins, name)(**kwargs)})
    assert "weight" in net._private_values
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    values, _ = net.materialize(params, state, training=True)
    produced = values["weight"].untyped_storage().data_ptr()
    for k, t in {**params, **state}.items():
        assert t.untyped_storage().data_ptr() != produced, f"{name}'s value shares storage with '{k}'"


class _ClampsItsInput(nn.Module):
    """A torch-style parametrization that writes the tensor it is handed (an in-place projection)."""

    def forward(self, X):
        with torch.no_grad():
            X.clamp_(-0.1, 0.1)
        return X


@pytest.mark.parametrize("parametrization", [_ClampsItsInput(), lambda X: X.data.mul_(0) + X], ids=["module", "plain"])
def test_a_users_parametrization_writing_its_input_does_not_write_the_callers_original(parametrization):
    torch.manual_seed(0)
    net = pf.parametrize(nn.Linear(4, 3), {"weight": parametrization}, unsafe=True)
    params, state = net.init()
    before = _bitwise_copy(params)
    x = torch.randn(2, 4)
    out, _ = net(params, state, x)
    _assert_bitwise_unchanged(params, before)
    net.materialize(params, state)
    _assert_bitwise_unchanged(params, before)
    pf.grad(lambda p: net(p, state, x)[0].sum())(params)
    _assert_bitwise_unchanged(params, before)
