"""pytest plugin: Hypothesis profiles for parametrization checks, a ``check_parametrization`` fixture, one option.

Enable it with ``pytest -p pfunc.testing.plugin``, or in your root ``conftest.py``::

    pytest_plugins = ["pfunc.testing.plugin"]

It then provides

* the profiles of :mod:`pfunc.testing.profiles` (``--hypothesis-profile=pfunc-ci``,
  ``pfunc-dev``, ``pfunc-thorough``), registered when the plugin is imported;
* ``--pfunc-max-examples=N``: examples per check made through the fixture (default: the profile's);
* the ``check_parametrization`` fixture: :func:`pfunc.testing.check_parametrization` with that
  option applied, which records each report's summary on the test (``user_properties``, so
  ``--junitxml`` keeps it);
* a report header line naming the active Hypothesis profile.

A test is then a few lines::

    def test_my_parametrization(check_parametrization):
        check_parametrization(MyParam(), S.square_matrices(), constraint=C.symmetric())
"""

from __future__ import annotations

from typing import Any, Callable

import hypothesis
import pytest

from .checks import check_parametrization as _check
from .profiles import register_profiles
from .report import CheckReport

register_profiles()

OPTION = "--pfunc-max-examples"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pfunc", "pfunc.testing: property checks of parametrizations")
    group.addoption(
        OPTION,
        type=int,
        default=None,
        metavar="N",
        help="Hypothesis examples per check made through the check_parametrization fixture (default: the profile's).",
    )


def pytest_report_header(config: pytest.Config) -> str:
    current = hypothesis.settings()
    examples = config.getoption(OPTION) or current.max_examples
    return f"pfunc.testing: {examples} examples per parametrization check, derandomize={current.derandomize}"


@pytest.fixture
def check_parametrization(request: pytest.FixtureRequest) -> Callable[..., CheckReport]:
    """:func:`pfunc.testing.check_parametrization` with ``--pfunc-max-examples`` applied (an explicit
    ``max_examples=`` wins); each report's summary is recorded in the test's ``user_properties``."""
    option = request.config.getoption(OPTION)

    def check(parametrization: Any, inputs: Any, **kwargs: Any) -> CheckReport:
        if option is not None:
            kwargs.setdefault("max_examples", option)
        report = _check(parametrization, inputs, **kwargs)
        request.node.user_properties.append(("pfunc_check", report.summary()))
        return report

    return check
