"""pfunc's core on a simulated CUDA device (tests/fake_cuda.py): what the kit catches, a generator placed
on the wrong device, and every built-in, ensembles included, keeping params, outputs and new state on
``cuda`` (tests/fake_cuda_worker.py, in a process of its own). Gradients are dry-run where torch is
built with CUDA (the GPU check, a CI on PyPI's default wheel); the same runs compute on a real GPU
in ``test_the_dry_runs_compute_on_a_real_gpu`` (marked ``cuda``)."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

import pfunc as pf
from tests.fake_cuda import CUDA, assert_dry_run_passed, assert_on, failed_dry_runs, fake_cuda, run_worker

# Orthogonal's right_inverse cannot be dry-run (torch.geqrf has no fake kernel in torch): on a real GPU only.
CORE = [f"builtin:{k}" for k in ("Symmetric", "Skew", "Cayley", "MatrixExp", "SPD", "SpectralNorm", "SpectralNorm.biggan",
                                 "WeightNorm", "WeightStandardization", "Positive", "Bounded", "Mask")] + ["ensembles", "interop"]
REAL_GPU_ONLY = ["builtin:Orthogonal"]


@pytest.fixture(scope="module")
def core_results(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fake_cuda"), CORE)


@pytest.mark.parametrize("name", CORE)
def test_params_outputs_and_new_state_stay_on_cuda(core_results, name):
    assert_dry_run_passed(core_results, name, checked=4)


# -- what the kit catches, in process (factory functions need no CUDA guard) ----------------------------
def test_an_op_mixing_cuda_and_cpu_tensors_is_caught():
    with fake_cuda():
        x = torch.randn(3, 4, device=CUDA)
        w = torch.randn(4, 4)  # forgot device=
        with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu"):
            x @ w
        assert_on(x @ torch.randn(4, 4, device=CUDA))


def test_a_draw_from_a_generator_on_another_device_is_refused_as_cuda_refuses_it():
    with fake_cuda():
        g = torch.Generator(device="cuda").manual_seed(0)
        assert g.device.type == "cuda" and isinstance(g, torch.Generator)
        with pytest.raises(RuntimeError, match="Expected a 'cpu' device type for generator but found 'cuda'"):
            torch.randn(3, generator=g)
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
            torch.randn(3, generator=torch.Generator(), device=CUDA)
        assert_on(torch.randn(3, generator=g, device=g.device))


def test_a_seed_drawn_on_cuda_and_read_on_the_host_is_the_real_draw_and_advances_the_generator():
    with fake_cuda():
        g = torch.Generator(device="cuda").manual_seed(7)
        first = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
        second = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
        with pytest.raises(Exception, match="local_scalar_dense|data-dependent|DataDependent"):
            torch.randn(1, device=CUDA).sum().item()  # any other read of device data stays an error
    ref = torch.Generator().manual_seed(7)
    assert [first, second] == [int(torch.randint(0, 2**62, (1,), generator=ref)) for _ in range(2)]


def test_fresh_values_draws_its_seed_on_the_generators_device():
    """``pf.ensemble.fresh_values`` with a CUDA generator (``pf.ensemble.generators(..., device="cuda")``)
    drew its seed with ``torch.randint(..., generator=g)`` on the default (CPU) device: on a GPU,
    "Expected a 'cpu' device type for generator but found 'cuda'"."""
    with fake_cuda():
        module = nn.Linear(4, 3)
        g = torch.Generator(device="cuda").manual_seed(0)
        values = pf.ensemble.fresh_values(module, g)
        assert set(values) == {"weight", "bias"}


@pytest.mark.cuda
def test_the_dry_runs_compute_on_a_real_gpu(tmp_path):
    """On a GPU: the same runs, computing, gradients and the real-GPU-only ones included."""
    results = run_worker(tmp_path, CORE + REAL_GPU_ONLY, real=True)
    assert not failed_dry_runs(results), failed_dry_runs(results)
