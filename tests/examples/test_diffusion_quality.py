"""The sample-quality score: Fréchet distance properties, and the judge's FCD ordering real < degraded
< collapsed < noise on the embedded shapes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from examples.diffusion.data import draw_shapes
from examples.diffusion.quality import evaluate_shapes, frechet_distance, nearest_neighbour_rms, train_judge


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


@given(seed=st.integers(0, 2**16), d=st.integers(1, 6))
def test_frechet_distance_is_zero_on_identical_sets_and_symmetric(seed, d):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(50, d, generator=g), torch.randn(40, d, generator=g) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 3, generator=g)
    a = z * torch.tensor([1.0, 2.0, 0.5])
    b = z * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([1.0, 0.0, 0.0])
    # |mu|^2 + sum (s_a - s_b)^2 for diagonal covariances: 1 + 1 + 0 + 0.25
    assert frechet_distance(a, b) == pytest.approx(2.25, rel=0.02)
    with pytest.raises(ValueError, match="N, D"):
        frechet_distance(torch.randn(5), torch.randn(5, 1))


def test_nearest_neighbour_rms_is_zero_for_members_and_leave_one_out_excludes_self():
    ref = torch.rand(10, 1, 4, 4)
    assert nearest_neighbour_rms(ref[:3], ref) == 0
    assert nearest_neighbour_rms(ref, ref, exclude_self=True) > 0


@pytest.fixture(scope="module")
def judge():
    return train_judge(16, 1, steps=300)


def test_judge_learns_the_shapes(judge):
    _, accuracy = judge
    assert accuracy > 0.9


def test_fcd_orders_real_below_degraded_below_collapsed_below_noise(judge):
    model, _ = judge
    x, y = draw_shapes(600, 16, 1, torch.Generator().manual_seed(7))
    real = evaluate_shapes(x[:300], 16, 1, judge=model, reference_size=1000)
    blurred = evaluate_shapes(F.avg_pool2d(x[:300], 3, 1, 1), 16, 1, judge=model, reference_size=1000)
    disks_only = evaluate_shapes(x[y == 0][:100], 16, 1, judge=model, reference_size=1000)
    fcd = lambda r: r["samples"]["fcd"]  # noqa: E731
    assert real["real"]["fcd"] < 3 * max(fcd(real), 1.0)  # real data scores like the real bracket
    assert fcd(real) < fcd(blurred) < fcd(disks_only) < real["noise"]["fcd"]
    assert disks_only["samples"]["class_counts"][0] > 90
    assert sum(real["noise"]["class_counts"]) == 300 and real["n"] == 300
