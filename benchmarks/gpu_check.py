"""The whole GPU check in one command, under ten minutes, one report: ``python -m benchmarks.gpu_check``.

Run from the repository root on a CUDA machine::

    python -m benchmarks.gpu_check                   # every stage; writes gpu_check/REPORT.md
    python -m benchmarks.gpu_check --dry-run         # the plan: each stage's command and time limit (no GPU needed)
    python -m benchmarks.gpu_check --only cuda-tests,benchmarks --out /tmp/check

Stages, each a subprocess with its own time limit (the limits add up to 9.5 minutes):

1. ``setup``: what this Python lacks of ``optree``, ``pytest``, ``hypothesis``, ``tqdm``, ``PIL``,
   ``matplotlib`` is installed from the wheels in ``.whl/`` (``pip install --no-index --find-links .whl``;
   BENCHMARKS.md says how to fill it), then the GPU, torch and CUDA versions are recorded.
2. ``cuda-tests``: the suite's tests marked ``cuda`` (the fake-CUDA dry runs, computing on the GPU);
   ``fake-cuda``: the dry runs themselves, which dry-run gradients too here (torch is built with CUDA).
3. ``benchmarks``: ``python -m benchmarks.run --device cuda --quick``: the Unet's bf16 training step
   (images/s, TFLOP/s, % of the card's peak), ensembles of N = 32 and 1024, power iteration vmapped vs a loop.
4. ``train``: ``--preset gpu`` (bf16, ``torch.compile``) for 300 steps, then ``examples.diffusion.sample``
   draws 64 images from it with DDIM (250 steps).
5. ``nccl``: with two GPUs or more, the same run under ``torchrun --nproc_per_node=2`` (NCCL), 100 steps.

Without a CUDA device the command refuses (exit 2) unless ``--dry-run``, or every stage in ``--only``
runs without one (``setup``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
NEEDED = ("optree", "pytest", "hypothesis", "tqdm", "PIL", "matplotlib")  # importable names
DISTRIBUTIONS = {"PIL": "pillow"}  # where the wheel's name differs

__all__ = ["Stage", "stages", "run_stage", "main"]


@dataclass(frozen=True)
class Stage:
    """One step of the check: a command run from the repository root with a time limit."""

    name: str
    what: str
    argv: tuple[str, ...]
    timeout_s: float
    needs_gpu: bool = True
    skip: Optional[str] = None  # why this stage does not run here


@dataclass
class Outcome:
    stage: Stage
    status: str  # passed, failed, timed out, skipped, not run
    seconds: float = 0.0
    output: str = ""


def _missing() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def stages(out: Path, gpus: int) -> list[Stage]:
    """The check's stages for a machine with ``gpus`` CUDA devices, writing under ``out``."""
    py = sys.executable
    runs = out / "runs"
    setup = [py, "-c", "import benchmarks.gpu_check as g; g.setup()"]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    fake = [*pytest, "tests/test_fake_cuda.py", "tests/examples/test_diffusion_fake_cuda.py", "tests/examples/test_diffusion_device_choice.py"]
    bench = [py, "-m", "benchmarks.run", "--device", "cuda", "--quick", "--out", str(out / "BENCHMARKS_cuda.md")]
    train = [py, "-c", "import benchmarks.gpu_check as g, sys; sys.exit(g.train_and_sample(sys.argv[1], sys.argv[2:]))",
             str(runs), "--preset", "gpu", "--steps", "300", "--checkpoint-every", "300", "--eval-samples", "0", "--device", "cuda"]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "examples.diffusion.train",
                "--preset", "gpu", "--steps", "100", "--checkpoint-every", "100", "--eval-samples", "0", "--no-compile",
                "--results-dir", str(out / "runs_nccl")]
    return [
        Stage("setup", "install what is missing from .whl/, record the machine", tuple(setup), 60, needs_gpu=False),
        Stage("cuda-tests", "the suite's tests marked cuda: the dry runs computing on the GPU", (*pytest, "-m", "cuda", "tests"), 60),
        Stage("fake-cuda", "the fake-CUDA dry runs, gradients included (torch built with CUDA)", tuple(fake), 60),
        Stage("benchmarks", "benchmarks.run --device cuda --quick: Unet bf16, ensembles to N=1024, power iteration", tuple(bench), 180),
        Stage("train", "--preset gpu, 300 steps (bf16, torch.compile), then 64 DDIM samples", tuple(train), 150),
        Stage("nccl", "2 processes under torchrun, NCCL, 100 steps", tuple(torchrun), 60,
              skip=None if gpus >= 2 else f"{gpus} GPU(s) here: needs 2"),
    ]


