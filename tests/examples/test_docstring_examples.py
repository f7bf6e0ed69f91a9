"""The runnable examples in the docstrings of the modules that launch and split work across processes, print
commands, choose threads, check PNG data, turn signals into stops, and run the diffusion process."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", [
    "examples.diffusion.data_parallel",
    "examples.diffusion.train_args",
    "examples.diffusion.run_outputs",
    "examples.ensemble_report",
    "examples.commands",
    "examples.threads",
    "examples.diffusion.png_data",
    "examples.diffusion.interrupt",
    "examples.diffusion.gaussian_diffusion",
    "examples.diffusion.schedules",
])
def test_the_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted and not result.failed
