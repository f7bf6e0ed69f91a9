"""pfunc <-> torch.nn.utils.parametrize: same keys, same outputs, gradients and state updates."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize as TP

import pfunc as pf
from pfunc.parametrizations import Orthogonal, SpectralNorm, Symmetric, WeightNorm


def _model(kind: str, dtype: torch.dtype, seed: int, n_in: int, n_out: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        return nn.Conv2d(n_in, n_out, 3).to(dtype)
    if kind == "convT":
        return nn.ConvTranspose2d(n_in, n_out, 3).to(dtype)
    return nn.Linear(n_in, n_out).to(dtype)


def _input(kind: str, dtype: torch.dtype, n_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, n_in, 6, 6) if kind in ("conv", "convT") else (3, n_in)
    return torch.randn(shape, generator=g, dtype=dtype)


TORCH_BUILTINS = {
    "spectral_norm": lambda m: P.spectral_norm(m, n_power_iterations=2),
    "spectral_norm_dim1": lambda m: P.spectral_norm(m, dim=1),
    "orthogonal_matrix_exp": lambda m: P.orthogonal(m, orthogonal_map="matrix_exp"),
    "orthogonal_cayley": lambda m: P.orthogonal(m, orthogonal_map="cayley"),
    "orthogonal_householder": lambda m: P.orthogonal(m, orthogonal_map="householder"),
    "orthogonal_no_trivialization": lambda m: P.orthogonal(m, orthogonal_map="householder", use_trivialization=False),
    "weight_norm": lambda m: P.weight_norm(m),
    "weight_norm_dim_none": lambda m: P.weight_norm(m, dim=None),
}


def _assert_twins_agree(torch_module, net, params, state, x, training, dtype):
    torch_module.train(training)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    # outputs and state updates
    out_t = torch_module(x)
    out_p, new_state = net(params, state, x, training=training)
    torch.testing.assert_close(out_p, out_t, **tol)
    for k, v in torch_module.state_dict().items():
        if k in new_state:
            torch.testing.assert_close(new_state[k], v, **tol, msg=lambda m: f"state '{k}': {m}")
    # gradients (from the state before this step, like torch's backward through its forward)
    return out_p, new_state


@pytest.mark.parametrize("name", sorted(TORCH_BUILTINS))
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    n_in=st.integers(2, 5),
    n_out=st.integers(2, 5),
    training=st.booleans(),
)
def test_from_torch_matches_torch_outputs_grads_and_state(name, dtype, seed, n_in, n_out, training):
    kind = "linear"
    if name.startswith("spectral_norm_dim1"):
        kind = "convT"
    torch_module = TORCH_BUILTINS[name](_model(kind, dtype, seed, n_in, n_out))
    net, params, state = pf.from_torch(torch_module)
    x = _input(kind, dtype, n_in, seed)
    # gradients first, from identical states
    torch_module.train(training)
    ref_module = copy.deepcopy(torch_module)
    ref_module.zero_grad()
    ref_module(x).pow(2).sum().backward()
    grads = torch.func.grad(lambda p: net(p, state, x, training=training)[0].pow(2).sum())(params)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-8)
    for k, p in ref_module.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, **tol, msg=lambda m: f"grad '{k}': {m}")
    # then outputs and state, two steps
    for _ in range(2):
        _, state = _assert_twins_agree(torch_module, net, params, state, x, training, dtype)


@pytest.mark.parametrize("name", sorted(TORCH_BUILTINS))
def test_to_torch_loads_strictly_and_agrees(name):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 4, 3) if name == "spectral_norm_dim1" else nn.Linear(4, 5)
    spec = {
        "spectral_norm": SpectralNorm(n_power_iterations=2),
        "spectral_norm_dim1": SpectralNorm(),
        "orthogonal_matrix_exp": Orthogonal("matrix_exp"),
        "orthogonal_cayley": Orthogonal("cayley"),
        "orthogonal_householder": Orthogonal("householder"),
        "orthogonal_no_trivialization": Orthogonal("householder", use_trivialization=False),
        "weight_norm": WeightNorm(),
        "weight_norm_dim_none": WeightNorm(None),
    }[name]
    net = pf.parametrize(layer, {"weight": spec})
    params, state = net.init(generator=torch.Generator().manual_seed(1))
    twin = pf.to_torch(net, params, state)
    assert set(twin.state_dict()) == set(params) | set(state)
    fresh = TORCH_BUILTINS[name](copy.deepcopy(layer))
    fresh.load_state_dict({**params, **state}, strict=True)  # a torch twin built by torch loads pfunc's trees
    x = torch.randn(2, 3, 5, 5) if name == "spectral_norm_dim1" else torch.randn(3, 4)
    for training in (True, False):
        for module in (twin, fresh):
            module.train(training)
        out_p, new_state = net(params, state, x, training=training)
        torch.testing.assert_close(twin(x), out_p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fresh(x), out_p, atol=1e-5, rtol=1e-4)
        state = new_state


def test_roundtrip_of_a_user_parametrization_and_a_chain():
    class Skew(nn.Module):
        def forward(self, X):
            A = X.triu(1)
            return A - A.T

    class CayleyMap(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("Id", torch.eye(n))

        def forward(self, X):
            return torch.linalg.solve(self.Id + X, self.Id - X)

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    TP.register_parametrization(model[0], "weight", Skew())
    TP.register_parametrization(model[0], "weight", CayleyMap(4))
    P.spectral_norm(model[2])
    before = copy.deepcopy(model.state_dict())
    net, params, state = pf.from_torch(model)
    assert type(net.module[0]) is nn.Linear and not pf.is_parametrized(net.module)
    assert [s.name for s in net.chains["0.weight"].steps] == ["Skew", "CayleyMap"]
    x = torch.randn(5, 4)
    model.eval()
    torch.testing.assert_close(net(params, state, x, training=False)[0], model(x))
    back = pf.to_torch(net, params, state).eval()
    torch.testing.assert_close(back(x), model(x))
    for k, v in model.state_dict().items():  # from_torch did not touch the torch module
        assert torch.equal(v, before[k])


def test_pfunc_only_parametrizations_become_torch_modules_with_state_in_buffers():
    net = pf.parametrize(nn.Linear(6, 6), {"weight": [Symmetric(), SpectralNorm.biggan(num_svs=2)]})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    twin = pf.to_torch(net, params, state)
    assert set(twin.state_dict()) == set(params) | set(state)
    x = torch.randn(3, 6)
    twin.train()
    out_t = twin(x)
    out_p, new_state = net(params, state, x, training=True)
    torch.testing.assert_close(out_t, out_p)
    torch.testing.assert_close(twin.parametrizations.weight[1].u, new_state["parametrizations.weight.1.u"])


def test_split_state_dict_reads_a_torch_checkpoint():
    torch_module = P.spectral_norm(nn.Linear(3, 3))
    net, params, state = pf.from_torch(torch_module)
    p2, s2 = pf.split_state_dict(net, torch_module.state_dict())
    assert set(p2) == set(params) and set(s2) == set(state)
    with pytest.raises(KeyError, match="unexpected"):
        pf.split_state_dict(net, {**torch_module.state_dict(), "extra": torch.zeros(1)})
