"""SpectralNorm (torch and BigGAN modes), WeightNorm, WeightStandardization against torch and the seeds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as P

import pfunc as pf
from pfunc.parametrizations import SpectralNorm, WeightNorm, WeightStandardization


@pytest.mark.parametrize(
    "layer, expected_dim",
    [
        (nn.Linear(4, 3), 0),
        (nn.Conv2d(3, 5, 3), 0),
        (nn.ConvTranspose1d(3, 5, 3), 1),
        (nn.ConvTranspose2d(3, 5, 3), 1),
        (nn.ConvTranspose3d(3, 5, 3), 1),
        (nn.Embedding(10, 4), 0),
    ],
)
def test_spectral_norm_dim_defaults_like_torch(layer, expected_dim):
    net = pf.parametrize(layer, {"weight": SpectralNorm()})
    assert net.chains["weight"][0].dim == expected_dim
    params, state = net.init()
    W = layer.weight.detach()
    Wm = W.movedim(expected_dim, 0).flatten(1)
    assert state["parametrizations.weight.0._u"].shape == (Wm.shape[0],)
    assert state["parametrizations.weight.0._v"].shape == (Wm.shape[1],)


def test_spectral_norm_dim_out_of_range_is_an_index_error_naming_the_tensor():
    with pytest.raises(IndexError, match="'weight'.*Dimension out of range"):
        pf.parametrize(nn.Linear(3, 3), {"weight": SpectralNorm(dim=2)})
    with pytest.raises(ValueError, match="n_power_iterations to be positive"):
        SpectralNorm(n_power_iterations=0)


@given(st.integers(0, 2**16), st.integers(1, 3), st.sampled_from([torch.float32, torch.float64]))
def test_spectral_norm_value_equals_torch_given_the_same_vectors(seed, n_iter, dtype):
    torch.manual_seed(seed)
    m = nn.Linear(5, 7).to(dtype)
    torch_m = P.spectral_norm(copy.deepcopy(m), n_power_iterations=n_iter)
    net = pf.parametrize(m, {"weight": SpectralNorm(n_power_iterations=n_iter)})
    params, state = net.init()
    params, state = pf.split_state_dict(net, torch_m.state_dict())
    # float32 rounding differs between the two (norm kernels), and power iteration amplifies it
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for training in (True, True, False):
        torch_m.train(training)
        W_t = torch_m.weight
        values, state = net.materialize(params, state, training=training)
        torch.testing.assert_close(values["weight"], W_t, **tol)
        torch.testing.assert_close(state["parametrizations.weight.0._u"], torch_m.parametrizations.weight[0]._u, **tol)


def test_spectral_norm_eval_never_changes_state_and_training_does():
    net = pf.parametrize(nn.Linear(6, 6), {"weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    # make the state not yet converged
    state = {**state, "parametrizations.weight.0._v": F.normalize(torch.randn(6), dim=0)}
    _, s_eval = net.materialize(params, state, training=False)
    assert all(torch.equal(s_eval[k], state[k]) for k in state)
    _, s_train = net.materialize(params, state, training=True)
    assert not torch.equal(s_train["parametrizations.weight.0._u"], state["parametrizations.weight.0._u"])


def test_spectral_norm_warmup_gives_unit_norm_at_init():
    net = pf.parametrize(nn.Linear(20, 30), {"weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    W = net.materialize(params, state, training=False)[0]["weight"]
    assert abs(torch.linalg.matrix_norm(W, ord=2).item() - 1.0) < 5e-2  # 15 warm-up iterations, no more


def test_spectral_norm_of_a_vector_is_its_normalisation_without_state():
    class WithVector(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(5))

    net = pf.parametrize(WithVector(), {"v": SpectralNorm()})
    params, state = net.init()
    assert state == {}
    v = net.materialize(params, state)[0]["v"]
    torch.testing.assert_close(v, F.normalize(params["parametrizations.v.original"], dim=0))


def test_spectral_norm_state_is_a_buffer_and_the_weight_gets_grads_through_sigma():
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    torch_m = P.spectral_norm(copy.deepcopy(m))
    net, params, state = pf.from_torch(torch_m)
    x = torch.randn(3, 4)
    torch_m.train()
    torch_m(x).sum().backward()
    g = torch.func.grad(lambda p: net(p, state, x, training=True)[0].sum())(params)
    torch.testing.assert_close(g["parametrizations.weight.original"], torch_m.parametrizations.weight.original.grad)


def test_spectral_norm_load_state_dict_from_torch_checkpoint_restores_values():
    torch.manual_seed(0)
    torch_m = P.spectral_norm(nn.Linear(3, 5))
    for _ in range(3):
        torch_m(torch.randn(2, 3))
    torch_m.eval()
    net = pf.parametrize(nn.Linear(3, 5), {"weight": SpectralNorm()})
    params, state = pf.split_state_dict(net, torch_m.state_dict())
    torch.testing.assert_close(net.materialize(params, state, training=False)[0]["weight"], torch_m.weight)


def test_biggan_mode_state_logs_singular_values_only_in_training():
    layer = nn.Conv2d(3, 8, 3)
    sn = SpectralNorm.biggan(num_svs=3, num_itrs=2)
    net = pf.parametrize(layer, {"weight": sn})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    assert state["parametrizations.weight.0.u"].shape == (3, 8)
    assert torch.equal(state["parametrizations.weight.0.sv"], torch.ones(3))
    _, s_eval = net.materialize(params, state, training=False)
    assert all(torch.equal(s_eval[k], state[k]) for k in state)
    for _ in range(50):
        _, state = net.materialize(params, state, training=True)
    W = layer.weight.detach().reshape(8, -1)
    torch.testing.assert_close(sn.singular_values({"sv": state["parametrizations.weight.0.sv"]}), torch.linalg.svdvals(W)[:3], rtol=1e-3, atol=1e-4)


def test_biggan_transpose_views_the_weight_transposed():
    sn = SpectralNorm.biggan(transpose=True)
    W = torch.randn(4, 3, 2, 2)
    assert sn.matrix(W).shape == (12, 4)
    state = sn.init_state(W, generator=torch.Generator().manual_seed(0))
    assert state["u"].shape == (1, 12)


@pytest.mark.parametrize("dim", [0, 1, None, -1])
def test_weight_norm_matches_torch_for_every_dim(dim):
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3)
    torch_m = P.weight_norm(copy.deepcopy(m), dim=dim)
    net = pf.parametrize(m, {"weight": WeightNorm(dim)})
    params, state = net.init()
    for k, v in torch_m.state_dict().items():
        torch.testing.assert_close((params | state)[k], v)
    torch.testing.assert_close(net.materialize(params, state)[0]["weight"], torch_m.weight)
    x = torch.randn(2, 3, 6, 6)
    torch_m(x).pow(2).sum().backward()
    g = torch.func.grad(lambda p: net(p, state, x)[0].pow(2).sum())(params)
    for k, p in torch_m.named_parameters():
        torch.testing.assert_close(g[k], p.grad, atol=1e-5, rtol=1e-4)


def _seed_weight_standardized(weight, x_dtype):
    eps = 1e-5 if x_dtype == torch.float32 else 1e-3
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (weight - mean) * (var + eps).rsqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_standardization_equals_the_seeds_conv(dtype):
    conv = nn.Conv2d(3, 6, 3, padding=1).to(dtype)
    net = pf.parametrize(conv, {"weight": WeightStandardization()})
    params, state = net.init()
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    expected = F.conv2d(x, _seed_weight_standardized(conv.weight, dtype), conv.bias, padding=1)
    torch.testing.assert_close(net(params, state, x)[0], expected)
    W = net.materialize(params, state)[0]["weight"]
    torch.testing.assert_close(W.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=dtype), atol=1e-6, rtol=0)


def test_weight_standardization_uses_the_autocast_dtype_for_eps():
    W = torch.randn(4, 3, 3, 3)
    ws = WeightStandardization()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ws(W)
    torch.testing.assert_close(out, _seed_weight_standardized(W, torch.bfloat16))


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_eager_is_bitwise_torchs_fused_kernel_and_vmap_matches_a_loop(dim):
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3)
    torch_m = P.weight_norm(copy.deepcopy(m), dim=dim)
    net = pf.parametrize(m, {"weight": WeightNorm(dim)})
    params, state = pf.split_state_dict(net, torch_m.state_dict())   # torch's originals, exactly
    assert torch.equal(net.materialize(params, state)[0]["weight"], torch_m.weight)
    g = torch.stack([params["parametrizations.weight.original0"] * s for s in (0.5, 1.0, 2.0)])
    v = torch.stack([params["parametrizations.weight.original1"] + s for s in (0.0, 0.1, -0.1)])
    wn = WeightNorm(dim)
    batched = torch.func.vmap(wn)(g, v)
    torch.testing.assert_close(batched, torch.stack([wn(g[i], v[i]) for i in range(3)]))
