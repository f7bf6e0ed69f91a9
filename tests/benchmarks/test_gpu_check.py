"""The prepared GPU check (benchmarks/gpu_check.py) kept from rotting on a machine without a GPU: its plan,
its refusal without CUDA, a stage that runs without one, a stage past its time limit, and the report."""

import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import Stage, main, run_stage, stages

NO_GPU = not torch.cuda.is_available()


def test_the_plan_has_every_stage_within_ten_minutes(tmp_path):
    plan = stages(tmp_path, gpus=2)
    assert [s.name for s in plan] == ["setup", "cuda-tests", "fake-cuda", "benchmarks", "train", "nccl"]
    assert sum(s.timeout_s for s in plan) <= 570  # 9.5 min of limits: the whole check under ten minutes
    assert all(s.skip is None for s in plan)
    assert stages(tmp_path, gpus=1)[-1].skip == "1 GPU(s) here: needs 2"  # NCCL wants two GPUs
    bench = next(s for s in plan if s.name == "benchmarks").argv
    assert bench[1:5] == ("-m", "benchmarks.run", "--device", "cuda")


def test_dry_run_writes_the_plan_as_a_report_without_a_gpu(tmp_path):
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    for name in ("setup", "cuda-tests", "fake-cuda", "benchmarks", "train", "nccl"):
        assert f"| {name} |" in text
    assert "-m benchmarks.run --device cuda --quick" in text and "--preset gpu --steps 300" in text


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sees no CUDA device here" in err and "--dry-run" in err
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_unknown_stage_is_refused_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "setup,bench", "--dry-run", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--only: unknown stages ['bench']" in capsys.readouterr().err


def test_the_setup_stage_runs_without_a_gpu_and_records_the_machine(tmp_path):
    assert main(["--only", "setup", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "| setup | passed |" in text and f'"torch": "{torch.__version__}"' in text


def test_a_stage_past_its_limit_is_reported_timed_out_with_its_output_so_far(tmp_path):
    slow = Stage("slow", "sleeps", (sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"), 2)
    outcome = run_stage(slow)
    assert outcome.status == "timed out" and outcome.seconds < 20
    failing = run_stage(Stage("bad", "exits 3", (sys.executable, "-c", "import sys; print('x'); sys.exit(3)"), 30))
    assert failing.status == "failed (exit 3)" and "x" in failing.output
    path = gpu_check.report([outcome, failing], {"GPU": "none"}, tmp_path)
    text = path.read_text()
    assert "| slow | timed out |" in text and "| bad | failed (exit 3) |" in text


def test_setup_names_what_is_missing_when_there_are_no_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_missing", lambda: ["optree"])
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / ".whl")
    with pytest.raises(SystemExit, match=r"setup: missing optree and there is no .*\.whl to install them from"):
        gpu_check.setup()


def test_a_stage_past_its_limit_leaves_no_process_behind(tmp_path):
    """A stage's own children (a training run under a wrapper, torchrun's workers) die with it at the limit."""
    marker = tmp_path / "child_alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w').write('still running')"
    wrapper = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(30)"
    outcome = run_stage(Stage("wrapped", "a child that outlives its parent", (sys.executable, "-c", wrapper), 1))
    assert outcome.status == "timed out"
    import time

    time.sleep(4)
    assert not marker.exists()
