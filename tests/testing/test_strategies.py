"""The strategies draw what they promise, and shrink to small, readable examples."""

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from torch import nn

import pfunc as pf
from pfunc.parametrizations import SpectralNorm, Symmetric
from pfunc.testing import strategies as S

DTYPES = st.sampled_from([torch.float32, torch.float64])
FIND = settings(database=None, derandomize=True, max_examples=500)


def _eps(dtype):
    return 10 * torch.finfo(dtype).eps


@given(S.tensors(S.shapes(0, 3, 0, 3), dtype=DTYPES, min_value=-2.5, max_value=0.5))
def test_tensors_are_finite_bounded_and_of_a_drawn_shape_and_dtype(X):
    assert X.dtype in (torch.float32, torch.float64) and X.ndim <= 3 and all(s <= 3 for s in X.shape)
    assert bool(X.isfinite().all()) and bool(((X >= -2.5) & (X <= 0.5)).all())


@given(S.tensors((20, 30), dtype=torch.float32, min_value=-1.0, max_value=3.0))
def test_tensors_above_the_drawn_element_limit_come_from_a_seed_within_bounds(X):
    assert X.shape == (20, 30) and bool(((X >= -1.0) & (X <= 3.0)).all())


def test_tensors_go_to_the_device_asked_for():
    X = find(S.tensors((2,), device="meta"), lambda X: True, settings=FIND)
    assert X.device.type == "meta"


@given(S.symmetric_matrices(dtype=DTYPES, batch_shape=S.batch_shapes()), S.skew_matrices(dtype=DTYPES))
def test_symmetric_and_skew_matrices_are_exactly_so(A, K):
    assert torch.equal(A, A.mT) and torch.equal(K, -K.mT)


@given(S.orthogonal_matrices(det=1, dtype=DTYPES, batch_shape=S.batch_shapes()), S.orthogonal_matrices(det=-1))
def test_orthogonal_matrices_have_the_determinant_sign_asked_for(Q, R):
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    assert (Q.mT @ Q - eye).abs().max() <= _eps(Q.dtype)
    assert bool((torch.linalg.det(Q.double()) - 1).abs().max() < 1e-5)
    assert abs(float(torch.linalg.det(R)) + 1) < 1e-12


@given(S.orthogonal_matrices(st.integers(1, 4), st.integers(1, 4)))
def test_rectangular_orthogonal_matrices_have_orthonormal_columns_or_rows(Q):
    G = Q.mT @ Q if Q.shape[-2] >= Q.shape[-1] else Q @ Q.mT
    assert (G - torch.eye(G.shape[-1], dtype=Q.dtype)).abs().max() < 1e-12


@given(S.spd_matrices(min_eigenvalue=0.5, max_eigenvalue=2.0, dtype=DTYPES))
def test_spd_matrices_are_symmetric_with_eigenvalues_in_range(A):
    assert torch.equal(A, A.mT)
    eig = torch.linalg.eigvalsh(A.double())
    assert float(eig.min()) >= 0.5 - 1e-5 and float(eig.max()) <= 2.0 + 1e-5


@given(S.well_conditioned_matrices(max_condition=5.0), S.low_rank_matrices(4, 3, rank=2))
def test_well_conditioned_and_low_rank_matrices_have_their_spectrum(W, L):
    s = torch.linalg.svdvals(W)
    assert float(s.min()) >= 1 - 1e-9 and float(s.max() / s.min()) <= 5 + 1e-9
    assert int(torch.linalg.matrix_rank(L)) == 2


@given(S.spectral_gap_matrices(gap=3.0, batch_shape=S.batch_shapes()))
def test_spectral_gap_matrices_have_the_gap(W):
    s = torch.linalg.svdvals(W)
    assert bool((s[..., 0] >= 3.0 - 1e-9).all())
    if s.shape[-1] > 1:
        assert bool((s[..., 0] >= 3.0 * s[..., 1] - 1e-9).all())


@given(S.unit_vectors(st.integers(1, 5), batch_shape=(3,), dtype=DTYPES))
def test_unit_vectors_have_unit_norm(u):
    assert (torch.linalg.vector_norm(u.double(), dim=-1) - 1).abs().max() < 1e-6


