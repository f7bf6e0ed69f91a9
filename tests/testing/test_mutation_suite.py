"""The kit's mutation score, asserted: every realistic buggy variant of a correct parametrization is
caught by the property it names, and no correct parametrization is flagged.

``python -m tests.testing.mutation_score`` prints the same as a table (issue 16: 24/45 caught before
the gradient, state, batch, edge and report properties; 45/45 after).
"""

from __future__ import annotations

import functools

import pytest

from pfunc.testing import PROPERTIES

from .mutants.catalog import MUTANTS, Mutant
from .mutants.score import Outcome, caught_by, check
from .mutants.subjects import SUBJECTS, Subject, subject

pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning",  # ToeplitzByPythonFloats
    "ignore:There is a performance drop:UserWarning",
)


@functools.lru_cache(maxsize=None)
def subject_outcome(name: str) -> Outcome:
    s = subject(name)
    return check(s, s.make(), s.name)


def test_the_suite_has_at_least_30_mutants_of_at_least_10_parametrizations_of_every_kind():
    assert len(MUTANTS) >= 30 and len({m.of for m in MUTANTS}) >= 10
    assert {m.kind for m in MUTANTS} >= {"gradient", "state", "batch", "edge", "report", "value"}
    assert all(m.caught_by in PROPERTIES for m in MUTANTS), [m.caught_by for m in MUTANTS if m.caught_by not in PROPERTIES]
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


@pytest.mark.parametrize("subj", SUBJECTS, ids=[s.name for s in SUBJECTS])
def test_a_correct_parametrization_is_not_flagged(subj: Subject):
    outcome = subject_outcome(subj.name)
    assert outcome.crash is None and not outcome.failed, outcome.crash or outcome.text


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_a_buggy_variant_is_caught_by_the_property_it_names(mutant: Mutant):
    outcome = check(subject(mutant.of), mutant.make(), mutant.name)
    by = caught_by(outcome, subject_outcome(mutant.of))
    assert outcome.crash is None, outcome.crash
    expected = f"{mutant.caught_by} (warning)" if mutant.kind == "edge" and mutant.caught_by == "edge_of_domain" else mutant.caught_by
    assert expected in by, f"{mutant.name} ({mutant.bug}) caught by {by or 'nothing'}, expected {expected}\n{outcome.text}"
