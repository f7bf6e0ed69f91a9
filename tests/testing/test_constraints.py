"""Constraints hold on what they describe, fail on what they do not, and say by how much; tolerances scale with dtype."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pfunc.testing import Tolerance, compare, describe
from pfunc.testing import constraints as C
from pfunc.testing import strategies as S

DTYPES = st.sampled_from([torch.float32, torch.float64])


def _bump(Y, i=0, j=1, by=1.0):
    Y = Y.clone()
    Y[..., i, j] += by
    return Y


@given(S.symmetric_matrices(st.integers(2, 4), dtype=DTYPES))
def test_symmetric_holds_on_symmetric_and_names_the_asymmetry(A):
    assert C.symmetric().violation(A) is None
    assert C.symmetric().violation(_bump(A)).startswith("max |Y - Y^T| = 1 > allowed")


@given(S.skew_matrices(st.integers(2, 4), dtype=DTYPES))
def test_skew_holds_on_skew_and_names_the_defect(K):
    assert C.skew().violation(K) is None
    assert C.skew().violation(_bump(K)).startswith("max |Y + Y^T| = 1 > allowed")


@given(S.orthogonal_matrices(det=1, dtype=DTYPES), S.orthogonal_matrices(det=-1, dtype=DTYPES))
def test_orthogonal_constraints_tell_the_determinant_apart(Q, R):
    assert C.orthogonal().violation(Q) is None and C.orthogonal().violation(R) is None
    assert C.special_orthogonal().violation(Q) is None
    assert C.special_orthogonal().violation(R) == "det Q = -1, expected +1"
    assert C.orthogonal(det=-1).violation(R) is None
    assert C.orthogonal().violation(2 * Q).startswith("max |Q^T Q - I| = 3 > allowed")


@given(S.orthogonal_matrices(2, 3), S.orthogonal_matrices(3, 2))
def test_orthogonal_means_orthonormal_rows_of_wide_and_columns_of_tall_matrices(wide, tall):
    assert C.orthogonal().violation(wide) is None and C.orthogonal().violation(tall) is None
    assert "Q Q^T" in C.orthogonal().violation(2 * wide) and "Q^T Q" in C.orthogonal().violation(2 * tall)


@given(S.spd_matrices(st.integers(2, 4), dtype=DTYPES))
def test_spd_is_symmetric_and_strictly_positive(A):
    assert C.spd().violation(A) is None
    assert C.spd().violation(-A).startswith("smallest eigenvalue -")
    assert C.spd().violation(_bump(A)).startswith("max |Y - Y^T| = 1 > allowed")
    assert C.spd().violation(torch.zeros_like(A)) == "smallest eigenvalue 0 <= 0 (largest 0)"


@given(S.spectral_gap_matrices(dtype=DTYPES))
def test_unit_spectral_norm_on_normalised_matrices(W):
    sigma = torch.linalg.matrix_norm(W.double(), ord=2).to(W.dtype)
    assert C.unit_spectral_norm().violation(W / sigma) is None
    assert C.unit_spectral_norm().violation(2 * W / sigma).startswith("spectral norm 2")
    assert C.spectral_norm_at_most(1.0).violation(0.5 * W / sigma) is None
    assert C.spectral_norm_at_most(1.0).violation(2 * W / sigma).startswith("spectral norm 2")


def test_unit_spectral_norm_views_kernels_as_matrices_along_dim():
    W = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    W[0, 0, 0, 0] = 1.0
    assert C.unit_spectral_norm().violation(W) is None
    assert C.unit_spectral_norm(dim=1).violation(W) is None
    assert C.unit_spectral_norm().violation(torch.tensor([0.6, 0.8])) is None


def test_elementwise_constraints_are_exact_in_the_dtype():
    assert C.positive().violation(torch.tensor([1e-30, 2.0])) is None
    assert C.positive().violation(torch.tensor([0.0, 2.0])) == "1 of 2 entries are not > 0 (smallest 0)"
    assert C.in_interval(0.0, 1.0).violation(torch.tensor([0.5, 1.0])) == "1 of 2 entries are not in (0.0, 1.0) (e.g. 1.0)"
    assert C.in_interval(0.0, 1.0, closed=True).violation(torch.tensor([0.0, 1.0])) is None
    assert C.finite().violation(torch.tensor([1.0, math.inf, math.nan])) == "2 of 3 entries are not finite"
    mask = torch.tensor([1.0, 0.0])
    assert C.zero_where(mask).violation(torch.tensor([[3.0, 0.0]])) is None
    assert C.zero_where(mask).violation(torch.tensor([[3.0, 0.5]])).startswith("1 pruned entries are nonzero")


def test_standardized_checks_channel_mean_and_variance():
    W = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, var = W.mean(dim=(1, 2, 3), keepdim=True), W.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    assert C.standardized().violation((W - mean) / var.sqrt()) is None
    assert C.standardized().violation(W - mean + 1).startswith("max |channel mean| = 1")
    assert C.standardized().violation(3 * (W - mean) / var.sqrt()).startswith("largest channel variance 9")


def test_predicates_from_functions_and_boolean_tensors():
    c = C.predicate(lambda Y: Y.sum() > 0, "sums to a positive number")
    assert c.name == "sums to a positive number"
    assert c.violation(torch.ones(2)) is None and c.violation(-torch.ones(2)) == "sums to a positive number is false"
    nonneg = C.predicate(lambda Y: Y >= 0, "nonnegative")
    assert nonneg.violation(torch.tensor([1.0, -1.0, -2.0])) == "nonnegative is false for 2 of 3 entries"
    with pytest.raises(TypeError, match="boolean tensor"):
        C.predicate(lambda Y: Y * 2).violation(torch.ones(2))
    constraints = C.as_constraints([C.symmetric(), lambda Y: True])
    assert [type(c) for c in constraints] == [C.Constraint, C.Constraint]
    assert C.as_constraints(None) == ()
    with pytest.raises(TypeError, match="Constraint or a callable"):
        C.as_constraints([3])


def test_tolerances_scale_with_the_dtype():
    t64, t32 = Tolerance.for_dtype(torch.float64), Tolerance.for_dtype(torch.float32)
    assert t64.rtol == pytest.approx(torch.finfo(torch.float64).eps ** 0.5)
    assert t32.atol == pytest.approx(torch.finfo(torch.float32).eps ** 0.75)
    assert t64.rtol < t32.rtol < Tolerance.for_dtype(torch.bfloat16).rtol
    assert t32.allowed(torch.tensor([-4.0, 2.0])) == pytest.approx(t32.atol + 4 * t32.rtol)
    with pytest.raises(TypeError, match="floating point"):
        Tolerance.for_dtype(torch.int32)
    with pytest.raises(ValueError, match=">= 0"):
        Tolerance(rtol=-1.0, atol=0.0)


def test_compare_reports_the_max_error_and_treats_nan_and_shape_mismatch_as_infinite():
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert compare(b + 1e-9, b).ok and not compare(b + 1e-3, b).ok
    assert compare(b + 1e-3, b).error == pytest.approx(1e-3)
    assert compare(torch.tensor([1.0, math.nan], dtype=torch.float64), b).error == math.inf
    assert compare(torch.tensor([1.0, math.nan]), torch.tensor([1.0, math.nan])).ok
    assert compare(torch.ones(3), torch.ones(2)).error == math.inf
    assert str(compare(b + 1e-3, b)).startswith("max abs error 0.001 > allowed")


def test_describe_shows_small_tensors_and_summarises_large_ones():
    assert describe(torch.tensor([[0.5, -1.0]], dtype=torch.float64)) == "float64[1, 2] = [[0.5, -1.0]]"
    assert describe(torch.tensor(2.0)) == "float32[] = 2.0"
    assert describe(torch.arange(100.0)) == "float32[100] (values in [0, 99])"
    assert describe(torch.zeros(2, device="meta")) == "float32[2] on meta (no data)"
