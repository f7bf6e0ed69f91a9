"""The cached orthogonal RNN: the map runs once per sequence, caching changes nothing but the cost, and it learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

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


TINY = ["--steps", "5", "--seq-len", "6", "--hidden", "8", "--timing-hidden", "8", "--batch", "4",
        "--timing-budget", "0.2", "--timing-repeats", "2"]


def test_cli_tiny_config_writes_metrics_with_call_counts_in_a_new_run_folder(tmp_path, capsys):
    out = cached_rnn.main([*TINY, "--results-dir", str(tmp_path)])
    run = Path(out["run_folder"])
    assert run.parent == tmp_path and run.name.endswith("_cayley")
    metrics = json.loads((run / "metrics.json").read_text())
    timing = metrics["timing"]
    assert timing["pfunc_cached"]["map_calls_per_sequence"] == 1
    assert timing["torch_cached"]["map_calls_per_sequence"] == 1
    assert timing["pfunc_per_step"]["map_calls_per_sequence"] == 6
    assert timing["torch_uncached"]["map_calls_per_sequence"] == 6
    assert timing["max_abs_diff_between_variants"] < 1e-6
    assert timing["speedup_cached_over_per_step"] > 0
    assert len(out["losses"]) == 5
    with Image.open(run / "loss.png") as im:
        im.verify()
        assert im.size == (900, 500)
    err = capsys.readouterr().err
    assert "train: 100% 5/5" in err and "mse=" in err
    second = Path(cached_rnn.main([*TINY, "--map", "matrix_exp", "--results-dir", str(tmp_path)])["run_folder"])
    assert second.name.endswith("_matrix_exp") and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-len", "1"], "argument --seq-len: the adding problem needs at least 2 steps, got 1"),
        (["--steps", "-3"], "argument --steps: must be at least 1, got -3"),
        (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
        (["--timing-budget", "nan"], "argument --timing-budget: 'nan' is not a finite number"),
        (["--map", "qr"], "argument --map: invalid choice: 'qr'"),
    ],
)
def test_cli_bad_flags_are_a_two_line_error_before_any_folder_exists(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cached_rnn.main([*flags, "--results-dir", str(tmp_path / "runs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"python -m examples.cached_rnn: error: {message}"), err
    assert err[1] == "(see python -m examples.cached_rnn --help)"
    assert not (tmp_path / "runs").exists()
