"""Power iteration: pure, vmappable, differentiable, and converging to the top singular values."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from pfunc import power


def _with_spectrum(s, seed, h=None, w=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    h, w = h or k + 2, w or k + 1
    U, _ = torch.linalg.qr(torch.randn(h, k, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(w, k, generator=g, dtype=dtype))
    return U @ torch.diag(torch.tensor(s, dtype=dtype)) @ V.T


@given(st.integers(0, 2**16), st.floats(1.5, 10.0))
def test_sigma_converges_to_the_largest_singular_value_with_a_spectral_gap(seed, top):
    W = _with_spectrum([top, 1.0, 0.5], seed)
    g = torch.Generator().manual_seed(seed)
    u = power.normalize(torch.randn(W.shape[0], generator=g, dtype=W.dtype), 1e-12)
    v = power.normalize(torch.randn(W.shape[1], generator=g, dtype=W.dtype), 1e-12)
    u, v = power.power_iteration(W, u, v, 200)
    torch.testing.assert_close(power.sigma(W, u, v), torch.linalg.matrix_norm(W, ord=2), rtol=1e-6, atol=1e-9)


def test_power_iteration_does_not_write_its_inputs():
    W = torch.randn(5, 4)
    u, v = torch.randn(5), torch.randn(4)
    kept = (W.clone(), u.clone(), v.clone())
    versions = (W._version, u._version, v._version)
    power.power_iteration(W, u, v, 3)
    assert (W._version, u._version, v._version) == versions
    assert all(torch.equal(a, b) for a, b in zip(kept, (W, u, v)))


def test_vmap_over_a_stack_of_matrices_equals_the_loop():
    K = 16
    g = torch.Generator().manual_seed(0)
    Ws = torch.randn(K, 32, 24, generator=g)
    us = power.normalize(torch.randn(K, 32, generator=g), 1e-12)
    vs = power.normalize(torch.randn(K, 24, generator=g), 1e-12)

    def sn(W, u, v):
        u, v = power.power_iteration(W, u, v, 30)
        return power.sigma(W, u, v)

    batched = torch.func.vmap(sn)(Ws, us, vs)
    looped = torch.stack([sn(Ws[i], us[i], vs[i]) for i in range(K)])
    torch.testing.assert_close(batched, looped)


def test_gradient_flows_only_through_sigma():
    W = torch.randn(4, 3, dtype=torch.float64)
    u = power.normalize(torch.randn(4, dtype=torch.float64), 1e-12)
    v = power.normalize(torch.randn(3, dtype=torch.float64), 1e-12)
    u, v = power.power_iteration(W, u, v, 100)
    g = torch.func.grad(lambda W: power.sigma(W, *power.power_iteration(W, u, v, 1)))(W)
    # d sigma / dW = u v^T for detached singular vectors
    u1, v1 = power.power_iteration(W, u, v, 1)
    torch.testing.assert_close(g, torch.outer(u1, v1))


@given(st.integers(0, 2**16))
def test_biggan_iteration_finds_the_top_k_singular_values(seed):
    W = _with_spectrum([5.0, 3.0, 1.0, 0.2], seed, h=7, w=6)
    us = torch.randn(3, 7, generator=torch.Generator().manual_seed(seed), dtype=W.dtype)
    for _ in range(300):
        svs, us, vs = power.biggan_power_iteration(W, us)
    torch.testing.assert_close(svs, torch.linalg.svdvals(W)[:3], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(us @ us.T, torch.eye(3, dtype=W.dtype), atol=1e-8, rtol=0)  # orthonormal


@given(st.integers(0, 2**16), st.integers(1, 3), st.sampled_from([torch.float32, torch.float64]))
def test_outside_vmap_values_and_vectors_are_bitwise_torchs_spectral_norm(seed, n_iter, dtype):
    import torch.nn.utils.parametrizations as P
    from torch import nn

    torch.manual_seed(seed)
    layer = P.spectral_norm(nn.Linear(9, 6).to(dtype), n_power_iterations=n_iter).train()
    sn = layer.parametrizations.weight[0]
    W = layer.parametrizations.weight.original.detach()
    u, v = sn._u.clone(), sn._v.clone()
    Wn = layer.weight  # torch's training-mode forward: n_iter iterations written into its buffers
    u, v = power.power_iteration(W, u, v, n_iter, sn.eps)
    assert torch.equal(u, sn._u) and torch.equal(v, sn._v)
    assert torch.equal(W / power.sigma(W, u, v), Wn)


def test_power_iteration_detaches_what_autograd_tracks_and_returns_no_graph():
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    u = power.normalize(torch.randn(5, dtype=torch.float64), 1e-12)
    v = power.normalize(torch.randn(4, dtype=torch.float64), 1e-12).requires_grad_()
    u1, v1 = power.power_iteration(W, u, v, 2)
    assert u1.grad_fn is None and v1.grad_fn is None and not u1.requires_grad and not v1.requires_grad
    u0, v0 = power.power_iteration(W, u, v, 0)   # no iterations: the vectors as given, detached
    assert not v0.requires_grad and torch.equal(v0, v) and torch.equal(u0, u)
    inside = torch.func.grad(lambda W: sum(x.sum() for x in power.power_iteration(W, u, v, 2)))(W)
    assert torch.equal(inside, torch.zeros_like(W))   # torch.func.grad: the iteration carries no gradient
