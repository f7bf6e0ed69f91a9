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
