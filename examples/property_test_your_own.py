"""Property-test your own parametrization with pfunc.testing: one call, every invariant, minimal counterexamples.

Two parametrizations a user might write for their research, checked in a few lines each:

* ``Interval(low, high)``: ``X -> low + (high - low) * (tanh(X) + 1) / 2``, values in ``(low, high)``;
* ``LowRank(rank)``: two originals ``(U, V) -> U @ V^T``, matrices of rank at most ``rank``,
  with ``right_inverse`` by truncated SVD;

and a buggy ``Interval`` whose ``right_inverse`` forgets to undo the affine map, which
the kit catches with a two-line report. In your own test suite it is one line::

    test_interval = parametrization_test(Interval(-1.0, 3.0), S.tensors(S.shapes()), constraint=C.in_interval(-1.0, 3.0))

Run from the repository root::

    python -m examples.property_test_your_own                    # 25 examples per check
    python -m examples.property_test_your_own --max-examples 200 # a longer search
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch import Tensor

from pfunc.testing import CheckReport, ParametrizationCheckError, check_parametrization
from pfunc.testing import constraints as C
from pfunc.testing import strategies as S

__all__ = ["Interval", "LowRank", "BuggyInterval", "check_interval", "check_low_rank", "check_buggy_interval", "main"]


class Interval:
    """``X -> low + (high - low) * (tanh(X) + 1) / 2``: values in the open interval ``(low, high)``."""

    def __init__(self, low: float, high: float):
        if not low < high:
            raise ValueError(f"Interval: need low < high, got {low}, {high}")
        self.low, self.high = low, high

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.low}, {self.high})"

    def forward(self, X: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * (torch.tanh(X) + 1) / 2

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        return torch.atanh(2 * (Y - self.low) / (self.high - self.low) - 1)


class BuggyInterval(Interval):
    """Forgets the affine map in ``right_inverse``: only right when ``(low, high) == (-1, 1)``."""

    def right_inverse(self, Y: Tensor) -> Tensor:
        return torch.atanh(Y)


class LowRank:
    """``(U, V) -> U @ V^T`` with ``U (n, rank)``, ``V (m, rank)``; ``right_inverse(W)`` splits
    the top ``rank`` singular triplets evenly, ``U = U_r sqrt(s)``, ``V = V_r sqrt(s)``."""

    def __init__(self, rank: int):
        self.rank = rank

    def __repr__(self) -> str:
        return f"LowRank({self.rank})"

    def forward(self, U: Tensor, V: Tensor) -> Tensor:
        return U @ V.mT

    __call__ = forward

    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor]:
        Uw, s, Vh = torch.linalg.svd(W, full_matrices=False)
        root = s[..., : self.rank].sqrt()
        return Uw[..., :, : self.rank] * root.unsqueeze(-2), Vh[..., : self.rank, :].mT * root.unsqueeze(-2)


def check_interval(max_examples: Optional[int] = None) -> CheckReport:
    """Every invariant of ``Interval(-1, 3)`` on tensors of any shape up to 3 dims, float32 and float64.

    Inputs stay in [-4, 4]: beyond about 9 (float32) tanh rounds to +-1 and the output is an endpoint,
    which the open-interval constraint reports (try ``min_value=-20, max_value=20``).
    """
    inputs = S.tensors(S.shapes(0, 3), dtype=S.float_dtypes(), min_value=-4.0, max_value=4.0)
    return check_parametrization(Interval(-1.0, 3.0), inputs, constraint=C.in_interval(-1.0, 3.0), max_examples=max_examples)


def check_low_rank(max_examples: Optional[int] = None) -> CheckReport:
    """Every invariant of ``LowRank(2)`` on ``(U, V)`` of shapes ``(4, 2), (3, 2)``; the round trip runs on
    drawn rank-2 matrices (the image), and the constraint is "rank at most 2"."""
    originals = (S.tensors((4, 2)), S.tensors((3, 2)))  # one strategy per original
    at_most_rank_2 = C.predicate(lambda W: bool(torch.linalg.matrix_rank(W) <= 2), "rank <= 2")
    return check_parametrization(
        LowRank(2), originals, image=S.low_rank_matrices(4, 3, rank=2), constraint=at_most_rank_2, max_examples=max_examples
    )


def check_buggy_interval(max_examples: Optional[int] = None) -> ParametrizationCheckError:
    """The kit's report on :class:`BuggyInterval` (raises ``AssertionError`` if it were not caught)."""
    try:
        check_parametrization(BuggyInterval(-1.0, 3.0), S.tensors(S.shapes(0, 2)), max_examples=max_examples)
    except ParametrizationCheckError as error:
        return error
    raise AssertionError("the kit missed BuggyInterval's wrong right_inverse")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=25, help="Hypothesis examples per check (default 25)")
    args = parser.parse_args(argv)
    for check in (check_interval, check_low_rank):
        print(check(args.max_examples).summary(), end="\n\n")
    error = check_buggy_interval(args.max_examples)
    print("BuggyInterval, as the kit reports it:\n")
    print("\n".join(str(f) for f in error.failures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
