"""Hypothesis strategies for what parametrizations eat: tensors, structured matrices, module trees, states.

One module per family: ``tensors`` (dtypes, shapes, entries, tensors, plain/symmetric/skew matrices),
``structured`` (orthogonal, SPD, given singular values, unit vectors), ``modules`` (states,
module tensors, parametrized trees); all are importable from here.

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

from .modules import module_tensors, parametrized_trees, spectral_norm_states
from .structured import (
    low_rank_matrices,
    matrices_with_singular_values,
    orthogonal_matrices,
    spd_matrices,
    spectral_gap_matrices,
    unit_vectors,
    well_conditioned_matrices,
)
from .tensors import (
    DEFAULT_BOUND,
    MAX_DRAWN_ELEMENTS,
    MIN_MAGNITUDE,
    batch_shapes,
    elements,
    float_dtypes,
    mark_batched,
    matrices,
    shapes,
    skew_matrices,
    square_matrices,
    symmetric_matrices,
    tensors,
)

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
    "mark_batched",
    "MAX_DRAWN_ELEMENTS",
]

