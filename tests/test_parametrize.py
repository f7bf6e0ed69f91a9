"""Parametrized: registration, chaining, right_inverse, removal, errors, caching, buffers.

Ports the behaviours of PyTorch's test/nn/test_parametrization.py that apply
functionally, and the parametrize tutorial's parametrizations exactly as written.
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pfunc as pf
from pfunc.parametrizations import Cayley, MatrixExp, Skew, Symmetric

# ----------------------------------------------------------------------------- the seeds' parametrizations


class SeedSymmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)

    def right_inverse(self, A):
        return A.triu()


class SeedSkew(nn.Module):
    def forward(self, X):
        A = X.triu(1)
        return A - A.transpose(-1, -2)

    def right_inverse(self, A):
        return A.triu(1)


class SeedCayleyMap(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("Id", torch.eye(n))

    def forward(self, X):
        return torch.linalg.solve(self.Id + X, self.Id - X)

    def right_inverse(self, A):  # the tutorial's version uses an undefined X; this is the intended inverse
        return torch.linalg.solve(self.Id + A, self.Id - A)


class SeedMatrixExponential(nn.Module):
    def forward(self, X):
        return torch.matrix_exp(X)


class SeedPruningParametrization(nn.Module):
    def __init__(self, X, p_drop=0.2):
        super().__init__()
        mask = torch.full_like(X, 1.0 - p_drop)
        self.mask = torch.bernoulli(mask)

    def forward(self, X):
        return X * self.mask

    def right_inverse(self, A):
        return A


class Counting(nn.Module):
    """The tutorial's NoisyParametrization, counting instead of printing.

    It runs on private shadows, so ``self.x = ...`` in its forward would change a shadow, never
    this object: it counts into a list that the shadows share with it, as printing would.
    """

    def __init__(self):
        super().__init__()
        self.log = []

    def forward(self, X):
        self.log.append(1)
        return X

    @property
    def calls(self):
        return len(self.log)

    @calls.setter
    def calls(self, n):
        del self.log[n:]


def orthogonal_det1(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    if torch.det(Q) < 0:
        Q = torch.cat([-Q[:, :1], Q[:, 1:]], dim=1)
    return Q


# ----------------------------------------------------------------------------- registration and layout


def test_symmetric_weight_is_symmetric_and_keys_follow_torch():
    layer = nn.Linear(5, 5)
    net = pf.parametrize(layer, {"weight": SeedSymmetric()})
    params, state = net.init()
    assert set(params) == {"bias", "parametrizations.weight.original"}
    values, _ = net.materialize(params, state)
    W = values["weight"]
    assert torch.equal(W, W.T)
    # the original is right_inverse(weight) = triu(weight), as torch
    assert torch.equal(params["parametrizations.weight.original"], layer.weight.detach().triu())


def test_keys_equal_the_torch_twin_state_dict_keys():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    twin = copy.deepcopy(model)
    from torch.nn.utils import parametrize as P

    P.register_parametrization(twin[0], "weight", SeedSkew())
    P.register_parametrization(twin[0], "weight", SeedCayleyMap(4))
    P.register_parametrization(twin[2], "bias", SeedSymmetric() if False else nn.Identity())
    net = pf.parametrize(model, {"0.weight": [SeedSkew(), SeedCayleyMap(4)], "2.bias": nn.Identity()})
    params, state = net.init()
    assert set(params) | set(state) == set(twin.state_dict())
    assert set(params) == {k for k, _ in twin.named_parameters()}
    assert set(state) == {k for k, _ in twin.named_buffers()}
    assert "0.parametrizations.weight.1.Id" in state


@pytest.mark.parametrize(
    "chain, check",
    [
        ([Skew(), Cayley()], "orthogonal"),
        ([SeedSkew(), SeedCayleyMap(6)], "orthogonal"),
        ([Skew(), MatrixExp()], "orthogonal"),
        ([SeedSkew(), SeedMatrixExponential()], "orthogonal"),
        ([Symmetric(), MatrixExp()], "spd"),
        ([SeedSymmetric(), SeedMatrixExponential()], "spd"),
    ],
)
def test_chains_compose_first_to_last(chain, check):
    net = pf.parametrize(nn.Linear(6, 6), {"weight": chain})
    params, state = net.init()
    W = net.materialize(params, state)[0]["weight"]
    if check == "orthogonal":
        torch.testing.assert_close(W.T @ W, torch.eye(6), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(W, W.T)
        assert bool((torch.linalg.eigvalsh(W) > 0).all())


def test_chain_order_matters():
    """forward runs first to last: Skew then Symmetric differs from Symmetric then Skew."""

    class Double:
        def forward(self, X):
            return 2 * X

    class AddOne:
        def forward(self, X):
            return X + 1

    layer = nn.Linear(3, 3)
    a = pf.parametrize(layer, {"weight": [Double(), AddOne()]})
    b = pf.parametrize(layer, {"weight": [AddOne(), Double()]})
    pa, sa = a.init()
    pb, sb = b.init()
    W = layer.weight.detach()
    torch.testing.assert_close(a.materialize(pa, sa)[0]["weight"], 2 * W + 1)
    torch.testing.assert_close(b.materialize(pb, sb)[0]["weight"], 2 * (W + 1))


def test_plain_functions_work_as_parametrizations():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": torch.tanh})
    params, state = net.init()
    W = net.materialize(params, state)[0]["weight"]
    torch.testing.assert_close(W, torch.tanh(params["parametrizations.weight.original"]))


def test_registering_sequentially_equals_torch_registration():
    """A chain [A, B] is torch's register(A) then register(B): originals = A.right_inverse(W) only."""
    from torch.nn.utils import parametrize as P

    layer = nn.Linear(4, 4)
    twin = copy.deepcopy(layer)
    P.register_parametrization(twin, "weight", SeedSkew())
    P.register_parametrization(twin, "weight", SeedCayleyMap(4))
    net = pf.parametrize(layer, {"weight": [SeedSkew(), SeedCayleyMap(4)]})
    params, state = net.init()
    torch.testing.assert_close(params["parametrizations.weight.original"], twin.parametrizations.weight.original.detach())
    torch.testing.assert_close(net.materialize(params, state)[0]["weight"], twin.weight.detach())


