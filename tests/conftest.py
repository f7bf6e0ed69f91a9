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
    """``slow`` tests run only with PFUNC_SLOW=1 (CI keeps under its time budget); ``compile``
    tests only on a torch whose compiler handles pfunc's functional path."""
    import pytest
    import torch
    from torch.torch_version import TorchVersion

    from pfunc import COMPILE_MIN_TORCH

    slow = None if os.environ.get("PFUNC_SLOW") == "1" else pytest.mark.skip(reason="slow: set PFUNC_SLOW=1 to run")
    compile_ok = TorchVersion(torch.__version__) >= COMPILE_MIN_TORCH
    old_torch = pytest.mark.skip(reason=f"torch.compile of pfunc's functional path needs torch >= {COMPILE_MIN_TORCH}")
    for item in items:
        if slow is not None and "slow" in item.keywords:
            item.add_marker(slow)
        if not compile_ok and "compile" in item.keywords:
            item.add_marker(old_torch)
