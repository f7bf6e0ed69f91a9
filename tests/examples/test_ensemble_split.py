"""examples/ensemble_split.py: ``torchrun -m examples.ensemble`` splits the members over the processes, and member k
is the single-process run's member k. Real processes (torchrun, gloo on CPU)."""

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples import ensemble, ensemble_split
from examples.ensemble_split import member_share

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

REPO = Path(__file__).resolve().parents[2]
TINY = ["--members", "5", "--hidden", "8", "--steps", "30", "--check-member", "3", "--check-steps", "5",
        "--train-size", "128", "--batch", "16", "--timing-budget", "0.2", "--timing-repeats", "2"]


def torchrun(args, nproc=2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "examples.ensemble", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@given(members=st.integers(1, 40), world=st.integers(1, 40))
def test_the_shares_cover_every_member_once_in_order_and_differ_by_at_most_one(members, world):
    if world > members:
        with pytest.raises(ValueError, match="cannot split"):
            member_share(members, 0, world)
        return
    shares = [member_share(members, r, world) for r in range(world)]
    assert [k for s in shares for k in s] == list(range(members))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_members_split_over_two_ranks_equal_the_one_process_members(tmp_path):
    ensemble.main([*TINY, "--results-dir", str(tmp_path / "one")])
    done = torchrun([*TINY, "--results-dir", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (one,), (two,) = (list((tmp_path / d).iterdir()) for d in ("one", "two"))  # rank 0 alone made a run folder
    a, b = torch.load(one / "members.pt"), torch.load(two / "members.pt")
    assert b["losses"].shape == a["losses"].shape == (30, 5)
    torch.testing.assert_close(b["losses"], a["losses"], rtol=1e-5, atol=1e-7)  # every member's every step
    for tree in ("params", "state"):
        for k in a[tree]:
            torch.testing.assert_close(b[tree][k], a[tree][k], rtol=0, atol=1e-6)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["members_per_rank"] == [[0, 3], [3, 5]] and metrics["equality"]["max_abs_diff_params"] < 1e-5
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert done.stdout.count("run folder: ") == 1 and "members 0-2 on rank 0, 3-4 on rank 1" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_fewer_members_than_processes_is_refused_by_rank_0_alone(tmp_path):
    done = torchrun([*TINY, "--members", "1", "--check-member", "0", "--results-dir", str(tmp_path / "r")])
    assert done.returncode != 0
    said = (done.stdout + done.stderr).count("argument --members: 1 members cannot be split over the 2 processes torchrun started")
    assert said == 1, done.stderr[-3000:]
    assert not (tmp_path / "r").exists()


def test_the_module_docstring_example_runs():
    result = doctest.testmod(ensemble_split)
    assert result.attempted and not result.failed
