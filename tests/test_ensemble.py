"""Ensembles: stacked members under vmap equal the per-member loop (forward, grad, training-mode SN)."""

import copy

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