def test_nested_module_names_and_buffers():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 8)), nn.BatchNorm1d(8))
    net = pf.parametrize(model, {"0.0.weight": Skew() if False else torch.nn.Identity(), "1.running_var": SeedPruningParametrization(torch.ones(8), 0.5)})
    params, state = net.init()
    assert "0.0.parametrizations.weight.original" in params
    assert "1.parametrizations.running_var.original" in state  # a buffer's original is state
    out, new_state = net(params, state, torch.randn(5, 3))
    assert out.shape == (5, 8)


def test_buffer_parametrization_first_and_last_zero():
    class FirstZero(nn.Module):
        def forward(self, x):
            return torch.cat([x.new_zeros(1), x[1:]])

    class LastZero(nn.Module):
        def forward(self, x):
            return torch.cat([x[:-1], x.new_zeros(1)])

    model = nn.Linear(8, 8)
    del model.bias
    model.register_buffer("bias", torch.ones(8))
    net = pf.parametrize(model, {"bias": [FirstZero(), LastZero()]})
    params, state = net.init()
    assert set(params) == {"weight"}
    b = net.materialize(params, state)[0]["bias"]
    assert b[0] == 0 and b[-1] == 0 and bool((b[1:-1] == 1).all())
    net2, p2, s2 = net.remove(params, state, "bias", leave_parametrized=True)
    assert not pf.is_parametrized(net2)
    assert torch.equal(s2["bias"], b)


# ----------------------------------------------------------------------------- right_inverse and multiple originals


class RankOne(nn.Module):
    def forward(self, x, y):
        return x.unsqueeze(-1) @ y.unsqueeze(-2)

    def right_inverse(self, Y):
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        s0_sqrt = S[0].sqrt().unsqueeze(-1)
        return U[..., :, 0] * s0_sqrt, Vh[..., 0, :] * s0_sqrt


class Double(nn.Module):
    def forward(self, w):
        return 2.0 * w

    def right_inverse(self, w):
        return 0.5 * w


