"""Positive, Bounded and Mask: constraints, exact inverses, pruning semantics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pfunc as pf
from pfunc.parametrizations import Bounded, Mask, Positive

values = st.lists(st.floats(-20, 20), min_size=1, max_size=8)


@pytest.mark.parametrize("kind", ["softplus", "exp"])
@given(values)
def test_positive_is_positive_and_right_inverse_is_exact(kind, xs):
    p = Positive(kind)
    Y = p(torch.tensor(xs, dtype=torch.float64))
    assert bool((Y > 0).all())
    keep = Y > 1e-6  # softplus underflows gracefully below that; the inverse is exact above
    torch.testing.assert_close(p(p.right_inverse(Y))[keep], Y[keep], rtol=1e-9, atol=0)


@given(values, st.floats(-5, 5), st.floats(0.1, 5))
def test_bounded_stays_inside_and_inverts(xs, low, width):
    b = Bounded(low, low + width)
    Y = b(torch.tensor(xs, dtype=torch.float64) / 4)
    assert bool(((Y > low) & (Y < low + width)).all())
    torch.testing.assert_close(b(b.right_inverse(Y)), Y, rtol=1e-7, atol=1e-9)


def test_bounded_rejects_an_empty_interval():
    with pytest.raises(ValueError, match="low < high"):
        Bounded(1.0, 1.0)


def test_mask_is_drawn_from_the_generator_and_never_changes():
    layer = nn.Linear(10, 10)
    net = pf.parametrize(layer, {"weight": Mask(p_drop=0.5)})
    p1, s1 = net.init(generator=torch.Generator().manual_seed(0))
    p2, s2 = net.init(generator=torch.Generator().manual_seed(0))
    mask = s1["parametrizations.weight.0.mask"]
    assert torch.equal(mask, s2["parametrizations.weight.0.mask"])
    assert 0 < mask.sum() < 100
    values, s3 = net.materialize(p1, s1, training=True)
    assert torch.equal(values["weight"], layer.weight.detach() * mask)
    assert torch.equal(s3["parametrizations.weight.0.mask"], mask)
    X = torch.rand(10, 10)
    p4, s4 = net.assign(p1, s1, {"weight": X})
    assert torch.equal(net.materialize(p4, s4)[0]["weight"], X * mask)  # assigned values come out pruned


def test_mask_given_explicitly_must_match_the_shape():
    with pytest.raises(ValueError, match="mask has shape"):
        pf.parametrize(nn.Linear(3, 3), {"weight": Mask(torch.ones(2, 2))})
