"""Structured matrices: orthogonal, SPD, of given singular values (well conditioned, low rank, with a
spectral gap), unit vectors. Built in float64 from drawn entries (QR factors, ``U diag(s) V^T``) and
cast, so they shrink to identities and diagonals and hold their structure up to the dtype's rounding.

>>> import torch
>>> from hypothesis import given
>>> @given(orthogonal_matrices(3, 3, det=-1, dtype=torch.float64))
... def test_det(Q):
...     assert abs(float(torch.linalg.det(Q)) + 1) < 1e-9
>>> test_det()
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor

from .tensors import DeviceLike, Drawable, DTypeLike, ShapeLike, _check_dtype, _draw, _draw_tensor, _side, mark_batched

__all__ = [
    "orthogonal_matrices",
    "spd_matrices",
    "matrices_with_singular_values",
    "well_conditioned_matrices",
    "low_rank_matrices",
    "spectral_gap_matrices",
    "unit_vectors",
]


def _orthogonal_from(A: Tensor) -> Tensor:
    """The Q of ``A = QR`` (A tall, float64) with ``diag(R) >= 0``; Householder QR is orthogonal even for singular A."""
    Q, R = torch.linalg.qr(A)
    signs = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


def _orthogonal64(draw: Any, n: int, k: int, batch: tuple[int, ...], det: Optional[int]) -> Tensor:
    tall = max(n, k), min(n, k)
    A = _draw_tensor(draw, batch + tall, torch.float64, -1.0, 1.0)
    Q = _orthogonal_from(A)
    if det is not None:
        sign = torch.linalg.det(Q).sign()
        flip = torch.where(sign == det, 1.0, -1.0).to(Q.dtype)
        Q = torch.cat([Q[..., :-1], Q[..., -1:] * flip[..., None, None]], dim=-1)
    return Q.mT if n < k else Q


@st.composite
def orthogonal_matrices(
    draw: Any,
    rows: Optional[Drawable[int]] = None,
    cols: Optional[Drawable[int]] = None,
    *,
    det: Optional[int] = None,
    batch_shape: ShapeLike = (),
    dtype: DTypeLike = torch.float64,
    device: DeviceLike = "cpu",
    max_side: int = 4,
) -> Tensor:
    """Orthogonal matrices, or semi-orthogonal ones (orthonormal columns if tall, rows if wide).

    ``det=+1`` or ``-1`` fixes the determinant's sign (square only; ``cols`` then
    follows ``rows``); ``None`` lets it be either. Built by QR in float64 and cast,
    so the orthogonality error is a rounding of the dtype. Shrinks to the identity.
    """
    if det not in (None, 1, -1):
        raise ValueError(f"orthogonal_matrices: det must be None, 1 or -1, got {det!r}")
    n = _draw(draw, _side(rows, max_side))
    k = n if (det is not None and cols is None) else _draw(draw, _side(cols, max_side))
    if det is not None and n != k:
        raise ValueError(f"orthogonal_matrices: det needs square matrices, got rows={n}, cols={k}")
    batch = tuple(_draw(draw, batch_shape))
    Q = _orthogonal64(draw, n, k, batch, det)
    return mark_batched(Q.to(dtype=_check_dtype(_draw(draw, dtype), "orthogonal_matrices"), device=device), batch_shape)


@st.composite
def spd_matrices(
    draw: Any,
    n: Optional[Drawable[int]] = None,
    *,
    min_eigenvalue: float = 0.1,
    max_eigenvalue: float = 10.0,
    batch_shape: ShapeLike = (),
    dtype: DTypeLike = torch.float64,
    device: DeviceLike = "cpu",
    max_side: int = 4,
) -> Tensor:
    """Symmetric positive definite ``Q diag(lambda) Q^T`` with eigenvalues in ``[min_eigenvalue, max_eigenvalue]``
    (so the condition number is at most their ratio); exactly symmetric. Shrinks to ``min_eigenvalue * I``."""
    if not 0 < min_eigenvalue <= max_eigenvalue:
        raise ValueError(f"spd_matrices: need 0 < min_eigenvalue <= max_eigenvalue, got {min_eigenvalue}, {max_eigenvalue}")
    size = _draw(draw, _side(n, max_side))
    batch = tuple(_draw(draw, batch_shape))
    Q = _orthogonal64(draw, size, size, batch, None)
    lam = _draw_tensor(draw, batch + (size,), torch.float64, min_eigenvalue, max_eigenvalue)
    A = (Q * lam.unsqueeze(-2)) @ Q.mT
    A = (A + A.mT) / 2
    return mark_batched(A.to(dtype=_check_dtype(_draw(draw, dtype), "spd_matrices"), device=device), batch_shape)


@st.composite
def matrices_with_singular_values(
    draw: Any,
    rows: Optional[Drawable[int]] = None,
    cols: Optional[Drawable[int]] = None,
    *,
    singular_values: Any,
    batch_shape: ShapeLike = (),
    dtype: DTypeLike = torch.float64,
    device: DeviceLike = "cpu",
    max_side: int = 4,
) -> Tensor:
    """``U diag(s) V^T`` with orthogonal ``U``, ``V`` and ``s`` drawn by ``singular_values(p)``,
    a function from ``p = min(rows, cols)`` to a strategy of ``p`` non-negative floats (any order).

    The singular values of the result are exactly ``s`` (up to rounding of ``dtype``).
    """
    n = _draw(draw, _side(rows, max_side))
    k = _draw(draw, _side(cols, max_side))
    batch = tuple(_draw(draw, batch_shape))
    p = min(n, k)
    U = _orthogonal64(draw, n, n, batch, None)
    V = _orthogonal64(draw, k, k, batch, None)
    count = math.prod(batch)
    s = [draw(singular_values(p)) for _ in range(count)]
    for values in s:
        if len(values) != p or any(not (math.isfinite(v) and v >= 0) for v in values):
            raise ValueError(f"matrices_with_singular_values: need {p} finite non-negative values, got {values}")
    S = torch.tensor(s, dtype=torch.float64).reshape(batch + (p,))
    M = (U[..., :p] * S.unsqueeze(-2)) @ V[..., :p].mT
    return mark_batched(M.to(dtype=_check_dtype(_draw(draw, dtype), "matrices_with_singular_values"), device=device), batch_shape)


def _floats(low: float, high: float) -> SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def well_conditioned_matrices(
    rows: Optional[Drawable[int]] = None,
    cols: Optional[Drawable[int]] = None,
    *,
    max_condition: float = 10.0,
    **kwargs: Any,
) -> SearchStrategy[Tensor]:
    """Full-rank matrices with singular values in ``[1, max_condition]`` (condition number <= ``max_condition``)."""
    if not max_condition >= 1:
        raise ValueError(f"well_conditioned_matrices: max_condition must be >= 1, got {max_condition!r}")
    values = functools.lru_cache(maxsize=None)(lambda p: st.lists(_floats(1.0, max_condition), min_size=p, max_size=p))
    return matrices_with_singular_values(rows, cols, singular_values=values, **kwargs)


def low_rank_matrices(
    rows: Optional[Drawable[int]] = None,
    cols: Optional[Drawable[int]] = None,
    *,
    rank: int = 1,
    max_singular_value: float = 4.0,
    **kwargs: Any,
) -> SearchStrategy[Tensor]:
    """Matrices of rank exactly ``min(rank, rows, cols)``: that many singular values in
    ``[1, max_singular_value]``, the others zero."""
    if not (isinstance(rank, int) and rank >= 0):
        raise ValueError(f"low_rank_matrices: rank must be a non-negative int, got {rank!r}")

    @functools.lru_cache(maxsize=None)
    def values(p: int) -> SearchStrategy[list[float]]:
        r = min(rank, p)
        return st.lists(_floats(1.0, max_singular_value), min_size=r, max_size=r).map(lambda v: v + [0.0] * (p - r))

    return matrices_with_singular_values(rows, cols, singular_values=values, **kwargs)


def spectral_gap_matrices(
    rows: Optional[Drawable[int]] = None,
    cols: Optional[Drawable[int]] = None,
    *,
    gap: float = 2.0,
    max_singular_value: float = 4.0,
    **kwargs: Any,
) -> SearchStrategy[Tensor]:
    """Matrices whose largest singular value is at least ``gap`` times the second:
    ``s_1`` in ``[gap, gap * max_singular_value]``, the others in ``[0, 1]``.

    Power iteration converges on them at rate ``1 / gap`` per step, which is what
    a convergence check of spectral norm needs.
    """
    if not gap > 1:
        raise ValueError(f"spectral_gap_matrices: gap must be > 1, got {gap!r}")

    @functools.lru_cache(maxsize=None)
    def values(p: int) -> SearchStrategy[list[float]]:
        top = _floats(gap, gap * max_singular_value)
        rest = st.lists(_floats(0.0, 1.0), min_size=p - 1, max_size=p - 1)
        return st.tuples(top, rest).map(lambda tr: [tr[0]] + tr[1])

    return matrices_with_singular_values(rows, cols, singular_values=values, **kwargs)


@st.composite
def unit_vectors(
    draw: Any, n: Drawable[int], *, batch_shape: ShapeLike = (), dtype: DTypeLike = torch.float64, device: DeviceLike = "cpu"
) -> Tensor:
    """Vectors of length ``n`` with unit 2-norm along the last dim (a drawn
    vector of norm below 1e-3 becomes ``e_1``, which is also what it shrinks to)."""
    size = _draw(draw, n)
    batch = tuple(_draw(draw, batch_shape))
    x = _draw_tensor(draw, batch + (size,), torch.float64, -1.0, 1.0)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    e1 = torch.zeros_like(x)
    e1[..., :1] = 1.0
    x = torch.where(norm < 1e-3, e1, x / norm.clamp_min(1e-3))
    return x.to(dtype=_check_dtype(_draw(draw, dtype), "unit_vectors"), device=device)
