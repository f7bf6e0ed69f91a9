"""Hypothesis strategies for what parametrizations eat: tensors, structured matrices, module trees, states.

Every strategy draws finite values of bounded magnitude, entry by entry, so a
failing example shrinks to a small shape with simple values (``0.0``, ``1.0``,
``-2.0``...). Structured matrices are built from such entries (symmetric parts,
QR factors, ``U diag(s) V^T``), so they shrink to identities and diagonals.
Arguments that say "int or strategy" accept either a fixed value or a strategy
to draw it from; dtypes and shapes likewise.

>>> import torch
>>> from hypothesis import given
>>> @given(orthogonal_matrices(3, 3, det=-1, dtype=torch.float64))
... def test_det(Q):
...     assert abs(float(torch.linalg.det(Q)) + 1) < 1e-9
>>> test_det()

Tensors with more than ``max_drawn_elements`` entries (default 128) are drawn
from a seeded generator instead (the seed and a scale are what shrinks), which
keeps Hypothesis fast on layer-sized weights.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, TypeVar, Union

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor, nn

__all__ = [
    "DEFAULT_BOUND",
    "float_dtypes",
    "shapes",
    "batch_shapes",
    "elements",
    "tensors",
    "matrices",
    "square_matrices",
    "symmetric_matrices",
    "skew_matrices",
    "orthogonal_matrices",
    "spd_matrices",
    "matrices_with_singular_values",
    "well_conditioned_matrices",
    "low_rank_matrices",
    "spectral_gap_matrices",
    "unit_vectors",
    "spectral_norm_states",
    "module_tensors",
    "parametrized_trees",
]

DEFAULT_BOUND = 8.0
"""Default bound on the magnitude of drawn entries: ``[-8, 8]``."""

MAX_DRAWN_ELEMENTS = 128

T = TypeVar("T")
Drawable = Union[T, SearchStrategy[T]]
DTypeLike = Union[torch.dtype, SearchStrategy[torch.dtype]]
ShapeLike = Union[Sequence[int], SearchStrategy[Sequence[int]]]
DeviceLike = Union[str, torch.device]


def _draw(draw: Any, value: Any) -> Any:
    return draw(value) if isinstance(value, SearchStrategy) else value


def _check_dtype(dtype: torch.dtype, who: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{who}: dtype must be a floating point torch.dtype, got {dtype!r}")
    return dtype


def _check_bounds(min_value: float, max_value: float, who: str) -> None:
    if not (math.isfinite(min_value) and math.isfinite(max_value) and min_value <= max_value):
        raise ValueError(f"{who}: need finite min_value <= max_value, got {min_value!r}, {max_value!r}")


def float_dtypes() -> SearchStrategy[torch.dtype]:
    """``torch.float32`` or ``torch.float64`` (shrinks to float32)."""
    return st.sampled_from([torch.float32, torch.float64])


def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4) -> SearchStrategy[tuple[int, ...]]:
    """Tensor shapes with ``min_dims..max_dims`` dims of size ``min_side..max_side`` (shrinks to the smallest)."""
    if not 0 <= min_dims <= max_dims:
        raise ValueError(f"shapes: need 0 <= min_dims <= max_dims, got {min_dims}, {max_dims}")
    if not 0 <= min_side <= max_side:
        raise ValueError(f"shapes: need 0 <= min_side <= max_side, got {min_side}, {max_side}")
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def batch_shapes(max_dims: int = 2, max_side: int = 3) -> SearchStrategy[tuple[int, ...]]:
    """Leading batch shapes, ``()`` included (what it shrinks to)."""
    return shapes(0, max_dims, 1, max_side)


def elements(
    dtype: torch.dtype = torch.float64,
    min_value: float = -DEFAULT_BOUND,
    max_value: float = DEFAULT_BOUND,
    *,
    allow_subnormal: bool = False,
) -> SearchStrategy[float]:
    """Finite Python floats in ``[min_value, max_value]`` exactly representable in ``dtype``
    (``bfloat16`` entries are drawn as float32 and rounded on conversion)."""
    _check_dtype(dtype, "elements")
    _check_bounds(min_value, max_value, "elements")
    return _elements(dtype, float(min_value), float(max_value), allow_subnormal)


@functools.lru_cache(maxsize=256)
def _elements(dtype: torch.dtype, min_value: float, max_value: float, allow_subnormal: bool) -> SearchStrategy[float]:
    width = 16 if dtype == torch.float16 else 32 if dtype in (torch.float32, torch.bfloat16) else 64
    return st.floats(
        min_value, max_value, allow_nan=False, allow_infinity=False, allow_subnormal=allow_subnormal, width=width
    )


@functools.lru_cache(maxsize=1024)
def _fixed_lists(entries: SearchStrategy[float], size: int) -> SearchStrategy[list[float]]:
    return st.lists(entries, min_size=size, max_size=size)


def _draw_tensor(
    draw: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    min_value: float,
    max_value: float,
    entries: Optional[SearchStrategy[float]] = None,
    max_drawn_elements: int = MAX_DRAWN_ELEMENTS,
) -> Tensor:
    """A float64 CPU tensor of ``shape`` with entries exactly representable in ``dtype`` (see :func:`tensors`)."""
    numel = math.prod(shape)
    if numel <= max_drawn_elements:
        entries = entries if entries is not None else elements(dtype, min_value, max_value)
        return torch.tensor(draw(_fixed_lists(entries, numel)), dtype=torch.float64).reshape(shape)
    _check_bounds(min_value, max_value, "tensors")
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.floats(0.0, max(abs(min_value), abs(max_value)), allow_nan=False))
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).clamp(min_value, max_value)


@st.composite
def tensors(
    draw: Any,
    shape: ShapeLike,
    *,
    dtype: DTypeLike = torch.float64,
    device: DeviceLike = "cpu",
    min_value: float = -DEFAULT_BOUND,
    max_value: float = DEFAULT_BOUND,
    elements_strategy: Optional[SearchStrategy[float]] = None,
    max_drawn_elements: int = MAX_DRAWN_ELEMENTS,
) -> Tensor:
    """A tensor of ``shape`` and ``dtype`` on ``device`` with finite entries in ``[min_value, max_value]``.

    ``elements_strategy`` replaces the default entry strategy (e.g. ``st.sampled_from([-1.0, 1.0])``).
    Above ``max_drawn_elements`` entries, values are uniform in ``[-scale, scale]``
    from a drawn seed and a drawn ``scale <= max(|min_value|, |max_value|)``, clipped to the bounds.
    """
    shape = tuple(int(s) for s in _draw(draw, shape))
    if any(s < 0 for s in shape):
        raise ValueError(f"tensors: shape must have non-negative sizes, got {shape}")
    dtype = _check_dtype(_draw(draw, dtype), "tensors")
    out = _draw_tensor(draw, shape, dtype, min_value, max_value, elements_strategy, max_drawn_elements)
    return out.to(dtype=dtype, device=device)


def _side(value: Optional[Drawable[int]], max_side: int) -> Drawable[int]:
    return st.integers(1, max_side) if value is None else value


@st.composite
def matrices(
    draw: Any,
    rows: Optional[Drawable[int]] = None,
    cols: Optional[Drawable[int]] = None,
    *,
    batch_shape: ShapeLike = (),
    dtype: DTypeLike = torch.float64,
    device: DeviceLike = "cpu",
    min_value: float = -DEFAULT_BOUND,
    max_value: float = DEFAULT_BOUND,
    max_side: int = 4,
    elements_strategy: Optional[SearchStrategy[float]] = None,
) -> Tensor:
    """A ``(*batch_shape, rows, cols)`` matrix (batch) with bounded finite entries;
    ``rows``/``cols`` default to ``1..max_side`` and shrink to 1."""
    n = _draw(draw, _side(rows, max_side))
    k = _draw(draw, _side(cols, max_side))
    batch = tuple(_draw(draw, batch_shape))
    dtype = _check_dtype(_draw(draw, dtype), "matrices")
    out = _draw_tensor(draw, batch + (n, k), dtype, min_value, max_value, elements_strategy)
    return out.to(dtype=dtype, device=device)


@st.composite
def square_matrices(draw: Any, n: Optional[Drawable[int]] = None, **kwargs: Any) -> Tensor:
    """A ``(*batch_shape, n, n)`` matrix (batch); keyword arguments as :func:`matrices`."""
    size = _draw(draw, _side(n, kwargs.get("max_side", 4)))
    return draw(matrices(size, size, **kwargs))


@st.composite
def symmetric_matrices(draw: Any, n: Optional[Drawable[int]] = None, **kwargs: Any) -> Tensor:
    """``(M + M^T) / 2`` for a drawn square ``M``: exactly symmetric in every dtype."""
    M = draw(square_matrices(n, **kwargs))
    return (M + M.mT) / 2


@st.composite
def skew_matrices(draw: Any, n: Optional[Drawable[int]] = None, **kwargs: Any) -> Tensor:
    """``(M - M^T) / 2`` for a drawn square ``M``: exactly skew-symmetric, zero diagonal."""
    M = draw(square_matrices(n, **kwargs))
    return (M - M.mT) / 2


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
    return Q.to(dtype=_check_dtype(_draw(draw, dtype), "orthogonal_matrices"), device=device)


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
    return A.to(dtype=_check_dtype(_draw(draw, dtype), "spd_matrices"), device=device)


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
    return M.to(dtype=_check_dtype(_draw(draw, dtype), "matrices_with_singular_values"), device=device)


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


@st.composite
def spectral_norm_states(
    draw: Any, spectral_norm: Any, shape: ShapeLike, *, dtype: DTypeLike = torch.float64, device: DeviceLike = "cpu"
) -> dict[str, Tensor]:
    """A state for ``spectral_norm`` (a :class:`pfunc.parametrizations.SpectralNorm`) on a tensor of ``shape``:

    torch mode ``{"_u": (h,), "_v": (w,)}`` unit vectors; BigGAN mode
    ``{"u": (num_svs, h)`` unit rows, ``"sv": (num_svs,)`` in ``[0.1, 10]}``;
    ``{}`` for a 1-D tensor. ``(h, w)`` is ``spectral_norm.matrix`` of the tensor.
    """
    shape = tuple(_draw(draw, shape))
    dtype = _check_dtype(_draw(draw, dtype), "spectral_norm_states")
    if len(shape) <= 1:
        return {}
    h, w = spectral_norm.matrix(torch.zeros(shape, dtype=dtype)).shape
    if spectral_norm.mode == "biggan":
        k = spectral_norm.num_svs
        u = draw(unit_vectors(h, batch_shape=(k,), dtype=dtype, device=device))
        sv = draw(tensors((k,), dtype=dtype, device=device, min_value=0.1, max_value=10.0))
        return {"u": u, "sv": sv}
    return {
        "_u": draw(unit_vectors(h, dtype=dtype, device=device)),
        "_v": draw(unit_vectors(w, dtype=dtype, device=device)),
    }


def module_tensors(
    module: nn.Module,
    *,
    params: bool = True,
    buffers: bool = True,
    min_value: float = -DEFAULT_BOUND,
    max_value: float = DEFAULT_BOUND,
) -> SearchStrategy[dict[str, Tensor]]:
    """``{name: tensor}`` for every parameter (and buffer) of ``module``: same shapes, dtypes,
    devices and ``requires_grad``, floating entries drawn (others, like ``num_batches_tracked``, copied).

    Usable as ``values`` of :meth:`pfunc.Parametrized.init` or with ``torch.func.functional_call``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_tensors: module must be an nn.Module, got {type(module).__name__}")
    named: dict[str, tuple[Tensor, bool]] = {}
    if params:
        named.update((n, (p, p.requires_grad)) for n, p in module.named_parameters())
    if buffers:
        named.update((n, (b, False)) for n, b in module.named_buffers())

    def one(t: Tensor, requires_grad: bool) -> SearchStrategy[Tensor]:
        if not t.is_floating_point():
            return st.just(t).map(lambda x: x.detach().clone())
        return tensors(
            tuple(t.shape), dtype=t.dtype, device=t.device, min_value=min_value, max_value=max_value
        ).map(lambda x: x.requires_grad_(requires_grad))

    return st.fixed_dictionaries({n: one(t, rg) for n, (t, rg) in named.items()})


@st.composite
def parametrized_trees(draw: Any, net: Any, **kwargs: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, state)`` of a :class:`pfunc.Parametrized`: drawn module tensors put through
    ``net.init(values=..., generator=...)`` with a drawn seed; keyword arguments as :func:`module_tensors`."""
    values = draw(module_tensors(net.module, **kwargs))
    seed = draw(st.integers(0, 2**32 - 1))
    return net.init(values=values, generator=torch.Generator().manual_seed(seed))
