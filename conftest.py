"""The documentation's code runs as tests: every ```python block of README.md and docs/, in order
within its page, in one namespace per page (Sybil). A block that is deliberately a fragment is
preceded by ``<!-- skip: next "why" -->`` and shows as skipped, with its reason, in the test report.
The test configuration proper (Hypothesis profiles, threads) is tests/conftest.py.
"""

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["*.md"],
    excludes=["CHANGELOG.md", "_build/*"],
).pytest()