def test_multiple_originals_are_original0_original1():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": RankOne()})
    params, state = net.init()
    assert {"parametrizations.weight.original0", "parametrizations.weight.original1"} <= set(params)
    W = net.materialize(params, state)[0]["weight"]
    assert torch.linalg.matrix_rank(W).item() == 1
    with pytest.raises(ValueError, match="leave_parametrized=False"):
        net.remove(params, state, "weight", leave_parametrized=False)
    net2, p2, _ = net.remove(params, state, "weight", leave_parametrized=True)
    assert torch.linalg.matrix_rank(p2["weight"]).item() == 1 and "weight" in p2


def test_one_input_step_on_top_of_multi_input_step_and_training():
    init = torch.outer(torch.arange(1.0, 4.0), torch.arange(2.0, 5.0))
    layer = nn.Linear(3, 3)
    net = pf.parametrize(layer, {"weight": [RankOne(), Double()]})
    params, state = net.init(values={"weight": init})
    torch.testing.assert_close(net.materialize(params, state)[0]["weight"], 2 * init)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    before = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(2):
        opt.zero_grad()
        values, _ = net.materialize(params, state)
        (values["weight"].T @ values["bias"]).sum().backward()
        opt.step()
    assert all(not torch.equal(before[k], params[k]) for k in params)


def test_one_element_sequence_gives_original0():
    class SequenceLen1(nn.Module):
        def forward(self, x):
            return x

        def right_inverse(self, w):
            return (w,)

    net = pf.parametrize(nn.Linear(3, 4), {"weight": SequenceLen1()})
    params, _ = net.init()
    assert "parametrizations.weight.original0" in params
    assert "parametrizations.weight.original1" not in params


def test_assign_runs_right_inverse_last_to_first_and_is_exact_on_the_image():
    net = pf.parametrize(nn.Linear(5, 5), {"weight": [Skew(), Cayley()]})
    params, state = net.init()
    Q = orthogonal_det1(5)
    p2, s2 = net.assign(params, state, {"weight": Q})
    torch.testing.assert_close(net.materialize(p2, s2)[0]["weight"], Q, atol=1e-5, rtol=0)
    # the caller's params are unchanged
    assert not torch.equal(params["parametrizations.weight.original"], p2["parametrizations.weight.original"])


def test_assign_without_right_inverse_is_a_clear_error():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": [Skew(), MatrixExp()]})
    params, state = net.init()
    with pytest.raises(RuntimeError, match="MatrixExp does not implement right_inverse"):
        net.assign(params, state, {"weight": torch.eye(3)})


def test_parametrization_without_right_inverse_is_identity_at_registration():
    layer = nn.Linear(3, 3)
    net = pf.parametrize(layer, {"weight": MatrixExp()})
    params, _ = net.init()
    assert torch.equal(params["parametrizations.weight.original"], layer.weight.detach())


def test_pruning_relaxed_right_inverse_behaves_as_the_seed():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4)
    pruning = SeedPruningParametrization(layer.weight)
    net = pf.parametrize(layer, {"weight": pruning})
    params, state = net.init()
    X = torch.rand_like(layer.weight)
    p2, s2 = net.assign(params, state, {"weight": X})
    W = net.materialize(p2, s2)[0]["weight"]
    torch.testing.assert_close(W, X * pruning.mask)  # the assigned tensor comes out pruned
    assert torch.equal(p2["parametrizations.weight.original"], X)


