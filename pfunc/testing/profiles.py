"""Hypothesis profiles for property-testing parametrizations.

==================  =============================================================
``pfunc-ci``        deterministic (``derandomize``), 25 examples, no deadline: the
                    same examples on every run, fast enough for CI.
``pfunc-dev``       random, 200 examples, failures saved to the example database.
``pfunc-thorough``  random, 1000 examples: before a release, or hunting a bug.
==================  =============================================================

Select one with ``pytest --hypothesis-profile=pfunc-ci`` (the pytest plugin
registers them) or ``hypothesis.settings.load_profile("pfunc-ci")`` after
:func:`register_profiles`. The checks follow the active profile unless given
``max_examples`` or ``settings``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

__all__ = ["register_profiles", "PROFILES"]

PROFILES: dict[str, dict] = {
    "pfunc-ci": dict(
        derandomize=True,
        max_examples=25,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    ),
    "pfunc-dev": dict(max_examples=200, deadline=None, print_blob=True),
    "pfunc-thorough": dict(max_examples=1000, deadline=None, print_blob=True),
}
"""Profile name -> ``hypothesis.settings`` keyword arguments."""


def register_profiles() -> tuple[str, ...]:
    """Register :data:`~pfunc.testing.profiles.PROFILES` with Hypothesis (idempotent); returns their names."""
    for name, kwargs in PROFILES.items():
        settings.register_profile(name, **kwargs)
    return tuple(PROFILES)
