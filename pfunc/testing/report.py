"""What a check reports: each violated property with its minimal failing input, readable.

>>> import torch
>>> describe(torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
'float32[2, 2] = [[0.0, 1.0], [0.5, 0.0]]'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["describe", "describe_tree", "PropertyFailure", "CheckWarning", "CheckReport", "ParametrizationCheckError"]

MAX_SHOWN_VALUES = 36
LEFT_OUT = "left out by the caller"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(t: Any, max_values: int = MAX_SHOWN_VALUES) -> str:
    """``"float64[2, 2] = [[0.0, 1.0], ...]"``: dtype, shape, device (if not CPU) and the values
    when there are at most ``max_values``, else their range."""
    if not isinstance(t, Tensor):
        return repr(t)
    head = f"{_dtype_name(t.dtype)}[{', '.join(str(s) for s in t.shape)}]"
    if t.device.type != "cpu":
        head += f" on {t.device}"
    if t.device.type == "meta":
        return f"{head} (no data)"
    x = t.detach().cpu()
    if x.numel() <= max_values:
        values = x.tolist() if x.dtype != torch.bfloat16 else x.float().tolist()
        return f"{head} = {values}"
    finite = x[x.isfinite()] if (x.is_floating_point() or x.is_complex()) else x
    if finite.numel() == 0:
        return f"{head} (no finite values)"
    return f"{head} (values in [{float(finite.min()):.4g}, {float(finite.max()):.4g}])"


def describe_tree(tree: Any, max_values: int = MAX_SHOWN_VALUES) -> str:
    """One line per tensor of a (nested) dict / list / tuple of tensors."""
    lines: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}[{i}]", v)
        else:
            lines.append(f"{prefix}: {describe(node, max_values)}")

    walk("", tree)
    return "\n".join(lines)


@dataclass(frozen=True)
class PropertyFailure:
    """One violated property: ``property`` (its name), ``message`` (what was observed, with the
    discrepancy against the tolerance) and ``example`` (the minimal failing input, described)."""

    property: str
    message: str
    example: str

    def __str__(self) -> str:
        example = "\n".join("    " + line for line in self.example.splitlines())
        message = "\n".join("  " + line for line in self.message.splitlines())
        return f"[{self.property}]\n{message}\n  minimal failing input:\n{example}"


@dataclass(frozen=True)
class CheckWarning:
    """Something worth reading that does not fail the check: ``property`` found ``kind`` (``"non-finite
    output"``, ``"off the constraint"``...) at ``probe`` (``"zero"``, ``"+large"``...); ``message`` says
    what, ``example`` shows the input."""

    property: str
    probe: str
    kind: str
    message: str
    example: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.property, self.probe, self.kind)

    def __str__(self) -> str:
        example = "\n".join("    " + line for line in self.example.splitlines())
        return f"[{self.property}: {self.probe}] {self.kind}: {self.message}\n  input:\n{example}"


@dataclass
class CheckReport:
    """The outcome of :func:`pfunc.testing.check_parametrization`.

    ``examples``: Hypothesis examples run (each checks every selected property);
    ``checked``: properties checked, with how many examples each applied to;
    ``skipped``: properties not checked, with the reason; ``failures``: violations;
    ``warnings``: what the edge of the domain showed (:class:`CheckWarning`, never a failure: some
    correct parametrizations are genuinely singular there); ``notes``: information (graph breaks).
    """

    name: str
    examples: int = 0
    checked: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failures: list[PropertyFailure] = field(default_factory=list)
    warnings: list[CheckWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """One paragraph: the parametrization, examples, properties checked and skipped."""
        lines = [f"{self.name}: {self.examples} examples, {len(self.checked)} properties checked"]
        for prop, n in self.checked.items():
            lines.append(f"  checked {prop} ({n} examples)")
        left_out = [prop for prop, why in self.skipped.items() if why == LEFT_OUT]
        for prop, why in self.skipped.items():
            if why != LEFT_OUT:
                lines.append(f"  skipped {prop}: {why}")
        if left_out:
            lines.append(f"  left out by the caller: {', '.join(left_out)}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.warnings:
            lines.append(
                f"  {len(self.warnings)} warning(s) at the edge of the domain (not failures: a correct "
                "parametrization may be singular there; see report.warnings):"
            )
            lines += [f"    {w.probe}: {w.kind}: {w.message.splitlines()[0][:120]}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        if self.ok:
            return self.summary()
        n = len(self.failures)
        head = f"{self.name} violates {n} propert{'y' if n == 1 else 'ies'}:"
        return "\n\n".join([head] + [str(f) for f in self.failures] + [self.summary()])


class ParametrizationCheckError(AssertionError):
    """Raised by :func:`pfunc.testing.check_parametrization` when a property is violated;
    ``report`` holds every failure (``report.failures``) with its minimal example."""

    def __init__(self, report: CheckReport):
        super().__init__(str(report))
        self.report = report

    @property
    def failures(self) -> Sequence[PropertyFailure]:
        return self.report.failures

    @property
    def properties(self) -> list[str]:
        """Names of the violated properties."""
        return [f.property for f in self.report.failures]
