"""The pytest plugin, run as a user would: a fresh pytest process on a user's test file."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import hypothesis

from pfunc.testing import register_profiles
from pfunc.testing.profiles import PROFILES

ROOT = pathlib.Path(__file__).resolve().parents[2]

USER_TESTS = '''
import hypothesis
from pfunc.parametrizations import Skew, Symmetric
from pfunc.testing import parametrization_test, strategies as S, constraints as C


class NotSymmetric:
    def __call__(self, X):
        return X.triu() + X.triu(1)


def test_symmetric(check_parametrization, record_property):
    report = check_parametrization(Symmetric(), S.square_matrices(), constraint=C.symmetric())
    assert report.examples == 3                      # --pfunc-max-examples
    assert hypothesis.settings().derandomize         # --hypothesis-profile=pfunc-ci


def test_explicit_max_examples_wins(check_parametrization):
    assert check_parametrization(Skew(), S.square_matrices(), max_examples=2).examples == 2


test_skew_in_one_line = parametrization_test(Skew(), S.square_matrices(), constraint=C.skew(), max_examples=2)


def test_not_symmetric(check_parametrization):
    check_parametrization(NotSymmetric(), S.square_matrices(), constraint=C.symmetric())
'''


def test_plugin_gives_profiles_option_and_fixture_and_failures_read_well(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYPOTHESIS_PROFILE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pfunc.testing.plugin", "--hypothesis-profile=pfunc-ci",
         "--pfunc-max-examples=3", "-p", "no:cacheprovider", "-q", "-rN", "test_user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    out = result.stdout + result.stderr
    assert "1 failed, 3 passed" in out, out
    assert "NotSymmetric violates 1 property" in out and "[constraint_holds]" in out, out
    # shrunk to a single 1.0 above the diagonal, the rest zero (which n x n depends on the search path)
    found = re.search(r"minimal failing input:(?s:.*?)X = float64\[(\d), \1\] = (\[[^\n]*\])", out)
    assert found, out
    entries = [float(v) for v in re.findall(r"-?\d+\.\d+", found.group(2))]
    assert sorted(entries)[-1] == 1.0 and entries.count(0.0) == len(entries) - 1, out


def test_profiles_register_and_load():
    names = register_profiles()
    assert names == tuple(PROFILES) == ("pfunc-ci", "pfunc-dev", "pfunc-thorough")
    ci = hypothesis.settings.get_profile("pfunc-ci")
    assert ci.derandomize and ci.max_examples == 25 and ci.deadline is None
    assert hypothesis.settings.get_profile("pfunc-thorough").max_examples == 1000
