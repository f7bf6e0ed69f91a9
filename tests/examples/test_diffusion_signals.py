"""SIGTERM, the signal batch schedulers (SLURM, Kubernetes, torchrun's shutdown) stop a job with, is a graceful
stop exactly like the first Ctrl-C, acknowledged at once whatever the run is doing, on real processes: during
the training steps (finish the step, save, print a resume command that runs as printed, exit 143), during
compilation (stop at once: nothing trained is lost) and during the final sampling (stop at once: training is
complete and saved)."""

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from examples.commands import shown_path
from examples.diffusion.checkpoint import load_checkpoint
from examples.diffusion.run_outputs import read_losses

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "64",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "100",
    "--checkpoint-every", "1000", "--log-every", "1000", "--seed", "5",
]
# the venv's bin folder is not on this PATH: a printed command must name the interpreter itself
BARE_ENV = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
            "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


class Lines:
    """A process's merged output, read as it comes (a thread puts each line in a queue, with its arrival time)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.seen, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put((time.monotonic(), line.rstrip("\n")))
        self._q.put((time.monotonic(), None))

    def wait_for(self, text: str, timeout: float) -> float:
        """The arrival time of the first line containing ``text``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for at, line in self.seen:
            if line is not None and text in line:
                return at
        while True:
            try:
                at, line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {timeout} s; output so far:\n" + self.text()[-3000:])
            self.seen.append((at, line))
            if line is None:
                pytest.fail(f"the process ended without a line with {text!r}:\n" + self.text()[-3000:])
            if text in line:
                return at

    def finish(self, timeout: float) -> int:
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running {timeout} s later:\n" + self.text()[-3000:])
        while True:
            try:
                item = self._q.get(timeout=10)
            except queue.Empty:
                break
            self.seen.append(item)
            if item[1] is None:
                break
        return status

    def text(self) -> str:
        return "\n".join(line for _, line in self.seen if line is not None)


def _train(args, **kw) -> Lines:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return Lines(subprocess.Popen([sys.executable, "-m", "examples.diffusion.train", *args], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw))


def _only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def test_sigterm_while_training_finishes_the_step_saves_once_and_prints_a_resume_command_that_runs_as_printed(tmp_path):
    out = _train([*TINY, "--steps", "400", "--results-dir", str(tmp_path / "results")])
    deadline = time.time() + 120
    while not (logs := list((tmp_path / "results").glob("*/losses.jsonl"))) or len(read_losses(logs[0])) < 3:
        assert out.proc.poll() is None and time.time() < deadline, out.text()
        time.sleep(0.02)
    sent = time.monotonic()
    out.proc.send_signal(signal.SIGTERM)
    acknowledged = out.wait_for("SIGTERM received: finishing the current step, then saving a checkpoint and stopping", 5)
    assert acknowledged - sent < 2.0
    assert out.finish(60) == 128 + signal.SIGTERM, out.text()
    run = _only_run(tmp_path / "results")
    at_stop = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 3 <= at_stop < 400 and [s for s, _ in read_losses(run / "losses.jsonl")] == list(range(1, at_stop + 1))
    (said,) = [line for line in out.text().splitlines() if line.startswith("SIGTERM: stopped at step")]
    hint = f"{shown_path(sys.executable, str(REPO))} -m examples.diffusion.train --resume {run}"
    assert said == f"SIGTERM: stopped at step {at_stop}/400 and saved {run / 'checkpoint.pt'}; resume with: {hint}"
    assert "Traceback" not in out.text()
    # the hint, copied into a shell without the venv on its PATH, runs (here told to stop 2 steps later)
    command = said.split("resume with: ", 1)[1] + f" --steps {at_stop + 2}"
    resumed = subprocess.run(shlex.split(command), cwd=REPO, env=BARE_ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run} at step {at_stop}/{at_stop + 2}" in resumed.stdout
    assert load_checkpoint(run / "checkpoint.pt")["step"] == at_stop + 2


@pytest.mark.compile
def test_sigterm_while_the_first_step_compiles_stops_at_once_and_leaves_no_half_made_run(tmp_path):
    out = _train([*TINY, "--steps", "5", "--compile", "--compile-backend", "aot_eager", "--results-dir", str(tmp_path / "results")])
    out.wait_for("device: cpu", 120)   # printed just before the first step, which compiles for several seconds
    time.sleep(1.0)
    logs = list((tmp_path / "results").glob("*/losses.jsonl"))
    assert logs and not read_losses(logs[0]), "the first step was done before the signal: nothing was compiling"
    sent = time.monotonic()
    out.proc.send_signal(signal.SIGTERM)
    acknowledged = out.wait_for("SIGTERM received: torch.compile is compiling the first step", 5)
    assert acknowledged - sent < 2.0
    assert out.finish(30) == 128 + signal.SIGTERM, out.text()
    ended = time.monotonic()
    run = logs[0].parent
    assert f"SIGTERM: stopped while compiling the first step, before any training: removed {run}" in out.text()
    assert not run.exists() and "Traceback" not in out.text()
    assert ended - sent < 20, "the run waited for the compiler to finish"


def test_sigterm_while_sampling_at_the_end_stops_at_once_with_training_saved(tmp_path):
    # 3 steps, then 3000 images in 99 DDIM steps: several seconds of sampling to interrupt
    argv = [*TINY, "--steps", "3", "--num-samples", "3000", "--sampling-steps", "99", "--results-dir", str(tmp_path / "results")]
    out = _train(argv)
    deadline = time.time() + 120
    while not ((ckpt := list((tmp_path / "results").glob("*/checkpoint.pt"))) and len(read_losses(ckpt[0].parent / "losses.jsonl")) == 3):
        assert out.proc.poll() is None and time.time() < deadline, out.text()
        time.sleep(0.02)
    time.sleep(1.0)
    sent = time.monotonic()
    out.proc.send_signal(signal.SIGTERM)
    run = ckpt[0].parent
    acknowledged = out.wait_for(f"SIGTERM received: stopping the sampling now; training is complete and {run / 'checkpoint.pt'} "
                                "(step 3) is saved", 5)
    assert acknowledged - sent < 2.0
    assert out.finish(30) == 128 + signal.SIGTERM, out.text()
    assert time.monotonic() - sent < 10
    assert f"SIGTERM: stopped while sampling; training is complete and {run / 'checkpoint.pt'} (step 3) is saved" in out.text()
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3 and not (run / "samples.png").exists()
    assert "Traceback" not in out.text()
