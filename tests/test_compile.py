"""Principle 5: the functional path traces under torch.compile with no graph breaks."""

import pytest
import torch
from torch import nn

import pfunc as pf
from pfunc.parametrizations import MatrixExp, Orthogonal, Skew, SpectralNorm, WeightNorm, WeightStandardization

pytestmark = pytest.mark.compile


def _net():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 1))
    return pf.parametrize(
        model,
        {"0.weight": [Skew(), MatrixExp()], "2.weight": SpectralNorm(), "4.weight": Orthogonal(), "5.weight": WeightNorm()},
    )


@pytest.mark.parametrize("training", [True, False])
def test_forward_and_grad_have_no_graph_breaks(training):
    net = _net()
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 16)

    def forward(params, state, x):
        return net(params, state, x, training=training)

    def step(params, state, x):
        def loss(p, s):
            out, s = net(p, s, x, training=training)
            return out.pow(2).mean(), s

        return torch.func.grad_and_value(loss, has_aux=True)(params, state)

    for fn in (forward, step):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(params, state, x)
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


def test_weight_standardized_conv_has_no_graph_breaks():
    net = pf.parametrize(nn.Conv2d(3, 8, 3), {"weight": WeightStandardization()})
    params, state = net.init()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda p, s, x: net(p, s, x))(params, state, torch.randn(1, 3, 8, 8))
    assert explanation.graph_break_count == 0
