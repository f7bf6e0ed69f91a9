"""Built-in parametrizations, one family per module."""

from .elementwise import Bounded, Mask, Positive
from .lowrank import LowRankAdapter
from .matrix import SPD, Cayley, MatrixExp, Orthogonal, Skew, Symmetric
from .norm import SpectralNorm, WeightNorm, WeightStandardization

__all__ = [
    "Symmetric",
    "Skew",
    "Cayley",
    "MatrixExp",
    "SPD",
    "Orthogonal",
    "SpectralNorm",
    "WeightNorm",
    "WeightStandardization",
    "Positive",
    "Bounded",
    "Mask",
    "LowRankAdapter",
]
