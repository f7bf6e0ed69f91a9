"""The README is a landing page whose commands are CI's, and every page's code is marked honestly.

The code blocks themselves run through Sybil (the repository's conftest.py): every ```python block
of README.md, docs/ and the guides kept beside their code, in order within each page.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUIDES_BESIDE_CODE = ["pfunc/testing/README.md", "examples/diffusion/README.md", "examples/README_uses.md",
                      "benchmarks/README.md"]
PAGES = ["README.md", *GUIDES_BESIDE_CODE,
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]


def _bash_blocks(doc: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def test_ci_runs_exactly_the_readmes_test_command():
    test_command = next(b.strip() for b in _bash_blocks("README.md") if "pytest" in b)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    assert not any(line.startswith("export") for line in ci), "CI must not set what a user's copy-paste lacks"


def test_the_readme_opens_with_commands_that_work_after_its_own_setup():
    opening = (ROOT / "README.md").read_text().split("\n---\n", 1)[0]
    main_job, tests = _bash_blocks("README.md")[:2]
    for command, extras in ((main_job, ".[test,examples]"), (tests, ".[test,examples,docs]")):
        setup, _, run = command.strip().rpartition(" && ")
        assert f'-e "{extras}"' in setup and run.startswith(".venv/bin/python -m ")
    assert "examples.diffusion.train" in main_job and "pytest" in tests
    assert opening.index("pfunc gives PyTorch") < opening.index("```bash")  # what it is, before the commands
    for phrase in ("seed 00", "the seed"):
        assert phrase not in opening.lower()


def test_the_readme_is_a_landing_page_of_about_two_screens():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 110


def test_the_test_configuration_collects_every_page_with_code():
    import tomllib

    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    for page in PAGES:
        if "```python" in (ROOT / page).read_text():
            assert page in testpaths or any(page.startswith(f"{path}/") for path in testpaths), page


@pytest.mark.parametrize("page", PAGES)
def test_every_skipped_block_says_why_and_no_block_is_silently_left_out(page):
    text = (ROOT / page).read_text()
    skips = re.findall(r"<!--\s*skip:\s*(\w+)(.*?)-->", text)
    for action, reason in skips:
        if action in ("next", "start"):
            assert re.fullmatch(r'\s*"[^"]{10,}"\s*', reason), f"{page}: a skip without a reason: {action}{reason}"
    # a fence in a language Sybil does not run (```py) would be a block nobody tests, silently
    assert not re.search(r"^```py\s*$", text, flags=re.M), f"{page}: ```py blocks are not run: use ```python"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_at_files_that_exist(page):
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert ((ROOT / page).parent / target).exists(), f"{page}: the link {target!r} points nowhere"
