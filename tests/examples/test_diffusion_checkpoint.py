"""Checkpoints: round trip, atomic writes, clear errors for truncated, corrupt or foreign files, and
saves that fail (a full disk, a file-size limit, an interrupt) leaving the previous checkpoint and no
temp file; temp files of killed saves are removed at the next one."""

import builtins
import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.diffusion.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint, stale_temp_files

REPO = Path(__file__).resolve().parents[2]
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


def test_a_config_written_before_the_layout_flag_is_the_classic_layout():
    new = TrainConfig(**{**PRESETS["cpu"], "layout": "classic", "weight_standardization": True}).to_dict()
    old = {k: v for k, v in new.items() if k not in ("layout", "weight_standardization")}
    assert TrainConfig.from_dict(old).layout == "classic" and TrainConfig.from_dict(old).weight_standardization
    assert config_differences(old, {**old, "layout": "classic"}) == []
    assert config_differences(old, {**old, "layout": "modern"}) == ["--layout: checkpoint 'classic', now 'modern'"]


# ------------------------------------------------------------------------------ faults during a save
class _DiskFillsAfter:
    """A real file object whose writes fail with ENOSPC once ``room`` bytes are written, as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_disk_that_fills_during_a_save_is_a_clear_error_leaving_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(10)})
    before = path.read_bytes()
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _DiskFillsAfter(f, room=100) if "w" in mode and ".checkpoint.pt.tmp" in str(file) else f

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(path, {"step": 2, "w": torch.ones(10_000)})
    assert str(e.value) == (f"could not write checkpoint '{path}': No space left on device (errno {errno.ENOSPC}); "
                            "the previous checkpoint is intact")
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_an_interrupt_during_a_save_removes_the_temp_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_stale_temp_files_of_killed_saves_are_removed_at_the_next_save(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for name in (".checkpoint.pt.tmp4242", ".checkpoint.pt.tmp17"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt.tmp1").write_bytes(b"not ours")
    assert [p.name for p in stale_temp_files(path)] == [".checkpoint.pt.tmp17", ".checkpoint.pt.tmp4242"]
    save_checkpoint(path, {"step": 1})
    assert sorted(os.listdir(tmp_path)) == [".other.pt.tmp1", "checkpoint.pt"]


def test_a_file_size_limit_during_a_real_save_fails_cleanly_in_a_subprocess(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG): no mock anywhere."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(10)})
    before = path.read_bytes()
    script = (
        "import sys, torch\n"
        "from examples.diffusion.checkpoint import CheckpointError, save_checkpoint\n"
        "try:\n"
        f"    save_checkpoint({str(path)!r}, {{'step': 2, 'w': torch.ones(1_000_000)}})\n"
        "except CheckpointError as e:\n"
        "    print(e)\n"
        "    sys.exit(1)\n"
    )

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == f"could not write checkpoint '{path}': File too large (errno {errno.EFBIG}); the previous checkpoint is intact"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_folder_where_the_checkpoint_goes_is_a_clear_error_at_save_and_load(tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(CheckpointError, match="a folder is in the way"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_read_checkpoint_gives_the_files_sha256(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    payload, digest = read_checkpoint(path)
    assert payload == {"step": 1} and digest == hashlib.sha256(path.read_bytes()).hexdigest()
