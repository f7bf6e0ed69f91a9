"""The cached orthogonal RNN: the map runs once per sequence, caching changes nothing but the cost, and it learns."""

from __future__ import annotations

import json

import pytest
import torch

from examples import cached_rnn
from examples.cached_rnn import adding_problem, build, forward_cached, forward_per_step


@pytest.mark.parametrize("orthogonal_map", ["cayley", "matrix_exp"])
def test_cached_forward_runs_the_map_once_per_sequence_and_matches_per_step_outputs_and_grads(orthogonal_map):
    cell, head, params, state, counter = build(16, orthogonal_map, seed=0)
    xs, target = adding_problem(8, 12, torch.Generator().manual_seed(0))
    grads = {}
    outs = {}
    for name, forward, expected_calls in (("cached", forward_cached, 1), ("per_step", forward_per_step, 12)):
        counter.calls = 0
        out, _ = forward(cell, head, params, state, xs)
        assert counter.calls == expected_calls, name
        loss = ((out - target) ** 2).mean()
        grads[name] = torch.autograd.grad(loss, [*params.values(), *head.parameters()])
        outs[name] = out.detach()
    torch.testing.assert_close(outs["cached"], outs["per_step"], rtol=0, atol=0)
    for a, b in zip(grads["cached"], grads["per_step"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_kernel_starts_at_the_identity_and_stays_orthogonal():
    cell, head, params, state, _ = build(8, "cayley", seed=0)
    values, _ = cell.materialize(params, state)
    torch.testing.assert_close(values["recurrent.weight"], torch.eye(8))
    with torch.no_grad():
        params["recurrent.parametrizations.weight.original"].add_(torch.randn(8, 8))
    values, _ = cell.materialize(params, state)
    W = values["recurrent.weight"]
    torch.testing.assert_close(W.T @ W, torch.eye(8), atol=1e-5, rtol=0)


def test_adding_problem_targets_are_the_sum_of_the_two_marked_values():
    xs, target = adding_problem(32, 10, torch.Generator().manual_seed(1))
    assert xs.shape == (10, 32, 2)
    assert torch.equal(xs[..., 1].sum(0), torch.full((32,), 2.0))
    assert torch.equal(xs[:5, :, 1].sum(0), torch.ones(32))  # one marker in each half
    torch.testing.assert_close((xs[..., 0] * xs[..., 1]).sum(0), target)
    with pytest.raises(ValueError, match="seq_len"):
        adding_problem(4, 1, torch.Generator())


def test_short_training_beats_the_trivial_predictor_with_one_map_call_per_step():
    result = cached_rnn.train(32, 10, 64, 300, 3e-3, "cayley", seed=0, log=lambda _: None)
    assert result["map_calls"] == 300
    assert result["test_mse"] < 0.75 * result["trivial_mse"], result
    assert result["orthogonality_error"] < 1e-4


def test_cli_tiny_config_writes_metrics_with_call_counts(tmp_path):
    out = cached_rnn.main([
        "--steps", "5", "--seq-len", "6", "--hidden", "8", "--timing-hidden", "8", "--batch", "4",
        "--timing-budget", "0.2", "--timing-repeats", "2", "--out", str(tmp_path),
    ])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    timing = metrics["timing"]
    assert timing["pfunc_cached"]["map_calls_per_sequence"] == 1
    assert timing["torch_cached"]["map_calls_per_sequence"] == 1
    assert timing["pfunc_per_step"]["map_calls_per_sequence"] == 6
    assert timing["torch_uncached"]["map_calls_per_sequence"] == 6
    assert timing["max_abs_diff_between_variants"] < 1e-6
    assert timing["speedup_cached_over_per_step"] > 0
    assert len(out["losses"]) == 5
