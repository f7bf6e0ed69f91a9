"""LowRankAdapter: W0 + (alpha / rank) B A, starting at W0, A drawn reproducibly from init's generator."""

import pytest
import torch
from torch import nn

import pfunc as pf
from pfunc.parametrizations import LowRankAdapter


def test_adapted_weight_starts_at_the_base_and_moves_by_the_scaled_low_rank_product():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    net = pf.parametrize(layer, {"weight": LowRankAdapter(rank=2, alpha=4.0)})
    params, state = net.init(generator=torch.Generator().manual_seed(1))
    W0, A, B = (params[f"parametrizations.weight.original{i}"] for i in range(3))
    assert torch.equal(W0, layer.weight) and A.shape == (2, 5) and torch.equal(B, torch.zeros(3, 2))
    assert A.abs().max() <= 1 / 5**0.5  # kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in)
    B2 = torch.randn(3, 2)
    values, _ = net.materialize({**params, "parametrizations.weight.original2": B2}, state)
    torch.testing.assert_close(values["weight"], W0 + 2.0 * B2 @ A)


def test_each_generator_draws_its_own_adapter_reproducibly():
    net = pf.parametrize(nn.Linear(5, 3), {"weight": LowRankAdapter(rank=2)})
    a1 = net.init(generator=torch.Generator().manual_seed(1))[0]["parametrizations.weight.original1"]
    a1_again = net.init(generator=torch.Generator().manual_seed(1))[0]["parametrizations.weight.original1"]
    a2 = net.init(generator=torch.Generator().manual_seed(2))[0]["parametrizations.weight.original1"]
    assert torch.equal(a1, a1_again) and not torch.equal(a1, a2)


def test_bad_rank_and_non_matrices_are_refused_naming_the_tensor():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LowRankAdapter(rank=0)
    with pytest.raises(ValueError, match=r"'bias': parametrization 0 \(LowRankAdapter\).*needs a matrix"):
        pf.parametrize(nn.Linear(5, 3), {"bias": LowRankAdapter(rank=1)})