def setup() -> None:
    """Install the missing packages from ``.whl/`` and print the machine (the ``setup`` stage)."""
    missing = _missing()
    if missing:
        wanted = [DISTRIBUTIONS.get(m, m) for m in missing]
        if not WHEELS.is_dir():
            sys.exit(f"setup: missing {', '.join(wanted)} and there is no {WHEELS} to install them from (see BENCHMARKS.md)")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS), *wanted]
        print("$", shlex.join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            sys.exit(f"setup: pip could not install {', '.join(wanted)} from {WHEELS}")
    import torch

    print(json.dumps(_machine(torch), indent=1))


def _machine(torch) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    return info


def train_and_sample(results_dir: str, train_args: Sequence[str]) -> int:
    """Train with ``train_args`` into ``results_dir``, then sample 64 images from the run (the ``train`` stage)."""
    cmd = [sys.executable, "-m", "examples.diffusion.train", *train_args, "--results-dir", results_dir]
    print("$", shlex.join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=ROOT).returncode
    if status:
        return status
    run = max(Path(results_dir).iterdir(), key=lambda p: p.stat().st_mtime)
    metrics = run / "metrics.json"
    if metrics.exists():
        print("metrics.json:", metrics.read_text(), flush=True)
    cmd = [sys.executable, "-m", "examples.diffusion.sample", str(run), "--num-samples", "64", "--device", "cuda"]
    print("$", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def run_stage(stage: Stage) -> Outcome:
    """Run one stage from the repository root within its time limit; its output is kept for the report.

    The stage runs in a session of its own, so at its limit every process it started (a training run,
    torchrun's workers) is killed with it, not left on the GPU for the next stage."""
    if stage.skip is not None:
        return Outcome(stage, "skipped")
    start = time.perf_counter()
    proc = subprocess.Popen(list(stage.argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=stage.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return Outcome(stage, "timed out", time.perf_counter() - start, output or "")
    return Outcome(stage, "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
                   time.perf_counter() - start, output or "")


def report(outcomes: list[Outcome], machine: dict, out: Path, tail_lines: int = 40) -> Path:
    """Write ``out/REPORT.md``: the machine, one table row per stage, each stage's command and output tail."""
    lines = ["# GPU check", "", f"`python -m benchmarks.gpu_check` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "| stage | status | seconds | limit |", "|---|---|---|---|"]
    for o in outcomes:
        status = o.status + (f": {o.stage.skip}" if o.stage.skip else "")
        lines.append(f"| {o.stage.name} | {status} | {o.seconds:.0f} | {o.stage.timeout_s:.0f} |")
    for o in outcomes:
        lines += ["", f"## {o.stage.name}: {o.stage.what}", "", "```", "$ " + shlex.join(o.stage.argv)]
        if o.output:
            lines += o.output.rstrip().splitlines()[-tail_lines:]
        lines.append("```")
    bench = out / "BENCHMARKS_cuda.md"
    if bench.exists():
        lines += ["", "## benchmark tables", "", bench.read_text()]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="folder of the report and the runs (default: gpu_check)")
    parser.add_argument("--only", default="", help="comma-separated stages out of setup,cuda-tests,fake-cuda,benchmarks,train,nccl")
    parser.add_argument("--dry-run", action="store_true", help="write the plan (each stage's command and limit); run nothing")
    args = parser.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = Path(args.out).resolve()
    plan = stages(out, gpus)
    names = [s.name for s in plan]
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in names]
    if unknown:
        parser.error(f"--only: unknown stages {unknown}; choose from {names}")
    chosen = [s for s in plan if not only or s.name in only]
    if not gpus and not args.dry_run and any(s.needs_gpu for s in chosen):
        parser.exit(2, f"error: torch {torch.__version__} sees no CUDA device here; the GPU check needs one "
                       f"(--dry-run shows the plan, --only setup runs without one)\n")
    out.mkdir(parents=True, exist_ok=True)
    machine = {"torch": torch.__version__, "CUDA": torch.version.cuda, "GPUs": gpus,
               "GPU": torch.cuda.get_device_name(0) if gpus else "none"}
    if args.dry_run:
        outcomes = [Outcome(s, "skipped" if s.skip else "not run") for s in chosen]
    else:
        outcomes = []
        for s in chosen:
            print(f"[gpu_check] {s.name}: {s.what} (limit {s.timeout_s:.0f} s)", file=sys.stderr, flush=True)
            outcomes.append(run_stage(s))
            print(f"[gpu_check] {s.name}: {outcomes[-1].status} in {outcomes[-1].seconds:.0f} s", file=sys.stderr, flush=True)
            report(outcomes, machine, out)
    path = report(outcomes, machine, out)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all(o.status in ("passed", "skipped", "not run") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
