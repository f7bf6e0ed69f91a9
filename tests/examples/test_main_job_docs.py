"""The main job's documentation against what runs: every training command the READMEs show parses with
the command's own parser (no flag guessed from its beginning), and the benchmark command that
benchmarks/README.md shows for one route runs as written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from examples.diffusion import sample
from examples.diffusion.train_args import build_parser

REPO = Path(__file__).resolve().parents[2]


def _commands(doc: str, module: str) -> list[str]:
    """Every command line in ``doc`` (in a ```bash block or in backticks) that runs ``python -m module``."""
    text = (REPO / doc).read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]*python -m " + re.escape(module) + r"[^`\n]*)`", text)
    return [line.split("  #")[0].strip() for line in lines if f"python -m {module}" in line]


@pytest.mark.parametrize("doc", ["examples/diffusion/README.md"])
def test_every_documented_training_and_sampling_command_parses(doc):
    found = 0
    for module, parser in (("examples.diffusion.train", build_parser()), ("examples.diffusion.sample", sample.build_parser())):
        for line in _commands(doc, module):
            argv = shlex.split(line.replace("<run>", "run").replace("~", "/home").replace("--seed S", "--seed 1"))
            argv = argv[argv.index(module) + 1:]
            if not argv or "--help" in argv or "..." in argv:
                continue
            parser.parse_args(argv)   # SystemExit(2) on an unknown or abbreviated flag
            found += 1
    assert found >= 5


def test_the_benchmark_command_for_one_route_runs_as_written():
    (line,) = [c for c in _commands("benchmarks/README.md", "benchmarks.unet")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"route": "pfunc pf.grad", "peak_rss_bytes": ' in done.stdout
