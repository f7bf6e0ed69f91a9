"""The API reference's hand-written entries for constants state their current values."""

import pathlib
import re

import pfunc.distributed
import pfunc.testing.strategies

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_documented_constants_have_their_values():
    for page, module in (("testing.md", pfunc.testing.strategies), ("distributed.md", pfunc.distributed)):
        text = (ROOT / "docs" / "api" / page).read_text()
        entries = re.findall(r"\.\. py:data:: (\w+)\n   :value: (\S+)", text)
        assert entries
        for name, value in entries:
            assert float(value) == getattr(module, name), f"docs/api/{page}: {name} is {getattr(module, name)}, not {value}"
