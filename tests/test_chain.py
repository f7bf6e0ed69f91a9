"""The parametrization protocol: plain callables, torch-style modules (own tensors lifted), stateful objects."""

import pytest
import torch
from torch import nn

import pfunc as pf
from pfunc.chain import as_step


class Scale(nn.Module):
    """A parametrization with its own learnable parameter and a constant buffer."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("offset", torch.tensor(0.5))

    def forward(self, X):
        return X * self.log_scale.exp() + self.offset

    def right_inverse(self, Y):
        return (Y - self.offset) / self.log_scale.exp()


class CountingStateful:
    """A stateful parametrization counting its training calls in its state."""

    def init_state(self, X, *, generator=None):
        return {"count": torch.zeros((), dtype=torch.long)}

    def forward(self, X, state, *, training=False):
        return X, ({"count": state["count"] + 1} if training else state)


def test_kinds_are_recognised():
    assert as_step(torch.tanh).kind == "plain"
    assert as_step(Scale()).kind == "module"
    assert as_step(CountingStateful()).kind == "stateful"
    with pytest.raises(TypeError, match="must be callable or define forward"):
        as_step(3)


def test_a_parametrizations_own_parameters_live_in_params_and_get_gradients():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": Scale()})
    params, state = net.init()
    assert "parametrizations.weight.0.log_scale" in params
    assert "parametrizations.weight.0.offset" in state
    x = torch.randn(4, 3)
    grads = torch.func.grad(lambda p: net(p, state, x)[0].sum())(params)
    assert grads["parametrizations.weight.0.log_scale"].abs() > 0
    # a changed parameter value changes the output: the tree, not the module, is used
    p2 = {**params, "parametrizations.weight.0.log_scale": torch.tensor(1.0)}
    assert not torch.allclose(net(p2, state, x)[0], net(params, state, x)[0])


def test_a_parametrizations_own_parameters_are_seen_by_vmap():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": Scale()})
    params, state = net.init()
    scales = torch.tensor([0.0, 1.0, -1.0])
    stacked = {k: torch.stack([v] * 3) for k, v in params.items()}
    stacked["parametrizations.weight.0.log_scale"] = scales
    stacked_state = {k: torch.stack([v] * 3) for k, v in state.items()}
    x = torch.randn(2, 3)
    out, _ = pf.ensemble.call(net, stacked, stacked_state, x)
    for i in range(3):
        solo = net(pf.ensemble.member(stacked, i), state, x)[0]
        torch.testing.assert_close(out[i], solo)


def test_stateful_state_threads_through_calls_and_eval_keeps_it():
    net = pf.parametrize(nn.Linear(2, 2), {"weight": CountingStateful()})
    params, state = net.init()
    for _ in range(3):
        _, state = net(params, state, torch.randn(1, 2), training=True)
    _, state = net(params, state, torch.randn(1, 2), training=False)
    assert state["parametrizations.weight.0.count"] == 3


def test_torch_style_module_updating_its_buffer_in_training_returns_it_as_new_state():
    class RunningMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(()))

        def forward(self, X):
            if self.training:
                self.mean.mul_(0.5).add_(0.5 * X.mean().detach())
            return X - self.mean

    p = RunningMean()
    net = pf.parametrize(nn.Linear(2, 2), {"weight": p})
    params, state = net.init()
    _, s1 = net.materialize(params, state, training=True)
    assert s1["parametrizations.weight.0.mean"] != 0
    assert state["parametrizations.weight.0.mean"] == 0 and p.mean == 0  # caller's state and the module untouched


def test_tree_to_moves_params_and_state_and_the_call_follows():
    net = pf.parametrize(nn.Linear(3, 3).double(), {"weight": Scale().double()})
    params, state = net.init()
    params32, state32 = pf.tree.to(params, torch.float32), pf.tree.to(state, torch.float32)
    out, _ = net(params32, state32, torch.randn(2, 3))
    assert out.dtype == torch.float32
