"""What a user installing pfunc relies on: the wheel builds with complete metadata, and the testing
kit's optional dependency is named when it is missing."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]

WITHOUT_HYPOTHESIS = """
import sys
class NoHypothesis:
    def find_spec(self, name, path=None, target=None):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoHypothesis())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_HYPOTHESIS + code], capture_output=True, text=True, cwd=ROOT)


def test_pfunc_imports_and_works_without_hypothesis():
    done = _run("import torch, pfunc as pf; net = pf.parametrize(torch.nn.Linear(2, 2), {'weight': torch.tanh}); "
                "print(sorted(net.init()[0]))")
    assert done.returncode == 0, done.stderr
    assert "parametrizations.weight.original" in done.stdout


def test_the_testing_kit_without_hypothesis_names_the_extra_to_install():
    done = _run("import pfunc.testing")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ModuleNotFoundError: pfunc.testing needs Hypothesis, which is not installed: "
                    "pip install 'pfunc[testing]' (or: pip install hypothesis)")
    assert "During handling" not in done.stderr  # the one message, not a chain of two


def test_the_wheel_builds_with_its_metadata_and_without_tests_or_examples(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("pfunc-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "pfunc/py.typed" in names and "pfunc/testing/__init__.py" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/", "docs/")) for n in names)
    headers = [line for line in meta.split("\n\n", 1)[0].splitlines()]
    for expected in ("Name: pfunc", "License-Expression: BSD-3-Clause", "Requires-Dist: torch>=2.4",
                     "Requires-Dist: optree>=0.13", "Provides-Extra: testing", "Provides-Extra: docs",
                     'Requires-Dist: hypothesis>=6.100; extra == "testing"', "Requires-Python: >=3.10",
                     "Classifier: Typing :: Typed"):
        assert expected in headers, f"{expected!r} not in the wheel's metadata"
    assert sum(h.startswith("Classifier: ") for h in headers) >= 8
    # the library itself needs torch and optree only
    assert [h for h in headers if h.startswith("Requires-Dist:") and "extra ==" not in h] == [
        "Requires-Dist: torch>=2.4", "Requires-Dist: optree>=0.13"]
