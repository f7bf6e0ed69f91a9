"""The docs are executable and true to what users run.

Every ```python block of README.md and the detailed guides it links runs, in order, in one
namespace per document (a block fenced as ```py is a fragment of a larger program, shown for
reading, not run); CI runs exactly the README's test command; the README's opening commands work
after its own setup.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", "examples/diffusion/README.md", "pfunc/testing/README.md",
        "examples/README_uses.md", "benchmarks/README.md"]


def _blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(_blocks("README.md")) >= 8


@pytest.mark.parametrize("doc", DOCS)
def test_doc_python_snippets_run(doc):
    blocks = _blocks(doc)
    assert blocks, f"{doc} has no runnable ```python block"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{doc}[python block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"{doc} python block {i} failed: {type(e).__name__}: {e}\n{block}")


def _bash_blocks(doc: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def test_ci_runs_exactly_the_readmes_test_command():
    test_command = next(b.strip() for b in _bash_blocks("README.md") if "pytest" in b)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    assert not any(line.startswith("export") for line in ci), "CI must not set what a user's copy-paste lacks"


def test_the_readme_opens_with_commands_that_work_after_its_own_setup():
    opening = (ROOT / "README.md").read_text().split("\n---\n", 1)[0]
    first, second = _bash_blocks("README.md")[:2]
    for command in (first, second):
        setup, _, run = command.strip().rpartition(" && ")
        assert '-e ".[test,examples]"' in setup and run.startswith(".venv/bin/python -m ")
    assert opening.index("pfunc gives PyTorch") < opening.index("```bash")  # what it is, before the commands
    for phrase in ("seed 00", "the seed"):
        assert phrase not in opening.lower()
