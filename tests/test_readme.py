"""Every ```python block of the docs runs, in order, in one namespace per document.

The docs are executable: README.md and the detailed guides it links. A block fenced as
```py is a fragment of a larger program (shown for reading, not run).
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
