"""tests/conftest.py: a plain ``python -m pytest`` runs as CI does (the "ci" Hypothesis profile, one thread)."""

import os
import subprocess
import sys
from pathlib import Path

import hypothesis
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_this_session_runs_with_the_profile_and_threads_the_environment_asks_for():
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    assert hypothesis.settings.default == hypothesis.settings.get_profile(profile)
    assert torch.get_num_threads() == int(os.environ.get("OMP_NUM_THREADS", "1"))


def _pytest(tmp_path, env_changes, *args):
    """A fresh pytest run in ``tmp_path`` with tests/conftest.py beside a probe test."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_probe.py").write_text(
        "import os, hypothesis, torch\n"
        "def test_probe():\n"
        "    s = hypothesis.settings.default\n"
        "    print('PROBE', s.max_examples, s.derandomize, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HYPOTHESIS_PROFILE", "OMP_NUM_THREADS", "CI")}
    env.update(env_changes, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_probe.py", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "PROBE 25 True 1 1"),                                   # no variables: CI's behaviour
        ({"HYPOTHESIS_PROFILE": "dev"}, "PROBE 200 False 1 1"),       # the long search, opted into
    ],
)
def test_a_plain_pytest_gets_cis_settings_and_the_long_profile_is_opt_in(tmp_path, env, expected):
    result = _pytest(tmp_path, env)
    assert expected in result.stdout, result.stdout + result.stderr


def test_an_unknown_profile_is_a_one_line_usage_error(tmp_path):
    result = _pytest(tmp_path, {"HYPOTHESIS_PROFILE": "fast"})
    assert result.returncode == 4
    assert "HYPOTHESIS_PROFILE='fast': the test profiles are ci, dev" in result.stderr
    assert "Traceback" not in result.stderr
