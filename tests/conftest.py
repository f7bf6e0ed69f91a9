"""The test configuration: a plain ``python -m pytest -q`` behaves as CI does.

* Hypothesis: the "ci" profile (deterministic, 25 examples per property, no deadline) unless
  ``HYPOTHESIS_PROFILE`` names another; ``HYPOTHESIS_PROFILE=dev`` is the long, random search
  (200 examples per property, about ten times as long).
* Threads: one torch/OpenMP thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) unless
  ``OMP_NUM_THREADS`` says otherwise. The tests use small tensors, which gain nothing from threads,
  and on a busy 2-core machine oversubscribed OpenMP threads slow small ops a hundredfold.
  Subprocesses the tests start inherit the setting.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere, so OpenMP reads it

from hypothesis import HealthCheck, settings  # noqa: E402

PROFILES = ("ci", "dev")

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)


def _profile() -> str:
    return os.environ.get("HYPOTHESIS_PROFILE", "ci")


def _threads() -> int:
    text = os.environ.get("OMP_NUM_THREADS", "1")
    return int(text) if text.isdigit() and int(text) >= 1 else 0


def pytest_configure(config):
    """Load the Hypothesis profile; torch's intra-op threads follow OMP_NUM_THREADS (1 unless the caller chose)."""
    import pytest

    if _profile() not in PROFILES:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={_profile()!r}: the test profiles are {', '.join(PROFILES)}")
    if not _threads():
        raise pytest.UsageError(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')!r}: must be a positive integer")
    settings.load_profile(_profile())

    import torch

    torch.set_num_threads(_threads())


def pytest_report_header(config):
    return f"pfunc tests: Hypothesis profile {_profile()!r}, {_threads()} torch thread(s)"


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only with PFUNC_SLOW=1 (CI keeps under its time budget); ``compile``
    tests only on a torch whose compiler handles pfunc's functional path; ``cuda`` tests on a GPU."""
    import pytest
    import torch
    from torch.torch_version import TorchVersion

    from pfunc import COMPILE_MIN_TORCH

    slow = None if os.environ.get("PFUNC_SLOW") == "1" else pytest.mark.skip(reason="slow: set PFUNC_SLOW=1 to run")
    compile_ok = TorchVersion(torch.__version__) >= COMPILE_MIN_TORCH
    old_torch = pytest.mark.skip(reason=f"torch.compile of pfunc's functional path needs torch >= {COMPILE_MIN_TORCH}")
    no_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU (python -m benchmarks.gpu_check)")
    for item in items:
        if no_gpu is not None and "cuda" in item.keywords:
            item.add_marker(no_gpu)
        if slow is not None and "slow" in item.keywords:
            item.add_marker(slow)
        if not compile_ok and "compile" in item.keywords:
            item.add_marker(old_torch)
