"""A comparison: variants of one computation, checked equal on the same inputs, then timed together.

>>> import torch
>>> a = torch.randn(8, 8)
>>> c = Comparison(
...     family="demo", labels={"op": "square"},
...     variants={"pow": Variant(lambda: a**2), "mul": Variant(lambda: a * a)},
...     reference="mul", ratios=(("pow", "mul"),),
... )
>>> c.check()
>>> row = c.run(budget_s=0.02, min_repeats=3)
>>> round(row.timing.ratio("pow", "mul"), 1) > 0
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from .timing import Thunk, Timing, measure

__all__ = ["Variant", "Comparison", "Row", "MismatchError"]


def _same(result: Any) -> Any:
    return result


@dataclass(frozen=True)
class Variant:
    """One way to compute the thing: ``run()`` is what is timed; ``view(run())`` is the
    tree of tensors compared across variants (outputs, gradients, new state...). A variant that
    computes something else on purpose (``checked=False``: another network timed beside the
    others) is run by the check but not compared."""

    run: Thunk
    view: Callable[[Any], Any] = _same
    checked: bool = True


class MismatchError(AssertionError):
    """Two variants of a comparison disagree: the benchmark would compare different things."""


@dataclass(frozen=True)
class Comparison:
    """Variants of one computation on the same inputs, reported as one table row.

    ``labels`` are the row's leading columns (e.g. model, parametrization, mode);
    ``reference`` names the variant the others must equal (``torch.testing.assert_close``
    with ``rtol``/``atol``); ``ratios`` lists ``(numerator, denominator)`` pairs of
    medians to report; ``extras`` are further columns known when the row is built
    (compile time, graph breaks); ``after(timing)`` adds columns measured after the
    timing (peak memory, throughput), so those runs cannot disturb the check;
    ``facts`` holds structured results the goals are judged on (graph breaks).
    """

    family: str
    labels: Mapping[str, str]
    variants: Mapping[str, Variant]
    reference: str
    ratios: tuple[tuple[str, str], ...]
    rtol: float = 1e-5
    atol: float = 1e-6
    extras: Mapping[str, str] = field(default_factory=dict)
    sync: Callable[[], None] = lambda: None
    after: Optional[Callable[[Optional[Timing]], Mapping[str, str]]] = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reference not in self.variants:
            raise ValueError(f"Comparison {self.title}: reference {self.reference!r} is not a variant")
        for a, b in self.ratios:
            if a not in self.variants or b not in self.variants:
                raise ValueError(f"Comparison {self.title}: ratio {a}/{b} names an unknown variant")

    @property
    def title(self) -> str:
        return f"{self.family}: " + ", ".join(f"{k}={v}" for k, v in self.labels.items())

    def check(self) -> None:
        """Run every variant once and raise :class:`MismatchError` unless all equal the reference."""
        expected = self.variants[self.reference].view(self.variants[self.reference].run())
        for name, variant in self.variants.items():
            if name == self.reference:
                continue
            got = variant.view(variant.run())
            if not variant.checked:
                continue
            try:
                torch.testing.assert_close(got, expected, rtol=self.rtol, atol=self.atol)
            except AssertionError as e:
                raise MismatchError(f"{self.title}: {name!r} differs from {self.reference!r}: {e}") from None

    def run(self, *, budget_s: float, min_repeats: int = 10, max_repeats: int = 500, clock: str = "wall") -> "Row":
        """Timed medians of every variant, interleaved (see :func:`benchmarks.timing.measure`)."""
        thunks = {name: v.run for name, v in self.variants.items()}
        timing = measure(
            thunks, budget_s=budget_s, min_repeats=min_repeats, max_repeats=max_repeats, sync=self.sync, clock=clock
        )
        return Row(self, timing, self._extras(timing))

    def untimed(self) -> "Row":
        """The row without timing (smoke runs): only the extras."""
        return Row(self, None, self._extras(None))

    def _extras(self, timing: Optional[Timing]) -> dict[str, str]:
        extras = dict(self.extras)
        if self.after is not None:
            extras.update(self.after(timing))
        return extras


@dataclass(frozen=True)
class Row:
    """A measured comparison."""

    comparison: Comparison
    timing: Optional[Timing]
    extras: Mapping[str, str] = field(default_factory=dict)

    def ratio(self, numerator: str, denominator: str) -> float:
        if self.timing is None:
            raise ValueError(f"{self.comparison.title} was not timed")
        return self.timing.ratio(numerator, denominator)
