"""The main job across processes: ``torchrun --nproc_per_node=2 -m examples.diffusion.train`` on CPU (gloo),
on the resume test's tiny config. A 2-rank run follows the 1-process run step for step; rank 0 alone writes;
a rank killed mid-run ends the job with one line and the run resumes on 2 ranks (with ZeRO) and on 1;
Ctrl-C saves once; bad batch sizes and flags are refused before any work. Real processes throughout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.commands import shown_path
from examples.diffusion import compare_runs
from examples.diffusion.checkpoint import load_checkpoint
from examples.diffusion.config import PRESETS, ConfigError, TrainConfig
from examples.diffusion.data_parallel import DataParallel, choose_backend, is_module_buffer, rank_device
from examples.diffusion.train import main, read_losses
from examples.diffusion.train_args import build_parser, check_launch_flags, check_world_size
from examples.torchrun import Launch

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tests/examples/conftest.py
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in"),
    pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers in /proc (Linux)"),
]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("data_parallel_worker.py")
TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "64",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "100",
    "--self-condition", "--checkpoint-every", "2", "--log-every", "1000", "--seed", "5",
]
STEPS = 20
# the resume hint repeats the launcher's own command line: the interpreter used, --standalone
LAUNCHER = f"{shown_path(sys.executable, str(REPO))} -m torch.distributed.run --standalone --nproc_per_node=2 -m examples.diffusion.train"


def torchrun(args, *, nproc=2, module="examples.diffusion.train", **kw) -> subprocess.Popen:
    """``torchrun --standalone`` (a free port of its own) of ``module`` on ``nproc`` processes, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    target = ["-m", module] if module else []
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             *target, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """torchrun's output once it ended; a hang past ``timeout`` kills torchrun and its workers and fails the test."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*workers(proc.pid), proc.pid]:  # the workers run in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate()
        pytest.fail(f"torchrun was still running after {timeout} s (a hang):\n{out[-4000:]}")
    return out


_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d")


def ours(out: str) -> str:
    """The workers' lines: without torchrun's log lines and the report it prints after a failed or signalled job."""
    lines = out.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")), len(lines))
    return "\n".join(line for line in lines[:end] if not _LOG_LINE.match(line))


def no_traceback_of_ours(out: str) -> None:
    assert f'File "{REPO / "examples"}' not in out and "[rank0]" not in out and "[rank1]" not in out, out[-4000:]


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def workers(torchrun_pid: int) -> list[int]:
    """The pids of torchrun's worker processes (its children, from /proc)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{torchrun_pid}/task"):
            with open(f"/proc/{torchrun_pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return children


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with ``RANK=rank`` (read from its environment in /proc)."""
    for child in workers(torchrun_pid):
        with open(f"/proc/{child}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return child
    raise AssertionError(f"no worker with RANK={rank} among {workers(torchrun_pid)}")


def wait_for_steps(root: Path, proc: subprocess.Popen, n: int, timeout: float = 180) -> Path:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"the run ended before step {n}:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, f"step {n} never came"
        logs = list(root.glob("*/losses.jsonl"))
        if logs and len(read_losses(logs[0])) >= n:
            return logs[0].parent
        time.sleep(0.02)


def assert_follows(reference: Path, run: Path, *, steps: int = STEPS) -> None:
    """``run`` follows ``reference`` step for step up to float32 summation order: its first
    :data:`~examples.diffusion.compare_runs.START_STEPS` losses within 1e-5 of the reference's, every later one
    within 1e-3, compare_runs calls it the same run, and its final weights are within 1e-3.

    How far summation-order drift grows depends on the model and the CPU's vector paths: 4.1e-7 in the weights
    at most on the Intel Xeon the README's figures come from with the classic layout, 1.009e-5 in one weight on
    the AMD EPYC of 2026-12-06; with the modern layout and v prediction (the default since), the losses drift
    apart by 4.7e-6 at the first steps and 1.3e-4 by step 16, the weights by 2e-4, as AdamW amplifies the
    rounding of parameters with near-zero gradients. A different run (another seed, batch order or data) is
    1e-3 and more apart from step 1, which the first steps' bound tells apart."""
    want, got = read_losses(reference / "losses.jsonl"), read_losses(run / "losses.jsonl")
    assert [s for s, _ in got] == list(range(1, steps + 1))  # every step once
    for (step, a), (_, b) in zip(want, got):
        bound = compare_runs.START_RTOL if step <= compare_runs.START_STEPS else 1e-3
        assert abs(a - b) <= bound * abs(a), (step, a, b)
    a, b = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    for key in ("params", "ema"):
        for k in a[key]:
            torch.testing.assert_close(b[key][k], a[key][k], rtol=0, atol=1e-3)
    weights = compare_runs.weight_differences(a, b)
    assert compare_runs.verdict(a["config"], b["config"], compare_runs.loss_differences(reference, run), weights, 1e-5, 1e-5).same
    for i, s in a["optimizer"]["state"].items():  # a full AdamW state, whichever optimizer wrote it
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer"]["state"][i][k], s[k], rtol=1e-3, atol=1e-4)
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"]) and torch.equal(a["rng"]["coin"], b["rng"]["coin"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the tiny config for 20 steps in this process."""
    root = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    assert main([*TINY, "--steps", str(STEPS), "--results-dir", str(root)]) == 0
    return only_run(root)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("two")
    proc = torchrun([*TINY, "--steps", str(STEPS), "--results-dir", str(root)])
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    return root, out


def test_two_ranks_follow_the_one_process_run_step_for_step(one_process, two_ranks):
    root, out = two_ranks
    assert_follows(one_process, only_run(root))
    assert "across 2 processes (2 images each, gloo)" in out


def _tiny_run_with(root: Path, flag: str, value: str, capsys) -> Path:
    """The reference's command with one flag changed, run in this process; its run folder."""
    argv = [*TINY, "--steps", str(STEPS), "--results-dir", str(root)]
    argv[argv.index(flag) + 1] = value
    assert main(argv) == 0
    capsys.readouterr()
    return only_run(root)


def test_compare_runs_measures_how_closely_the_two_ranks_followed_one_process(one_process, two_ranks, capsys, tmp_path):
    run = only_run(two_ranks[0])
    assert compare_runs.main([str(one_process), str(run)]) == 0
    out = capsys.readouterr().out
    assert f"losses: {STEPS} steps compared; largest relative difference" in out
    # within 1e-5 on the Intel Xeon with the classic layout; past it on an AMD EPYC and with the modern layout: the same run
    assert "verdict: the same run (every difference within rtol 1e-05 / atol 1e-05)" in out or \
           "verdict: the same run up to float32 summation order" in out, out
    rel, _, n = compare_runs.loss_difference(one_process, run)
    assert n == STEPS and 0 <= rel <= 1e-3                           # summation-order drift (see assert_follows)
    # a run that did not follow: the same command with another seed is reported, exit status 3
    other = _tiny_run_with(tmp_path / "other", "--seed", "6", capsys)
    assert compare_runs.main([str(one_process), str(other)]) == 3
    out = capsys.readouterr().out
    assert "within rtol 1e-05 / atol 1e-05: no" in out and "verdict: a different run: the configs differ (--seed: 5 against 6)" in out
    # what START_RTOL rests on: another seed's losses differ by far more than float32 rounding from step 1
    assert min(d for _, d in compare_runs.loss_differences(one_process, other)[:compare_runs.START_STEPS]) > 1e-3
    # not a run folder: one line, exit status 1
    assert compare_runs.main([str(one_process), str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: '{tmp_path / 'nowhere'}' is not a run folder"]
    # another model: refused naming the reason, not a shape error from torch
    small = _tiny_run_with(tmp_path / "small", "--dim", "4", capsys)
    assert compare_runs.main([str(one_process), str(small)]) == 1
    assert "have different keys or shapes: not the same model" in capsys.readouterr().err


def test_compare_runs_calls_two_ranks_against_one_process_the_same_run_up_to_float32_summation_order(one_process, two_ranks, capsys):
    # the issue's case at a tolerance the two runs' float32 rounding exceeds (as 100 CPU-preset steps exceed 1e-5):
    # not "no, a different run", but the same run whose sums were added in another order
    run = only_run(two_ranks[0])
    assert compare_runs.main([str(one_process), str(run), "--rtol", "1e-9", "--atol", "1e-9"]) == 0
    out = capsys.readouterr().out
    assert "within rtol 1e-09 / atol 1e-09: no" in out
    assert f"verdict: the same run up to float32 summation order: the same config, the first {compare_runs.START_STEPS} steps' " \
           "losses within 1e-05" in out
    # the same runs with a loss changed at step 2 (as another batch there would) are a different run
    other = run.parent.parent / "edited"
    shutil.copytree(run, other / run.name)
    log = other / run.name / "losses.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = json.dumps({"step": 2, "loss": json.loads(lines[1])["loss"] * 1.01})
    log.write_text("\n".join(lines) + "\n")
    assert compare_runs.main([str(one_process), str(other / run.name), "--rtol", "1e-9", "--atol", "1e-9"]) == 3
    assert "verdict: a different run: the losses differ by 0.01 at step 2 already" in capsys.readouterr().out


def test_only_rank_0_writes_the_run_folder_and_speaks(one_process, two_ranks):
    root, out = two_ranks
    run = only_run(root)  # one folder: rank 1 made none
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one_process.iterdir())
    text = ours(out)
    assert text.count("run folder: ") == 1 and text.count("trained 20 steps") == 1 and text.count("train: 100%") == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["step"] == STEPS
    no_traceback_of_ours(out)


def test_a_killed_rank_ends_the_job_in_one_line_and_the_run_resumes_on_2_ranks_and_on_1(one_process, tmp_path):
    proc = torchrun([*TINY, "--steps", "400", "--results-dir", str(tmp_path), "--dist-timeout", "20"])
    run = wait_for_steps(tmp_path, proc, 7)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    killed_at = time.time()
    out = finish(proc, timeout=120)
    assert time.time() - killed_at < 20, "the job outlived its collective timeout"
    assert proc.returncode != 0
    errors = [l for l in ours(out).splitlines() if l.startswith("error:")]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: rank 0 of 2: ") and "another rank died, or stopped answering for --dist-timeout 20 s" in errors[0]
    at_kill = load_checkpoint(run / "checkpoint.pt")["step"]  # the last checkpoint is whole
    assert 6 <= at_kill < 400 and f"{run / 'checkpoint.pt'} (step {at_kill}) is intact" in errors[0]
    assert f"resume with: {LAUNCHER} --resume {run}" in errors[0]
    no_traceback_of_ours(out)

    resumed = torchrun(["--resume", str(run), "--steps", "14", "--zero"])  # 2 ranks, optimizer state sharded
    out = finish(resumed)
    assert resumed.returncode == 0, out[-4000:]
    assert f"resuming {run} at step {at_kill}/14" in out and "ZeRO" in out
    assert main(["--resume", str(run), "--steps", str(STEPS)]) == 0  # 1 process, from ZeRO's consolidated state
    assert_follows(one_process, run)


def test_when_the_writer_dies_the_other_rank_says_so_in_one_line_without_claiming_a_checkpoint(tmp_path):
    proc = torchrun([*TINY, "--steps", "400", "--results-dir", str(tmp_path), "--dist-timeout", "20"])
    run = wait_for_steps(tmp_path, proc, 3)
    os.kill(rank_pid(proc.pid, 0), signal.SIGKILL)
    out = finish(proc, timeout=120)
    errors = [l for l in ours(out).splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 of 2: "), out[-4000:]
    assert f"rank 0 writes the checkpoints in {run}; resume with: {LAUNCHER} --resume {run}" in errors[0]
    assert load_checkpoint(run / "checkpoint.pt")["step"] >= 2  # what rank 0 wrote is whole
    no_traceback_of_ours(out)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_a_schedulers_sigterm_under_torchrun_saves_once_on_rank_0_and_every_rank_stops(tmp_path, name):
    proc = torchrun([*TINY, "--steps", "400", "--checkpoint-every", "1000", "--results-dir", str(tmp_path)], start_new_session=True)
    run = wait_for_steps(tmp_path, proc, 4)
    if name == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process of the job gets it
    else:
        os.kill(proc.pid, signal.SIGTERM)  # what a scheduler does: torchrun alone gets it and passes it to every rank
    out = finish(proc, timeout=120)
    at_stop = load_checkpoint(run / "checkpoint.pt")["step"]
    said = [l for l in ours(out).splitlines() if l.startswith(f"{name}: stopped at step")]
    assert said == [f"{name}: stopped at step {at_stop}/400 and saved {run / 'checkpoint.pt'}; resume with: "
                    f"{LAUNCHER} --resume {run}"], out[-4000:]
    assert ours(out).count(f"{name} received: finishing the current step") == 1   # said at once, by rank 0 alone
    assert [s for s, _ in read_losses(run / "losses.jsonl")] == list(range(1, at_stop + 1))
    assert not list(run.glob(".checkpoint.pt.tmp*")) and not (run / "samples.png").exists()
    no_traceback_of_ours(out)


def test_a_batch_the_ranks_cannot_split_evenly_is_refused_before_any_work(tmp_path):
    proc = torchrun([*TINY, "--batch-size", "3", "--steps", "5", "--results-dir", str(tmp_path / "results")])
    out = finish(proc, timeout=120)
    assert proc.returncode != 0
    text = ours(out)
    assert text.count("error: --batch-size 3 is not divisible by the 2 processes torchrun started") == 1, out[-3000:]
    assert not (tmp_path / "results").exists()
    no_traceback_of_ours(out)


def test_resuming_on_a_world_size_that_does_not_divide_the_batch_names_the_checkpoints_batch():
    cfg = TrainConfig(**{**PRESETS["cpu"], "batch_size": 6})
    check_world_size(cfg, 3, resumed=True)
    with pytest.raises(ConfigError, match=r"the checkpoint's --batch-size 6 is not divisible by the 4 processes torchrun "
                                          r"started: .*resume on a number of processes that divides 6"):
        check_world_size(cfg, 4, resumed=True)


@pytest.mark.parametrize("flag", [["--zero"], ["--dist-timeout", "5"], ["--backend", "gloo"], ["--bucket-cap-mb", "5"]])
def test_several_process_flags_are_refused_in_one_process(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        main([*TINY, *flag, "--results-dir", str(tmp_path / "results")])
    assert e.value.code == 2
    assert f"error: {flag[0]} is for a run across several processes; launch one with " \
           f"{shown_path(os.path.join(os.path.dirname(sys.executable), 'torchrun'))} --standalone --nproc_per_node=N -m " \
           "examples.diffusion.train" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_the_process_group_pieces_on_real_ranks(tmp_path):
    """Broadcast start, overlapped and after-the-backward averaging, DDP's buffer rule, the stop agreement."""
    proc = torchrun([str(WORKER), str(tmp_path)], module=None)
    out = finish(proc, timeout=120)
    assert proc.returncode == 0, out[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert torch.equal(r0["start_bias"], r1["start_bias"])  # rank 1 started different and got rank 0's params
    for r in (r0, r1):
        assert r["streams_differ"].startswith("ValueError: pfunc.distributed.check_identical: random streams['order'] differs")
    for step in range(3):
        mean = {k: (r0[f"local_grads_{step}"][k] + r1[f"local_grads_{step}"][k]) / 2 for k in r0[f"local_grads_{step}"]}
        for r in (r0, r1):
            for k, want in mean.items():
                torch.testing.assert_close(r[f"overlapped_{step}"][k], want, rtol=0, atol=1e-6)
                torch.testing.assert_close(r[f"after_{step}"][k], want, rtol=0, atol=1e-6)
        # BatchNorm statistics differ per rank's data; after the step every rank has rank 0's
        assert not torch.equal(r0[f"local_bn_{step}"], r1[f"local_bn_{step}"])
        assert torch.equal(r1[f"synced_bn_{step}"], r0[f"local_bn_{step}"]) and torch.equal(r0[f"synced_bn_{step}"], r0[f"local_bn_{step}"])
        assert r0[f"synced_u_is_local_{step}"] and r1[f"synced_u_is_local_{step}"]  # spectral norm's u: not sent
    for r in (r0, r1):
        assert r["params_identical"] == "no error" and r["state_identical"] == "no error"
        assert r["agree"] == (1.0, True) and r["agree_none"] == (1.0, False)  # mean of 0.5 and 1.5; rank 1's stop stops all
    assert r0["unchanged_is_same"]
    assert r0["param_state"].keys() == {"0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v"}


def test_module_buffers_and_parametrization_state_are_told_apart():
    assert is_module_buffer("1.running_mean") and is_module_buffer("time_mlp.0.weights")
    assert not is_module_buffer("0.parametrizations.weight.0._u") and not is_module_buffer("parametrizations.weight.0._v")
    dp = DataParallel(rank=1, world_size=4, device=torch.device("cpu"), backend="gloo", timeout_s=60.0)
    assert [dp.rows(8), DataParallel(0, 4, torch.device("cpu"), "gloo", 60.0).rows(8)] == [slice(2, 4), slice(0, 2)]


@pytest.mark.parametrize("flag, message", [
    (["--dist-timeout", "0"], "--dist-timeout must be a positive, finite number of seconds, got 0.0"),
    (["--dist-timeout", "inf"], "--dist-timeout must be a positive, finite number of seconds, got inf"),
    (["--bucket-cap-mb", "nan"], "--bucket-cap-mb must be a positive, finite number of MB, got nan"),
])
def test_several_process_flags_with_values_that_cannot_work_are_refused(flag, message):
    args = build_parser().parse_args([*TINY, *flag])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_launch_flags(args, 2)
    check_launch_flags(build_parser().parse_args([*TINY, "--dist-timeout", "5", "--bucket-cap-mb", "1", "--zero"]), 2)


def test_the_device_and_backend_of_a_rank_are_chosen_or_refused_naming_the_flag():
    launch = Launch(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert choose_backend(None, torch.device("cpu")) == "gloo" and choose_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(ConfigError, match=r"--backend nccl moves CUDA tensors only, and this run is on cpu"):
        choose_backend("nccl", torch.device("cpu"))
    if torch.cuda.is_available():  # one GPU per process, from LOCAL_RANK
        if torch.cuda.device_count() >= 2:
            assert rank_device("auto", launch) == torch.device("cuda", 1)
        else:
            with pytest.raises(ConfigError, match=r"each process needs its own GPU: pass --nproc_per_node=1"):
                rank_device("auto", launch)
        return
    assert rank_device("auto", launch) == torch.device("cpu") and rank_device("cpu", launch) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device cuda: CUDA is not available on this machine"):
        rank_device("cuda", launch)
