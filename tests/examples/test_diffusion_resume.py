"""The resume guarantee: a run killed with SIGKILL, or stopped with Ctrl-C (which saves a checkpoint
and says how to resume), continues exactly (bitwise on CPU) like an uninterrupted run with the same
seed: the same per-step losses, params, EMA and optimizer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.commands import shown_path
from examples.diffusion.checkpoint import load_checkpoint
from examples.diffusion.train import main, read_losses


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "64",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "100",
    "--self-condition", "--checkpoint-every", "2", "--log-every", "1000", "--seed", "5",
]


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "examples.diffusion.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _assert_same_checkpoints(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in ("params", "ema", "state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}[{k}] differs"
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimizer state {i}.{k} differs"
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"]) and torch.equal(a["rng"]["coin"], b["rng"]["coin"])


def test_sigkill_then_resume_continues_the_loss_trajectory_bitwise(tmp_path):
    steps = 60
    args = [*TINY, "--steps", str(steps)]
    full = _cli([*args, "--results-dir", str(tmp_path / "full")])
    killed = _cli([*args, "--results-dir", str(tmp_path / "killed")])
    # kill the second run once it has checkpointed and gone on a little (so some logged steps are past it)
    deadline = time.time() + 240
    while True:
        assert killed.poll() is None, "the run finished before it could be killed: raise --steps"
        assert time.time() < deadline, "no checkpoint appeared"
        roots = list((tmp_path / "killed").glob("*/checkpoint.pt"))
        if roots and len(read_losses(roots[0].parent / "losses.jsonl")) >= 11:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    run = _only_run(tmp_path / "killed")
    at_kill = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 2 <= at_kill < steps

    resumed = _cli(["--resume", str(run)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming {run} at step {at_kill}/{steps}" in out
    out_full, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out_full

    full_run = _only_run(tmp_path / "full")
    expected, got = read_losses(full_run / "losses.jsonl"), read_losses(run / "losses.jsonl")
    assert [s for s, _ in got] == list(range(1, steps + 1))  # no step lost or logged twice
    assert got == expected  # bitwise: JSON floats round-trip exactly
    _assert_same_checkpoints(load_checkpoint(full_run / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt"))
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == at_kill


def test_resume_may_extend_steps_and_matches_one_longer_run(tmp_path):
    common = [*TINY, "--learned-variance", "--grad-accum", "2"]
    assert main([*common, "--steps", "6", "--results-dir", str(tmp_path / "long")]) == 0
    assert main([*common, "--steps", "3", "--results-dir", str(tmp_path / "short")]) == 0
    short = _only_run(tmp_path / "short")
    assert main(["--resume", str(short / "checkpoint.pt"), "--steps", "6"]) == 0
    long = _only_run(tmp_path / "long")
    assert read_losses(short / "losses.jsonl") == read_losses(long / "losses.jsonl")
    _assert_same_checkpoints(load_checkpoint(long / "checkpoint.pt"), load_checkpoint(short / "checkpoint.pt"))


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_the_resumed_run_continues_exactly(tmp_path):
    args = [*TINY, "--steps", "400", "--checkpoint-every", "1000", "--log-every", "5"]   # no periodic checkpoint: Ctrl-C's is the only one
    proc = _cli([*args, "--results-dir", str(tmp_path / "stopped")])
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, "the run finished before it could be interrupted: raise --steps"
        assert time.time() < deadline, "the run never got going"
        logs = list((tmp_path / "stopped").glob("*/losses.jsonl"))
        if logs and len(read_losses(logs[0])) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    run = _only_run(tmp_path / "stopped")
    at_stop = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 5 <= at_stop < 400
    assert f"SIGINT: stopped at step {at_stop}/400 and saved {run / 'checkpoint.pt'}; " \
           f"resume with: {shown_path(sys.executable, str(REPO))} -m examples.diffusion.train --resume {run}" in out
    assert "SIGINT received: finishing the current step, then saving a checkpoint and stopping" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert [s for s, _ in read_losses(run / "losses.jsonl")] == list(range(1, at_stop + 1))
    assert not list(run.glob(".checkpoint.pt.tmp*")) and not (run / "samples.png").exists()

    total = at_stop + 3
    assert main(["--resume", str(run), "--steps", str(total)]) == 0
    assert main([*TINY, "--steps", str(total), "--results-dir", str(tmp_path / "straight")]) == 0
    straight = _only_run(tmp_path / "straight")
    assert read_losses(run / "losses.jsonl") == read_losses(straight / "losses.jsonl")
    _assert_same_checkpoints(load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt"))
