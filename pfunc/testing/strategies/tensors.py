"""Tensors, shapes, dtypes and plain matrices: the entries every other strategy is built from.

Every strategy draws finite values of bounded magnitude, entry by entry, so a failing example shrinks
to a small shape with simple values (``0.0``, ``1.0``, ``-2.0``...). Nonzero entries are at least
``MIN_MAGNITUDE`` (``1e-6``) in size: no weight looks like ``2.2e-308``, and a parametrization that
breaks on such values (``F.normalize``'s eps) is probed there by ``edge_of_domain`` as a warning,
not failed on values no training reaches. Tensors with more than ``max_drawn_elements`` entries
(default 128) are drawn from a seeded generator instead (the seed and a scale are what shrinks).

A strategy given a ``batch_shape`` marks what it draws as batched, so a check infers that the
parametrization accepts leading batch dims (``batched_forward_matches_per_item``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, TypeVar, Union

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor

__all__ = [
    "DEFAULT_BOUND",
    "MIN_MAGNITUDE",
    "float_dtypes",
    "shapes",
    "batch_shapes",
    "elements",
    "tensors",
    "matrices",
    "square_matrices",
    "symmetric_matrices",
    "skew_matrices",
    "mark_batched",
]

DEFAULT_BOUND = 8.0
"""Default bound on the magnitude of drawn entries: ``[-8, 8]``."""

MAX_DRAWN_ELEMENTS = 128
"""Most entries a drawn tensor has (shapes are drawn within it, so examples stay fast and shrink well)."""

MIN_MAGNITUDE = 1e-6
"""Smallest nonzero magnitude of a drawn entry: smaller draws become ``0.0`` (what they shrink to anyway)."""

BATCHED = "_pfunc_batched"

T = TypeVar("T")
Drawable = Union[T, SearchStrategy[T]]
DTypeLike = Union[torch.dtype, SearchStrategy[torch.dtype]]
ShapeLike = Union[Sequence[int], SearchStrategy[Sequence[int]]]
DeviceLike = Union[str, torch.device]


def mark_batched(t: Tensor, batch_shape: Any) -> Tensor:
    """``t``, marked as drawn with leading batch dims when ``batch_shape`` is a strategy or not ``()``."""
    if isinstance(batch_shape, SearchStrategy) or tuple(batch_shape):
        setattr(t, BATCHED, True)
    return t


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
    min_magnitude: float = MIN_MAGNITUDE,
) -> SearchStrategy[float]:
    """Finite Python floats in ``[min_value, max_value]`` exactly representable in ``dtype``
    (``bfloat16`` entries are drawn as float32 and rounded on conversion); draws of magnitude below
    ``min_magnitude`` become ``0.0`` (pass ``0`` and ``allow_subnormal=True`` for every float)."""
    _check_dtype(dtype, "elements")
    _check_bounds(min_value, max_value, "elements")
    if not (min_magnitude >= 0 and math.isfinite(min_magnitude)):
        raise ValueError(f"elements: min_magnitude must be a finite number >= 0, got {min_magnitude!r}")
    return _elements(dtype, float(min_value), float(max_value), allow_subnormal, float(min_magnitude))


def _no_tiny(cut: float):  # a named function, not a lambda: Hypothesis shows it in reprs
    def flush_tiny_to_zero(x: float) -> float:
        return 0.0 if abs(x) < cut else x

    return flush_tiny_to_zero


@functools.lru_cache(maxsize=256)
def _elements(
    dtype: torch.dtype, min_value: float, max_value: float, allow_subnormal: bool, min_magnitude: float = 0.0
) -> SearchStrategy[float]:
    width = 16 if dtype == torch.float16 else 32 if dtype in (torch.float32, torch.bfloat16) else 64
    floats = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, allow_subnormal=allow_subnormal, width=width)
    if min_magnitude > 0 and min_value <= 0 <= max_value:
        floats = floats.map(_no_tiny(min_magnitude))
    return floats


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
    return mark_batched(out.to(dtype=dtype, device=device), batch_shape)


@st.composite
def square_matrices(draw: Any, n: Optional[Drawable[int]] = None, **kwargs: Any) -> Tensor:
    """A ``(*batch_shape, n, n)`` matrix (batch); keyword arguments as :func:`matrices`."""
    size = _draw(draw, _side(n, kwargs.get("max_side", 4)))
    return draw(matrices(size, size, **kwargs))


@st.composite
def symmetric_matrices(draw: Any, n: Optional[Drawable[int]] = None, **kwargs: Any) -> Tensor:
    """``(M + M^T) / 2`` for a drawn square ``M``: exactly symmetric in every dtype."""
    M = draw(square_matrices(n, **kwargs))
    return mark_batched((M + M.mT) / 2, kwargs.get("batch_shape", ()))


@st.composite
def skew_matrices(draw: Any, n: Optional[Drawable[int]] = None, **kwargs: Any) -> Tensor:
    """``(M - M^T) / 2`` for a drawn square ``M``: exactly skew-symmetric, zero diagonal."""
    M = draw(square_matrices(n, **kwargs))
    return mark_batched((M - M.mT) / 2, kwargs.get("batch_shape", ()))


