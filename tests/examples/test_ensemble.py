"""The vmapped ensemble: member k trained with the others equals member k trained alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import pfunc as pf
from examples import ensemble
from examples.ensemble import init_members, max_abs_diff, spectral_mlp, spirals, train_ensemble, train_solo

DATA = spirals(256, 0.05, torch.Generator().manual_seed(0))


def test_members_start_different_and_member_k_initialises_as_if_alone():
    net, _ = spectral_mlp(16)
    params, state = init_members(net, seed=10, members=4)
    for k in range(4):
        p_k, s_k = init_members(net, seed=10 + k, members=1)
        assert max_abs_diff(pf.ensemble.member(params, k), pf.ensemble.member(p_k, 0)) == 0.0
        assert max_abs_diff(pf.ensemble.member(state, k), pf.ensemble.member(s_k, 0)) == 0.0
    w = params["1.parametrizations.weight.original"]
    assert not torch.allclose(w[0], w[1])
    assert all(v.is_leaf for v in params.values())


@pytest.mark.parametrize("member", [0, 3])
def test_member_k_of_the_vmapped_run_equals_a_solo_run_spectral_state_included(member):
    net, _ = spectral_mlp(16)
    steps = 20
    p_ens, s_ens, losses = train_ensemble(net, DATA, 4, steps, 32, 1e-2, init_seed=5, data_seed=50)
    p_solo, s_solo, solo_losses = train_solo(net, DATA, member, steps, 32, 1e-2, init_seed=5, data_seed=50)
    p_k, s_k = pf.ensemble.member(p_ens, member), pf.ensemble.member(s_ens, member)
    assert any(k.endswith("._u") for k in s_k)  # spectral norm's power-iteration state is compared too
    assert max_abs_diff(p_k, p_solo) < 1e-5
    assert max_abs_diff(s_k, s_solo) < 1e-5
    torch.testing.assert_close(losses[:, member], solo_losses, rtol=1e-5, atol=1e-6)
    # the comparison is not vacuous: training moved the member, and the members differ
    p0, _ = init_members(net, seed=5 + member, members=1)
    assert max_abs_diff(pf.ensemble.member(p0, 0), p_solo) > 1e-2
    other = pf.ensemble.member(p_ens, (member + 1) % 4)
    assert max_abs_diff(other, p_solo) > 1e-2


TINY = ["--members", "3", "--hidden", "8", "--steps", "30", "--check-member", "2", "--check-steps", "5",
        "--train-size", "128", "--batch", "16", "--timing-budget", "0.2", "--timing-repeats", "2"]


def test_cli_tiny_config_reports_equality_speed_and_accuracy_in_a_new_run_folder(tmp_path, capsys):
    out = ensemble.main([*TINY, "--results-dir", str(tmp_path)])
    run = Path(out["run_folder"])
    assert run.parent == tmp_path and run.name.endswith("_3members")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["equality"]["max_abs_diff_params"] < 1e-5
    assert metrics["speed"]["speedup"] > 0
    assert 0.0 <= metrics["accuracy"]["ensemble_accuracy"] <= 1.0
    assert out["losses"].shape == (30, 3)
    with Image.open(run / "ensemble.png") as im:
        im.verify()
        assert im.size == (800, 760)
    err = capsys.readouterr().err
    assert "ensemble of 3: 100% 30/30" in err and "loss=" in err
    second = Path(ensemble.main([*TINY, "--results-dir", str(tmp_path)])["run_folder"])
    assert second != run and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--members", "2", "--check-member", "2"], "argument --check-member: must be below --members (2), got 2"),
        (["--batch", "600"], "argument --batch: must be at most --train-size (512), got 600"),
        (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
        (["--lr", "0"], "argument --lr: must be greater than 0, got 0"),
        (["--members", "0"], "argument --members: must be at least 1, got 0"),
        (["--noise=-inf"], "argument --noise: '-inf' is not a finite number"),
    ],
)
def test_cli_bad_flags_are_a_two_line_error_before_any_folder_exists(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        ensemble.main([*flags, "--results-dir", str(tmp_path / "runs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m examples.ensemble: error: {message}", "(see python -m examples.ensemble --help)"]
    assert not (tmp_path / "runs").exists()