@pytest.mark.parametrize(
    "sn", [SpectralNorm(dim=0), SpectralNorm.biggan(num_svs=2), SpectralNorm.biggan(transpose=True)], ids=repr
)
@given(data=st.data())
def test_spectral_norm_states_match_init_state_keys_and_shapes(sn, data):
    shape = data.draw(st.sampled_from([(3,), (3, 4), (2, 3, 2, 2)]))
    state = data.draw(S.spectral_norm_states(sn, shape))
    expected = sn.init_state(torch.zeros(shape, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape and state[k].dtype == expected[k].dtype for k in state)


@given(S.module_tensors(nn.BatchNorm1d(3)))
def test_module_tensors_cover_every_tensor_of_the_module(tree):
    module = nn.BatchNorm1d(3)
    reference = dict(module.named_parameters()) | dict(module.named_buffers())
    assert tree.keys() == reference.keys()
    for k, t in tree.items():
        assert t.shape == reference[k].shape and t.dtype == reference[k].dtype
    assert tree["weight"].requires_grad and not tree["running_mean"].requires_grad
    assert torch.equal(tree["num_batches_tracked"], module.num_batches_tracked)


@given(S.parametrized_trees(pf.parametrize(nn.Linear(3, 3), {"weight": Symmetric()})))
def test_parametrized_trees_are_params_and_state_of_the_net(trees):
    net = pf.parametrize(nn.Linear(3, 3), {"weight": Symmetric()})
    params, state = trees
    net.check_keys(params, state)
    W = net.materialize(params, state)[0]["weight"]
    assert torch.equal(W, W.mT)


def test_shrinking_gives_small_readable_counterexamples():
    big = find(S.matrices(batch_shape=S.batch_shapes()), lambda M: bool((M.abs() > 1).any()), settings=FIND)
    assert big.shape == (1, 1) and float(big) == 2.0
    asym = find(S.square_matrices(), lambda M: not torch.equal(M, M.mT), settings=FIND)
    assert asym.shape == (2, 2) and sorted(asym.flatten().tolist()) == [0.0, 0.0, 0.0, 1.0]
    flip = find(S.orthogonal_matrices(det=-1), lambda Q: Q.shape[-1] >= 2, settings=FIND)
    assert torch.equal(flip.abs(), torch.eye(2, dtype=flip.dtype)) and float(torch.linalg.det(flip)) == -1.0
    spd = find(S.spd_matrices(min_eigenvalue=0.5), lambda A: A.shape[-1] >= 2, settings=FIND)
    assert torch.equal(spd, torch.eye(2, dtype=spd.dtype))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="dtype must be a floating point"):
        find(S.tensors((2,), dtype=torch.int64), lambda X: True, settings=FIND)
    with pytest.raises(ValueError, match="min_value <= max_value"):
        S.elements(torch.float64, 1.0, -1.0)
    with pytest.raises(ValueError, match="det must be None, 1 or -1"):
        find(S.orthogonal_matrices(det=2), lambda Q: True, settings=FIND)
    with pytest.raises(ValueError, match="det needs square matrices"):
        find(S.orthogonal_matrices(2, 3, det=1), lambda Q: True, settings=FIND)
    with pytest.raises(ValueError, match="gap must be > 1"):
        S.spectral_gap_matrices(gap=1.0)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        S.module_tensors("not a module")


@settings(max_examples=50)
@given(S.tensors(S.shapes(1, 2, 1, 8), dtype=S.float_dtypes()))
def test_default_entries_are_zero_or_at_least_the_minimum_magnitude(X):
    # no weight looks like 2.2e-308: F.normalize's eps would make such a row non-unit, a false alarm
    nonzero = X[X != 0].abs()
    assert nonzero.numel() == 0 or float(nonzero.min()) >= S.MIN_MAGNITUDE * (1 - 1e-6)


def test_unit_rows_of_f_normalize_are_not_a_false_alarm_on_default_strategies():
    import torch.nn.functional as F

    from pfunc.testing import check_parametrization
    from pfunc.testing import constraints as C

    unit_or_zero = C.predicate(lambda Y: (((Y.norm(dim=-1) - 1).abs() < 1e-6) | (Y.norm(dim=-1) == 0)).all(), "unit or zero rows")
    check_parametrization(lambda X: F.normalize(X, dim=-1), S.matrices(), constraint=unit_or_zero,
                          properties=["constraint_holds"], max_examples=200)


@given(S.square_matrices(batch_shape=S.batch_shapes()), S.square_matrices())
def test_a_strategy_given_a_batch_shape_marks_its_tensors_as_batched(batched, plain):
    assert getattr(batched, "_pfunc_batched", False) and not getattr(plain, "_pfunc_batched", False)
