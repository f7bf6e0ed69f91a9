"""benchmarks.power_kernels: the sweep checks every kernel against the loop before timing it."""

import pytest
import torch

from benchmarks import power_kernels
from pfunc import _power_kernels as kernels


def test_sweep_times_every_kernel_on_every_size_after_checking_them_equal():
    rows = list(power_kernels.sweep(sizes=((3, 5), (4, 4)), batches=(2,), dtypes=(torch.float64,), budget_s=0.0))
    assert [(B, h, w) for _, B, h, w, _ in rows] == [(2, 3, 5), (2, 4, 4)]
    assert all(set(med) == {*kernels.KERNELS, power_kernels.VMAPPED} and min(med.values()) > 0 for *_, med in rows)


def test_sweep_stops_on_a_kernel_that_disagrees(monkeypatch):
    real = kernels.iterate_batched
    monkeypatch.setattr(kernels, "iterate_batched", lambda Ws, us, vs, n, eps, k: tuple(x * 1.01 for x in real(Ws, us, vs, n, eps, k)))
    with pytest.raises(AssertionError):
        list(power_kernels.sweep(sizes=((3, 3),), batches=(2,), budget_s=0.0))


def test_vmap_cost_times_vmap_and_its_primitives_on_the_same_tensors():
    cost = power_kernels.vmap_cost(budget_s=0.0)
    assert set(cost) == {"torch.func.vmap", "primitives"} and all(v > 0 for v in cost.values())
