"""Every docstring example in pfunc runs and prints what it says (the API reference shows them)."""

import doctest
import importlib
import pkgutil

import pytest

import pfunc

MODULES = ["pfunc", *sorted(m.name for m in pkgutil.walk_packages(pfunc.__path__, "pfunc."))]


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_of_every_module_run_as_written(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert not result.failed, f"{name}: {result.failed} of {result.attempted} docstring examples failed (printed above)"


def test_the_public_modules_show_examples():
    for name in ("pfunc", "pfunc.ensemble", "pfunc.grad", "pfunc.interop", "pfunc.parametrize", "pfunc.spectral",
                 "pfunc.parametrizations.matrix", "pfunc.parametrizations.norm", "pfunc.testing"):
        assert doctest.DocTestFinder().find(importlib.import_module(name)), f"{name} has no docstring example"
