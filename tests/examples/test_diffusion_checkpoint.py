"""Checkpoints: round trip, atomic writes, and clear errors for truncated, corrupt or foreign files."""

import os

import pytest
import torch

from examples.diffusion.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from examples.diffusion.config import PRESETS, TrainConfig, config_differences


def _payload():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {
        "step": 7,
        "params": {"w": torch.randn(3, 4), "b": torch.zeros(4)},
        "optimizer": opt.state_dict(),
        "rng": torch.Generator().manual_seed(3).get_state(),
        "config": TrainConfig(**PRESETS["cpu"]).to_dict(),
        "note": None,
    }


def test_round_trip_keeps_every_tensor_bitwise_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    payload = _payload()
    save_checkpoint(path, payload)
    back = load_checkpoint(path)
    assert back["step"] == 7 and back["note"] is None and back["config"] == payload["config"]
    for k in ("w", "b"):
        assert torch.equal(back["params"][k], payload["params"][k])
    assert torch.equal(back["rng"], payload["rng"])
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], payload["optimizer"]["state"][0]["exp_avg"])
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_overwrite_replaces_the_whole_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "x": torch.zeros(1000)})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 2}


@pytest.mark.parametrize("keep", [0, 10, 60, -1])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, keep):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload())
    blob = path.read_bytes()
    path.write_bytes(blob[:keep] if keep >= 0 else blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated|not a pfunc"):
        load_checkpoint(path)


def test_flipped_bit_is_caught_by_the_digest(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload())
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_foreign_or_missing_files_are_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "plain.pt")  # a plain torch file is not ours
    with pytest.raises(CheckpointError, match="not a pfunc"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_payload_that_would_need_pickled_code_is_refused_at_save(tmp_path):
    class Thing:
        pass

    with pytest.raises(TypeError, match="Thing"):
        save_checkpoint(tmp_path / "x.pt", {"obj": Thing()})
    assert not any(tmp_path.iterdir())


def test_config_differences_name_each_field_and_ignore_run_options():
    a = TrainConfig(**PRESETS["cpu"]).to_dict()
    b = {**a, "dim": 32, "dim_mults": [1, 2], "steps": 5, "sampling_steps": 7}
    diffs = config_differences(a, b)
    assert diffs == ["--dim: checkpoint 16, now 32", "--dim-mults: checkpoint [1, 2, 4], now [1, 2]"]
