"""Run ``pfunc.testing`` on every subject and mutant and score it: which property caught each bug.

A mutant is *caught* when the check fails (the report names the violated properties) or, for bugs at
the edge of the domain, when the report warns about something (property, probe, kind) that the
correct subject's report does not. A subject is *flagged* (a false alarm) when its check fails.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pfunc.testing import ParametrizationCheckError, check_parametrization

from .catalog import MUTANTS, Mutant
from .subjects import SUBJECTS, Subject, subject

__all__ = ["Outcome", "check", "score", "table", "MAX_EXAMPLES"]

MAX_EXAMPLES = 15
"""Examples per check in the suite: enough for every catch to be found in the derandomized search."""


@dataclass
class Outcome:
    """What the kit said about one parametrization: failed properties, warning keys, or a crash."""

    name: str
    failed: list[str] = field(default_factory=list)
    warned: set = field(default_factory=set)
    crash: Optional[str] = None
    seconds: float = 0.0
    text: str = ""


def _accepted(kwargs: dict) -> dict:
    """The arguments this version of the kit takes (the 'before' kit lacks the new ones)."""
    names = inspect.signature(check_parametrization).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _warning_keys(report: Any) -> set:
    return {(w.property, w.probe, w.kind) for w in getattr(report, "warnings", [])}


def check(subj: Subject, parametrization: Any, name: str, max_examples: int = MAX_EXAMPLES) -> Outcome:
    """Run the check a user would write for ``subj`` on ``parametrization``."""
    kwargs = dict(subj.kwargs(), **_accepted(dict(subj.new_kwargs, all_failures=False)))
    outcome = Outcome(name)
    start = time.perf_counter()
    try:
        report = check_parametrization(parametrization, name=name, max_examples=max_examples, **kwargs)
        outcome.warned = _warning_keys(report)
        outcome.text = report.summary()
    except ParametrizationCheckError as error:
        crashed = [f for f in error.failures if f.message.startswith("the check crashed")]
        outcome.failed = [f.property for f in error.failures if f not in crashed]
        outcome.crash = "; ".join(f.message.splitlines()[0] for f in crashed) or None
        outcome.warned = _warning_keys(error.report)
        outcome.text = str(error)
    except Exception as error:  # a crash is not a report: counted as missed (so is a crash inside the kit)
        outcome.crash = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    outcome.seconds = time.perf_counter() - start
    return outcome


@dataclass
class Score:
    subjects: dict[str, Outcome]
    mutants: list[tuple[Mutant, Outcome, list[str]]]  # with the properties that caught it

    @property
    def caught(self) -> int:
        return sum(1 for _, _, by in self.mutants if by)

    @property
    def false_alarms(self) -> list[str]:
        return [n for n, o in self.subjects.items() if o.failed or o.crash]


def caught_by(mutant_outcome: Outcome, subject_outcome: Outcome) -> list[str]:
    """The properties that caught the mutant: its failures, then warnings the subject does not give."""
    warned = sorted({p for (p, probe, kind) in mutant_outcome.warned - subject_outcome.warned})
    return mutant_outcome.failed + [f"{p} (warning)" for p in warned if p not in mutant_outcome.failed]


def score(names: Optional[list[str]] = None, max_examples: int = MAX_EXAMPLES) -> Score:
    """Check every subject (or those of the mutants named) and every mutant (or those named)."""
    mutants = [m for m in MUTANTS if names is None or m.name in names]
    wanted = {m.of for m in mutants} | (set(s.name for s in SUBJECTS) if names is None else set())
    subjects = {s.name: check(s, s.make(), s.name, max_examples) for s in SUBJECTS if s.name in wanted}
    rows = []
    for m in mutants:
        outcome = check(subject(m.of), m.make(), m.name, max_examples)
        rows.append((m, outcome, caught_by(outcome, subjects[m.of])))
    return Score(subjects, rows)


def table(result: Score) -> str:
    """A plain-text table: every subject (flagged or not) and every mutant (caught by what)."""
    lines = [f"{'subject':<28} {'flagged':<10} seconds"]
    for n, o in result.subjects.items():
        flag = "CRASH" if o.crash else ("FLAGGED" if o.failed else "no")
        lines.append(f"{n:<28} {flag:<10} {o.seconds:6.1f}  {o.crash or ', '.join(o.failed)}")
    lines += ["", f"{'mutant':<38} {'kind':<9} {'expected':<44} caught by"]
    for m, o, by in result.mutants:
        got = ", ".join(by) if by else ("MISSED" + (f" (crash: {o.crash})" if o.crash else ""))
        lines.append(f"{m.name:<38} {m.kind:<9} {m.caught_by:<44} {got}  [{o.seconds:.1f}s]")
    n = len(result.mutants)
    lines += [
        "",
        f"score: {result.caught}/{n} mutants caught ({100 * result.caught / max(n, 1):.0f}%) "
        f"of {len({m.of for m, _, _ in result.mutants})} subjects; false alarms: {result.false_alarms or 'none'}",
    ]
    return "\n".join(lines)
