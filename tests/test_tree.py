"""Pytrees: torch key layout, stack/unstack round trip, device/dtype moves, merge."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pfunc import tree


def test_keys_follow_torch_parametrize():
    assert tree.chain_prefix("weight") == "parametrizations.weight"
    assert tree.original_key("enc.0.weight", "original1") == "enc.0.parametrizations.weight.original1"
    assert tree.step_key("fc.weight", 0, "_u") == "fc.parametrizations.weight.0._u"


@given(st.integers(1, 5), st.lists(st.integers(1, 4), min_size=0, max_size=3))
def test_unstack_inverts_stack(n, shape):
    trees = [{"a": torch.randn(tuple(shape)), "b": {"c": torch.randn(2)}} for _ in range(n)]
    back = tree.unstack(tree.stack(trees))
    assert len(back) == n
    for x, y in zip(trees, back):
        assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"]["c"], y["b"]["c"])


def test_stack_and_unstack_errors_are_clear():
    with pytest.raises(ValueError, match="trees is empty"):
        tree.stack([])
    with pytest.raises(ValueError, match="same leading dim"):
        tree.unstack({"a": torch.zeros(2, 3), "b": torch.zeros(3)})


def test_to_moves_every_leaf():
    t = tree.to({"a": torch.zeros(2), "b": torch.zeros(1)}, torch.float64)
    assert all(v.dtype == torch.float64 for v in t.values())


def test_merge_refuses_overlapping_keys():
    with pytest.raises(ValueError, match="keys in both"):
        tree.merge({"a": torch.zeros(1)}, {"a": torch.zeros(1)})