def test_right_inverse_that_assigns_a_buffer_updates_state_not_the_module():
    """torch's test_initialization_parametrization: right_inverse sets self.B."""

    class OrthogonalB(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("B", torch.eye(n))

        def forward(self, X):
            Id = torch.eye(X.size(0))
            return self.B @ torch.linalg.solve(Id + X, Id - X)

        def right_inverse(self, X):
            if not torch.allclose(X.T @ X, torch.eye(X.size(0)), atol=1e-4):
                raise ValueError("The input is not orthogonal.")
            self.B = X
            return torch.zeros_like(X)

    p = OrthogonalB(5)
    net = pf.parametrize(nn.Linear(5, 5), {"weight": [Skew(), p]})
    params, state = net.init()
    with pytest.raises(ValueError, match="not orthogonal"):
        net.assign(params, state, {"weight": torch.rand(5, 5)})
    Q = orthogonal_det1(5, seed=3)
    p2, s2 = net.assign(params, state, {"weight": Q})
    torch.testing.assert_close(net.materialize(p2, s2)[0]["weight"], Q)
    torch.testing.assert_close(s2["parametrizations.weight.1.B"], Q)
    assert torch.equal(p.B, torch.eye(5))  # the parametrization module itself is untouched
    assert torch.equal(state["parametrizations.weight.1.B"], torch.eye(5))


@given(st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_forward_of_right_inverse_is_identity_on_symmetric_matrices(n, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    A = A + A.T
    net = pf.parametrize(nn.Linear(n, n), {"weight": SeedSymmetric()})
    params, state = net.init()
    p2, s2 = net.assign(params, state, {"weight": A})
    assert torch.equal(net.materialize(p2, s2)[0]["weight"], A)


# ----------------------------------------------------------------------------- removal and queries


def test_remove_leave_parametrized_false_restores_the_original():
    layer = nn.Linear(3, 3)
    net = pf.parametrize(layer, {"weight": SeedSkew()})
    params, state = net.init()
    net2, p2, s2 = net.remove(params, state, "weight", leave_parametrized=False)
    assert torch.equal(p2["weight"], layer.weight.detach().triu(1))  # right_inverse(weight) is what was kept
    assert set(p2) == {"weight", "bias"} and not pf.is_parametrized(net2)


def test_remove_leave_parametrized_true_keeps_the_value_and_it_trains_unconstrained():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": SeedSkew()})
    params, state = net.init()
    skew = net.materialize(params, state)[0]["weight"]
    net2, p2, s2 = net.remove(params, state, "weight")
    torch.testing.assert_close(p2["weight"], skew)
    assert p2["weight"].requires_grad and p2["weight"].is_leaf


def test_remove_one_of_several_keeps_the_others():
    class FirstZero(nn.Module):
        def forward(self, x):
            return torch.cat([x.new_zeros(1), x[1:]])

    net = pf.parametrize(nn.Linear(4, 4), {"weight": [SeedSkew(), SeedCayleyMap(4)], "bias": FirstZero()})
    params, state = net.init()
    net2, p2, s2 = net.remove(params, state, "weight", leave_parametrized=False)
    assert pf.is_parametrized(net2) and pf.is_parametrized(net2, "bias") and not pf.is_parametrized(net2, "weight")
    assert "parametrizations.weight.1.Id" not in s2
    assert net2.materialize(p2, s2)[0]["bias"][0] == 0


def test_is_parametrized_matches_torch_on_torch_modules():
    from torch.nn.utils import parametrize as P

    model = nn.Sequential(nn.Linear(3, 3))
    assert not pf.is_parametrized(model)
    P.register_parametrization(model[0], "weight", SeedSkew())
    assert pf.is_parametrized(model) and pf.is_parametrized(model, "0.weight")
    assert not pf.is_parametrized(model, "0.bias") and not pf.is_parametrized(model, "nope.weight")


def test_unsafe_allows_shape_change_and_remove_restores():
    class Resize(nn.Module):
        def forward(self, X):
            return X[[0]]

    class NoResize(nn.Module):
        def forward(self, X):
            return X

    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="may not change the shape"):
        pf.parametrize(layer, {"weight": Resize()})
    net = pf.parametrize(layer, {"weight": Resize()}, unsafe=True)
    params, state = net.init()
    assert net.materialize(params, state)[0]["weight"].shape == (1, 8)
    net2, p2, s2 = net.register(params, state, "weight", NoResize())  # safe on top of unsafe
    net3, p3, _ = net2.remove(p2, s2, "weight", leave_parametrized=False)
    assert torch.equal(p3["weight"], layer.weight.detach())


def test_unsafe_dtype_changing_parametrization_works():
    class ToDouble(nn.Module):
        def forward(self, X):
            return X.double()

    net = pf.parametrize(nn.Linear(3, 3), {"weight": ToDouble()}, unsafe=True)
    params, state = net.init()
    assert net.materialize(params, state)[0]["weight"].dtype == torch.float64


# ----------------------------------------------------------------------------- errors (torch's error tests)


class Identity(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "parametrization, error, match",
    [
        ("Sum", None, None),
        ("WrongNumberParams", TypeError, "positional argument"),
        ("WrongRightInverse", ValueError, "Tensor or a Sequence of"),
        ("WrongRightInverseSequence", ValueError, "of the sequence with type"),
        ("ChangeDtypeInverse", ValueError, "outputs one tensor, it may not change the dtype"),
        ("ChangeDeviceInverse", ValueError, "outputs one tensor, it may not change the device"),
        ("NotTensor", ValueError, "must return a tensor"),
        ("ChangeDtype", ValueError, "may not change the dtype"),
        ("ChangeShape", ValueError, "may not change the shape"),
        ("ChangeDtypeMulti", ValueError, "may not change the dtype"),
    ],
)
def test_errors_on_unparametrized_tensor_name_it_and_change_nothing(parametrization, error, match):
    class Sum(nn.Module):
        def forward(self, x, y):
            return x + y

        def right_inverse(self, z):
            return z, torch.zeros_like(z)

    class WrongNumberParams(nn.Module):
        def forward(self, x, y, z):
            return x + y + z

        def right_inverse(self, w):
            return w, torch.zeros_like(w)

    class WrongRightInverse(Identity):
        def right_inverse(self, z):
            return None

    class WrongRightInverseSequence(nn.Module):
        def forward(self, x, y):
            return x

        def right_inverse(self, z):
            return None, z

    class ChangeDtypeInverse(nn.Module):
        def forward(self, x):
            return x.float()

        def right_inverse(self, w):
            return w.bool()

    class ChangeDeviceInverse(nn.Module):
        def forward(self, x):
            return x.float()

        def right_inverse(self, w):
            return w.to(torch.device("meta"))

    class NotTensor(nn.Module):
        def forward(self, x):
            return 2

    class ChangeDtype(nn.Module):
        def forward(self, x):
            return x.bool()

    class ChangeShape(nn.Module):
        def forward(self, x):
            return x[:-1]

    class ChangeDtypeMulti(nn.Module):
        def forward(self, x, y):
            return (x + y).bool()

        def right_inverse(self, w):
            return w, w + 1

    module = nn.Linear(3, 4)
    weight = module.weight.detach().clone()
    p = locals()[parametrization]()
    if error is None:
        net = pf.parametrize(module, {"weight": p})
        assert pf.is_parametrized(net, "weight")
    else:
        with pytest.raises(error, match=match):
            pf.parametrize(module, {"weight": p})
    assert torch.equal(module.weight, weight) and type(module) is nn.Linear


def test_errors_on_parametrized_tensor_keep_the_chain():
    class WrongReturn(nn.Module):
        def forward(self, x):
            return x, x

    class ChangeDtype(nn.Module):
        def forward(self, x):
            return x.bool()

    class ChangeShape(nn.Module):
        def forward(self, x):
            return x[:-1]

    class WrongReturnInverse(Identity):
        def right_inverse(self, x):
            return x, x

    class ChangeDtypeInverse(Identity):
        def right_inverse(self, x):
            return x.bool()

    class ChangeShapeInverse(Identity):
        def right_inverse(self, x):
            return x[:-1]

    net = pf.parametrize(nn.Linear(3, 4), {"weight": Identity()})
    params, state = net.init()
    cases = [
        (WrongReturn(), "must return a tensor"),
        (ChangeDtype(), "may not change the dtype"),
        (ChangeShape(), "may not change the shape"),
        (WrongReturnInverse(), "right_inverse must return a tensor"),
        (ChangeDtypeInverse(), "must have the same dtype"),
        (ChangeShapeInverse(), "must have the same shape"),
    ]
    for p, match in cases:
        with pytest.raises(ValueError, match=match):
            net.register(params, state, "weight", p)
        assert len(net.chains["weight"]) == 1


def test_unknown_names_are_value_errors_naming_them():
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="does not have a parameter, a buffer, or a parametrized element with name 'foo'"):
        pf.parametrize(layer, {"foo": Identity()})
    net = pf.parametrize(layer, {"weight": Identity()})
    params, state = net.init()
    with pytest.raises(ValueError, match="does not have a parametrization on bias"):
        net.remove(params, state, "bias")
    with pytest.raises(ValueError, match="name 'nope'"):
        net.remove(params, state, "nope")
    with pytest.raises(ValueError, match="name 'nope'"):
        net.assign(params, state, {"nope": torch.zeros(3)})


def test_bad_trees_are_key_errors_naming_keys_and_lose_nothing():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": Skew()})
    params, state = net.init()
    broken = dict(params)
    del broken["bias"]
    broken["bais"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"missing \['bias'\].*unexpected \['bais'\]"):
        net(broken, state, torch.randn(2, 3))
    assert "bais" in broken and "bias" not in broken  # the caller's dict is as it was


def test_assign_with_wrong_shape_names_the_tensor():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": Skew()})
    params, state = net.init()
    with pytest.raises(ValueError, match="'bias' has shape"):
        net.assign(params, state, {"bias": torch.zeros(4)})
    with pytest.raises(TypeError, match="must be a Tensor"):
        net.assign(params, state, {"weight": [[0.0]]})


def test_no_grad_original_stays_no_grad():
    class SplitAndCat(nn.Module):
        def right_inverse(self, x):
            return torch.split(x, x.shape[1] // 2, dim=1)

        def forward(self, x0, x1):
            return torch.cat([x0, x1], dim=1)

    model = nn.Linear(8, 8)
    model.weight.requires_grad_(False)
    net = pf.parametrize(model, {"weight": SplitAndCat()})
    params, state = net.init()
    assert not params["parametrizations.weight.original0"].requires_grad
    assert not params["parametrizations.weight.original1"].requires_grad
    assert params["bias"].requires_grad
    assert torch.equal(net.materialize(params, state)[0]["weight"], model.weight)


# ----------------------------------------------------------------------------- caching and tied weights


def test_materialize_is_the_cache_one_computation_for_many_uses():
    counter = Counting()
    net = pf.parametrize(nn.Linear(4, 4), {"weight": counter})
    params, state = net.init()
    counter.calls = 0
    values, state = net.materialize(params, state)
    x = torch.randn(2, 4)
    for _ in range(10):  # an RNN-like loop reusing the weight
        x = torch.tanh(net.apply(values, x))
    assert counter.calls == 1
    net(params, state, x)
    net(params, state, x)
    assert counter.calls == 3  # uncached: once per call


def test_tied_weights_are_parametrized_once_and_shared():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4, bias=False)
            self.dec = nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(self.enc(x))

    counter = Counting()
    model = Tied()
    net = pf.parametrize(model, {"dec.weight": [SeedSymmetric(), counter]})  # the alias name works too
    params, state = net.init()
    assert set(params) == {"enc.parametrizations.weight.original"}
    counter.calls = 0
    out, _ = net(params, state, torch.eye(4))
    assert counter.calls == 1
    W = net.materialize(params, state)[0]["enc.weight"]
    torch.testing.assert_close(out, W @ W)  # both layers used the parametrized value (x W^T W^T, W symmetric)
    with pytest.raises(ValueError, match="same \\(tied\\) tensor"):
        pf.parametrize(model, {"enc.weight": SeedSymmetric(), "dec.weight": SeedSkew()})


def test_grads_reach_originals_only_through_the_parametrization():
    net = pf.parametrize(nn.Linear(4, 4), {"weight": Skew()})
    params, state = net.init()
    x = torch.randn(3, 4)
    grads = torch.func.grad(lambda p: net(p, state, x)[0].pow(2).sum())(params)
    g = grads["parametrizations.weight.original"]
    assert torch.equal(g.tril(), torch.zeros_like(g))  # Skew reads only the strict upper triangle
    assert g.triu(1).abs().sum() > 0


def test_module_buffers_update_in_new_state_not_in_the_callers_state():
    net = pf.parametrize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), {"0.weight": Skew() if False else Identity()})
    params, state = net.init()
    before = state["1.running_mean"].clone()
    _, new_state = net(params, state, torch.randn(8, 3) + 3)
    assert torch.equal(state["1.running_mean"], before)
    assert not torch.equal(new_state["1.running_mean"], before)
    assert new_state["1.num_batches_tracked"] == 1


def test_a_parametrized_net_pickles_and_round_trips_with_its_trees(tmp_path):
    import pickle

    net = pf.parametrize(nn.Linear(3, 3), {"weight": [Skew(), Cayley()]})
    params, state = net.init()
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps((net, params, state)))
    net2, p2, s2 = pickle.loads(path.read_bytes())
    x = torch.randn(2, 3)
    torch.testing.assert_close(net2(p2, s2, x)[0], net(params, state, x)[0])
    net3 = copy.deepcopy(net)
    assert list(net3.chains) == ["weight"]
