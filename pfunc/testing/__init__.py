"""Property-testing kit for parametrizations: Hypothesis strategies, invariant checks, a pytest plugin.

One call checks that a parametrization (yours or a built-in, plain, torch-style
``nn.Module`` or stateful, alone or chained) is correct and safe to train with:

>>> import torch
>>> from pfunc.parametrizations import Skew, Cayley
>>> from pfunc.testing import check_parametrization, strategies as S, constraints as C
>>> report = check_parametrization(
...     [Skew(), Cayley()], S.square_matrices(min_value=-2, max_value=2),
...     constraint=C.special_orthogonal(), max_examples=5)
>>> sorted(report.checked)[:3]
['compiled_matches_eager', 'constraint_holds', 'constraint_holds_after_training_steps']

A violated property raises :class:`ParametrizationCheckError` (an ``AssertionError``)
listing each failure with its minimal input and discrepancy; what the edge of the domain shows
(zero, tiny, large inputs) is in ``report.warnings``, never a failure. The properties live in
:mod:`pfunc.testing.properties`, one family per module. See
``pfunc/testing/README.md`` and ``examples/property_test_your_own.py``.
"""

try:
    import hypothesis  # noqa: F401  (the kit is built on it; pfunc itself is not)
except ModuleNotFoundError as e:
    if e.name != "hypothesis":
        raise
    raise ModuleNotFoundError(
        "pfunc.testing needs Hypothesis, which is not installed: pip install 'pfunc[testing]' (or: pip install hypothesis)",
        name="hypothesis",
    ) from None

from . import constraints, strategies
from .checks import check_parametrization, hypothesis_settings, parametrization_test
from .profiles import register_profiles
from .properties import PROPERTIES
from .reference import torch_reference
from .report import CheckReport, CheckWarning, ParametrizationCheckError, PropertyFailure, describe
from .tolerance import Tolerance, compare

__all__ = [
    "check_parametrization",
    "parametrization_test",
    "hypothesis_settings",
    "ParametrizationCheckError",
    "CheckReport",
    "CheckWarning",
    "PropertyFailure",
    "PROPERTIES",
    "Tolerance",
    "compare",
    "describe",
    "torch_reference",
    "register_profiles",
    "strategies",
    "constraints",
]
