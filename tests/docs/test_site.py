"""The documentation site builds strictly and documents every public name.

The build is the one a maintainer runs: Sphinx with warnings as errors and every cross-reference
checked (``-W -n``), so a broken link, an unknown name or a malformed docstring fails CI.
"""

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The public namespaces the API reference covers, and each one's names (its __all__).
PUBLIC_MODULES = [
    "pfunc", "pfunc.parametrizations", "pfunc.ensemble", "pfunc.spectral", "pfunc.power", "pfunc.tree",
    "pfunc.distributed", "pfunc.testing", "pfunc.testing.strategies", "pfunc.testing.constraints",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("sphinx", reason="the docs extra (pip install -e '.[docs]') builds the site")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q", "-j", "1",
         str(ROOT / "docs"), str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert build.returncode == 0, f"the docs do not build strictly:\n{build.stderr[-6000:]}"
    return out


def _documented(site: pathlib.Path) -> set[str]:
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    by_kind = getattr(inventory, "data", inventory)  # Sphinx >= 8.2 wraps the mapping
    return {name for kind, entries in by_kind.items() if kind.startswith("py:") for name in entries}


def test_the_site_builds_with_warnings_as_errors_and_every_reference_resolved(site):
    assert (site / "index.html").is_file() and (site / "api" / "core.html").is_file()


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_a_reference_entry(site, module):
    documented = _documented(site)
    mod = importlib.import_module(module)
    missing = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if isinstance(obj, type(sys)):          # a submodule: documented as a module of its own
            continue
        if f"{module}.{name}" not in documented:
            missing.append(f"{module}.{name}")
    assert not missing, f"not in the API reference: {missing}"


def test_every_guide_is_reachable_from_the_table_of_contents(site):
    pages = {p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts}
    built = {p.relative_to(site).with_suffix("") for p in site.rglob("*.html")}
    assert pages <= built
