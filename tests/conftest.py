"""Hypothesis profiles: "ci" (deterministic, fast; used by .ci/run) and "dev" (longer, random)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with PFUNC_SLOW=1 (CI keeps under its time budget)."""
    import pytest

    if os.environ.get("PFUNC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PFUNC_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
