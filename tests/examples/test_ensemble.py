"""The vmapped ensemble: member k trained with the others equals member k trained alone."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_cli_tiny_config_reports_equality_speed_and_accuracy(tmp_path):
    out = ensemble.main([
        "--members", "3", "--hidden", "8", "--steps", "30", "--check-member", "2", "--check-steps", "5",
        "--train-size", "128", "--batch", "16", "--timing-budget", "0.2", "--timing-repeats", "2", "--out", str(tmp_path),
    ])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["equality"]["max_abs_diff_params"] < 1e-5
    assert metrics["speed"]["speedup"] > 0
    assert 0.0 <= metrics["accuracy"]["ensemble_accuracy"] <= 1.0
    assert out["losses"].shape == (30, 3)


def test_cli_rejects_a_check_member_outside_the_ensemble(tmp_path):
    with pytest.raises(SystemExit, match="--check-member"):
        ensemble.main(["--members", "2", "--check-member", "2", "--out", str(tmp_path)])
