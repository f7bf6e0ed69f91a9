"""Symmetric, Skew, Cayley, MatrixExp, SPD and Orthogonal: constraints, inverses, torch equivalence."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as P

import pfunc as pf
from pfunc.parametrizations import SPD, Cayley, MatrixExp, Orthogonal, Skew, Symmetric

shapes = st.tuples(st.integers(0, 2), st.integers(1, 6))


def _rand(batch, n, seed, dtype=torch.float64, m=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*((2,) * batch), n, m or n, generator=g, dtype=dtype)


@given(shapes, st.integers(0, 2**16))
def test_symmetric_and_skew_hold_on_batches_and_invert_on_their_image(shape, seed):
    X = _rand(*shape, seed)
    S, K = Symmetric()(X), Skew()(X)
    assert torch.equal(S, S.mT) and torch.equal(K, -K.mT)
    assert torch.equal(Symmetric()(Symmetric().right_inverse(S)), S)
    assert torch.equal(Skew()(Skew().right_inverse(K)), K)


@given(shapes, st.integers(0, 2**16))
def test_cayley_of_skew_is_orthogonal_with_det_one_and_inverts(shape, seed):
    Q = Cayley()(Skew()(_rand(*shape, seed)))
    n = Q.shape[-1]
    torch.testing.assert_close(Q.mT @ Q, torch.eye(n, dtype=Q.dtype).expand_as(Q), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(Q), torch.ones(Q.shape[:-2], dtype=Q.dtype))
    torch.testing.assert_close(Cayley()(Cayley().right_inverse(Q)), Q, atol=1e-8, rtol=0)


@given(shapes, st.integers(0, 2**16))
def test_spd_output_is_spd_and_right_inverse_is_exact_on_spd(shape, seed):
    A = SPD()(0.3 * _rand(*shape, seed))
    torch.testing.assert_close(A, A.mT)
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    torch.testing.assert_close(SPD()(SPD().right_inverse(A)), A, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("seed", range(20))
def test_spd_registers_on_any_weight_by_projecting_to_positive_definite_at_working_precision(seed):
    torch.manual_seed(seed)  # a random layer: most have negative eigenvalues to project away
    net = pf.parametrize(nn.Linear(4, 4), {"weight": SPD()})
    params, state = net.init()
    W = net.materialize(params, state)[0]["weight"]
    assert bool((torch.linalg.eigvalsh(W) > 0).all())


def test_matrix_exp_needs_square_matrices():
    with pytest.raises(ValueError, match="MatrixExp needs square matrices"):
        pf.parametrize(nn.Linear(3, 4), {"weight": MatrixExp()})


ORTH_SHAPES = [(5, 5), (7, 3), (3, 7), (2, 4, 4)]


def _orthogonal_module(shape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))

    return M()


@pytest.mark.parametrize("shape", ORTH_SHAPES)
@pytest.mark.parametrize("omap", ["matrix_exp", "cayley", "householder"])
@pytest.mark.parametrize("trivial", [True, False])
def test_orthogonal_equals_torch_and_is_orthogonal(shape, omap, trivial):
    torch.manual_seed(0)
    m = _orthogonal_module(shape)
    torch_m = P.orthogonal(copy.deepcopy(m), orthogonal_map=omap, use_trivialization=trivial)
    net = pf.parametrize(m, {"weight": Orthogonal(omap, use_trivialization=trivial)})
    params, state = pf.split_state_dict(net, torch_m.state_dict())
    W = net.materialize(params, state)[0]["weight"]
    torch.testing.assert_close(W, torch_m.weight)
    n, k = shape[-2:]
    G = W.mT @ W if n >= k else W @ W.mT
    torch.testing.assert_close(G, torch.eye(min(n, k), dtype=W.dtype).expand_as(G), atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", ORTH_SHAPES)
@pytest.mark.parametrize("omap", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_assign_is_exact_for_any_orthogonal_value(shape, omap):
    m = _orthogonal_module(shape)
    net = pf.parametrize(m, {"weight": Orthogonal(omap)})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    n, k = shape[-2:]
    Q, _ = torch.linalg.qr(torch.randn(*shape[:-2], max(n, k), min(n, k), dtype=torch.float64))
    Q = Q if n >= k else Q.mT
    Q = torch.cat([-Q[..., :1, :], Q[..., 1:, :]], dim=-2)  # also det -1 when square
    p2, s2 = net.assign(params, state, {"weight": Q})
    torch.testing.assert_close(net.materialize(p2, s2)[0]["weight"], Q, atol=1e-10, rtol=0)


@pytest.mark.parametrize("omap", ["matrix_exp", "cayley"])
def test_orthogonal_gradient_is_zero_on_the_unused_triangle(omap):
    m = _orthogonal_module((5, 5))
    net = pf.parametrize(m, {"weight": Orthogonal(omap)})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, dtype=torch.float64)
    g = torch.func.grad(lambda p: (net.apply(net.materialize(p, state)[0], x) if False else net.materialize(p, state)[0]["weight"] @ x.T).pow(2).sum())(params)
    g = g["parametrizations.weight.original"]
    assert torch.equal(g.triu(1), torch.zeros_like(g))


def test_orthogonal_without_trivialization_refuses_assign_for_exp_and_cayley():
    net = pf.parametrize(_orthogonal_module((4, 4)), {"weight": Orthogonal("cayley", use_trivialization=False)}, unsafe=True)
    params, state = net.init()
    with pytest.raises(NotImplementedError, match="use_trivialization=False"):
        net.assign(params, state, {"weight": torch.eye(4, dtype=torch.float64)})


def test_orthogonal_errors_name_the_tensor():
    class V(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(3))

    with pytest.raises(ValueError, match="'v'.*1 dimensions"):
        pf.parametrize(V(), {"v": Orthogonal()})
    with pytest.raises(ValueError, match="orthogonal_map has to be one of"):
        Orthogonal("qr")


def test_householder_stays_orthogonal_after_weight_decay_moves_the_diagonal_where_torchs_does_not():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    torch_layer = P.orthogonal(copy.deepcopy(layer), orthogonal_map="householder")
    net = pf.parametrize(layer, {"weight": Orthogonal("householder")})
    params, state = pf.split_state_dict(net, torch_layer.state_dict())
    assert torch.equal(net.materialize(params, state)[0]["weight"], torch_layer.weight)   # +-1 diagonal: equal
    # one AdamW step with weight decay, on both: the stored diagonal leaves {-1, +1}
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    x = torch.randn(8, 4)
    for model_params, loss in (
        (list(params.values()), lambda: net(params, state, x)[0].pow(2).sum()),
        (list(torch_layer.parameters()), lambda: torch_layer(x).pow(2).sum()),
    ):
        opt = torch.optim.AdamW(model_params, lr=1e-3, weight_decay=0.01)
        loss().backward()
        opt.step()
    eye = torch.eye(4)
    W = net.materialize(params, state)[0]["weight"].detach()
    torch.testing.assert_close(W.T @ W, eye)
    Wt = torch_layer.weight.detach()
    assert not torch.allclose(Wt.T @ Wt, eye, atol=1e-3)   # torch's .int() zeroed columns
