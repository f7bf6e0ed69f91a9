"""Whole-model spectral norm: which tensors the spec selects, that it registers, and the logged singular values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pfunc as pf
from pfunc.parametrizations import SpectralNorm
from pfunc.spectral import is_weight_matrix, singular_values, spectral_norm_spec
from pfunc.tree import step_key


class ProjectionDiscriminator(nn.Module):
    """Conv trunk, linear head, class embedding: every layer type BigGAN's SN covers."""

    def __init__(self, classes=5):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 1)
        self.embed = nn.Embedding(classes, 8)

    def forward(self, x, y):
        h = self.norm(self.trunk(x)).relu().mean(dim=(2, 3))
        return self.head(h).squeeze(-1) + (self.embed(y) * h).sum(-1)


def test_spec_selects_every_weight_of_the_layer_types_and_no_bias_or_norm_parameter():
    D = ProjectionDiscriminator()
    spec = spectral_norm_spec(D)
    assert list(spec) == ["trunk.0.weight", "trunk.2.weight", "head.weight", "embed.weight"]
    assert all(isinstance(sn, SpectralNorm) for sn in spec.values())


def test_include_filter_and_layer_types_drop_embeddings():
    D = ProjectionDiscriminator()
    no_embed = spectral_norm_spec(D, include=lambda name, layer, t: t.ndim >= 2 and not isinstance(layer, nn.Embedding))
    assert list(no_embed) == ["trunk.0.weight", "trunk.2.weight", "head.weight"]
    assert list(spectral_norm_spec(D, layer_types=(nn.Linear, nn.Conv2d))) == list(no_embed)
    assert list(spectral_norm_spec(D, layer_types=nn.Linear)) == ["head.weight"]
    biases_too = spectral_norm_spec(D, layer_types=(nn.Linear,), include=lambda name, layer, t: True)
    assert list(biases_too) == ["head.weight", "head.bias"]


def test_biggan_options_reach_every_registered_tensor():
    D = ProjectionDiscriminator()
    net = pf.parametrize(D, spectral_norm_spec(D, SpectralNorm.biggan(num_svs=3, num_itrs=2, eps=1e-8)))
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    rows = {"trunk.0.weight": 8, "trunk.2.weight": 8, "head.weight": 1, "embed.weight": 5}
    for name, h in rows.items():
        fn = net.chains[name][0]
        assert (fn.mode, fn.num_svs, fn.n_power_iterations, fn.eps) == ("biggan", 3, 2, 1e-8)
        assert state[step_key(name, 0, "u")].shape == (3, h)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    out, state = net(params, state, x, y, training=True)
    assert out.shape == (4,)


def test_tied_weights_appear_once_under_their_first_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.readout = nn.Linear(4, 10, bias=False)
            self.readout.weight = self.embed.weight

        def forward(self, tokens):
            return self.readout(self.embed(tokens))

    m = Tied()
    with torch.no_grad():   # a spectral gap, so 15 warm-up iterations reach sigma_max (not luck of the RNG)
        m.embed.weight.copy_(_with_gap((10, 4), 0))
    spec = spectral_norm_spec(m)
    assert list(spec) == ["embed.weight"]
    net = pf.parametrize(m, spec)
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([0, 3, 9])
    out, _ = net(params, state, tokens, training=False)
    values, _ = net.materialize(params, state, training=False)
    Wn = values["embed.weight"]
    assert abs(float(torch.linalg.matrix_norm(Wn.detach(), ord=2)) - 1.0) < 1e-3
    torch.testing.assert_close(out, Wn[tokens] @ Wn.T)  # both uses of the tied tensor are normalised


def _with_gap(shape, seed):
    """A random tensor of ``shape`` whose matrix view has singular values 2, 1, 1/2, ... (a gap of 2)."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(h, w)
    U, _ = torch.linalg.qr(torch.randn(h, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(w, k, generator=g, dtype=torch.float64))
    s = 2.0 ** -torch.arange(-1, k - 1, dtype=torch.float64)
    return ((U * s) @ V.T).reshape(shape)


@given(st.integers(1, 2), st.integers(2, 9), st.integers(2, 9), st.integers(0, 2**16))
def test_every_selected_weight_has_spectral_norm_one_once_power_iteration_converged(num_svs, a, b, seed):
    m = nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, a), nn.Conv1d(a, b, 3)).double()
    net = pf.parametrize(m, spectral_norm_spec(m, SpectralNorm.biggan(num_svs, num_itrs=60)))
    weights = {name: _with_gap(m.get_parameter(name).shape, seed + i) for i, name in enumerate(net.chains)}
    params, state = net.init(generator=torch.Generator().manual_seed(seed), values=weights)
    values, _ = net.materialize(params, state, training=True)
    assert list(values) and set(net.chains) == {"0.weight", "2.weight", "3.weight"}
    for name in net.chains:
        W = values[name].reshape(values[name].shape[0], -1)
        assert abs(float(torch.linalg.matrix_norm(W, ord=2)) - 1.0) < 1e-9, name


def test_torch_scheme_spec_matches_torch_spectral_norm_on_every_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    net = pf.parametrize(m, spectral_norm_spec(m))
    params, state = net.init(generator=torch.Generator().manual_seed(1))
    twin = pf.to_torch(net, params, state)
    assert all(type(p[0]).__name__ == "_SpectralNorm" for p in (twin[0].parametrizations.weight, twin[2].parametrizations.weight))
    x = torch.randn(4, 6)
    out, state = net(params, state, x, training=True)
    torch.testing.assert_close(out, twin.train()(x))


# ---------------------------------------------------------------------------------- singular_values
def _trained_step(num_svs=2):
    D = ProjectionDiscriminator()
    net = pf.parametrize(D, spectral_norm_spec(D, SpectralNorm.biggan(num_svs=num_svs)))
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    return net, params, state, x, y


def test_singular_values_are_ones_at_init_and_the_power_iteration_estimates_after_a_training_call():
    net, params, state, x, y = _trained_step(num_svs=2)
    svs = singular_values(net, state)
    assert list(svs) == list(net.chains)
    assert all(torch.equal(sv, torch.ones(2)) for sv in svs.values())
    _, state = net(params, state, x, y, training=True)
    svs = singular_values(net, state)
    for name, sv in svs.items():
        W = params[pf.tree.original_key(name, "original")].detach()
        M = W.reshape(W.shape[0], -1)
        assert sv.shape == (2,) and not sv.requires_grad
        assert 0 < float(sv[0]) <= float(torch.linalg.matrix_norm(M, ord=2)) * (1 + 1e-5), name
        assert torch.equal(sv, state[step_key(name, 0, "sv")])


def test_singular_values_do_not_change_in_eval():
    net, params, state, x, y = _trained_step()
    _, state = net(params, state, x, y, training=True)
    before = singular_values(net, state)
    _, state2 = net(params, state, x, y, training=False)
    after = singular_values(net, state2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_singular_values_of_a_stacked_ensemble_state_have_a_member_dim():
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    net = pf.parametrize(m, spectral_norm_spec(m, SpectralNorm.biggan(num_svs=2)))
    params, state = pf.ensemble.init(net, pf.ensemble.generators(0, 4))
    _, state = pf.ensemble.call(net, params, state, torch.randn(5, 3), training=True)
    svs = singular_values(net, state)
    assert {k: tuple(v.shape) for k, v in svs.items()} == {"0.weight": (4, 2), "2.weight": (4, 2)}
    assert not torch.allclose(svs["0.weight"][0], svs["0.weight"][1])


def test_singular_values_errors_name_the_problem():
    m = nn.Linear(3, 2)
    torch_mode = pf.parametrize(m, spectral_norm_spec(m))
    _, state = torch_mode.init()
    with pytest.raises(ValueError, match="only SpectralNorm.biggan"):
        singular_values(torch_mode, state)
    biggan = pf.parametrize(m, spectral_norm_spec(m, SpectralNorm.biggan()))
    with pytest.raises(KeyError, match=r"parametrizations\.weight\.0\.sv"):
        singular_values(biggan, {})
    with pytest.raises(TypeError, match="net must be a Parametrized"):
        singular_values(m, {})


def test_spec_errors_name_the_parameter():
    m = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="no parameter of Sequential matched"):
        spectral_norm_spec(m)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        spectral_norm_spec(torch.randn(2, 2))
    with pytest.raises(TypeError, match="spectral_norm must be a SpectralNorm"):
        spectral_norm_spec(nn.Linear(2, 2), "biggan")
    with pytest.raises(TypeError, match="layer_types must be a non-empty tuple"):
        spectral_norm_spec(nn.Linear(2, 2), layer_types=())
    with pytest.raises(TypeError, match="layer_types must be a non-empty tuple"):
        spectral_norm_spec(nn.Linear(2, 2), layer_types=("Linear",))
    with pytest.raises(TypeError, match="include must be callable"):
        spectral_norm_spec(nn.Linear(2, 2), include=True)
    assert is_weight_matrix("w", nn.Linear(2, 2), torch.zeros(2, 2)) and not is_weight_matrix("b", nn.Linear(2, 2), torch.zeros(2))
