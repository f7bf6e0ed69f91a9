"""How closely one training run followed another, and whether it is the same run: per-step losses, final
weights, configs.

Made to check a ``torchrun`` run against the one-process run of the same command, or two runs with
different thread counts::

    .venv/bin/python -m examples.diffusion.compare_runs results/<one-process run> results/<torchrun run>

prints, over the steps both logged, the largest relative difference of the per-step losses and the
step where it happened, then the largest absolute difference of every weight, EMA weight and AdamW
moment of the two final checkpoints (which must be at the same step and of the same model), then a
verdict (:func:`verdict`), one of three:

* **the same run**: every difference within ``--rtol`` / ``--atol`` (both 1e-5, the tests' tolerance);
* **the same run up to float32 summation order**: the configs agree (run options such as ``--steps``
  aside) and the first :data:`START_STEPS` steps' losses agree within :data:`START_RTOL`, but later
  differences are larger. That is what adding up the same numbers in another order does (2 processes
  against 1, 2 threads against 1): measured on this project's machine, below 3e-7 at the first steps,
  then growing as AdamW amplifies it, to 1.1e-5 (losses) and 5.6e-5 (weights) after 100 steps of the
  CPU preset for a thread-count change, and as far for 2 processes against 1;
* **a different run**: the configs differ, or the losses differ beyond float32 rounding from the first
  steps on (another seed, other data, another batch order) — differences 1e-3 and up at step 1.

Exit status 0 for the same run (either kind), 3 for a different run, 1 for a run folder or checkpoint
that cannot be read. What this cannot tell: two runs that were the same at the start and then went
apart for another reason (say, a resume on other data) pass as summation-order drift when their
configs agree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from examples.commands import python_command

from .checkpoint import CheckpointError, load_checkpoint
from .cli import ShortErrorParser
from .config import RUN_OPTIONS, config_differences
from .run_outputs import LOSSES, read_losses
from .training_checkpoint import checkpoint_path

__all__ = ["loss_difference", "loss_differences", "weight_differences", "verdict", "Verdict", "START_STEPS", "START_RTOL",
           "main"]

#: The first steps whose losses must agree to float32 rounding for "the same run up to summation order".
START_STEPS = 5
#: Their allowed relative loss difference: 30x the 3e-7 a different summation order gave there (2 processes
#: against 1, 2 threads against 1), 100x below the 1e-3 and more of another seed or other data at step 1.
START_RTOL = 1e-5


def loss_differences(a: Path, b: Path) -> list[tuple[int, float]]:
    """``[(step, relative loss difference)]`` over the steps both runs logged, in step order."""
    la, lb = dict(read_losses(a / LOSSES)), dict(read_losses(b / LOSSES))
    steps = sorted(set(la) & set(lb))
    if not steps:
        raise ValueError(f"'{a}' and '{b}' have no logged step in common ({LOSSES})")
    return [(s, abs(la[s] - lb[s]) / max(abs(la[s]), 1e-30)) for s in steps]


def loss_difference(a: Path, b: Path) -> tuple[float, int, int]:
    """``(largest relative loss difference, its step, steps compared)`` over the steps both runs logged."""
    diffs = loss_differences(a, b)
    worst, where = max((d, s) for s, d in diffs)
    return worst, where, len(diffs)


def weight_differences(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute difference per group (``params``, ``ema``, AdamW's ``exp_avg``/``exp_avg_sq``)
    of two loaded checkpoints of the same model at the same step."""
    if a["step"] != b["step"]:
        raise ValueError(f"the checkpoints are at different steps ({a['step']} and {b['step']})")
    out = {}
    for group in ("params", "ema"):
        if set(a[group]) != set(b[group]) or any(a[group][k].shape != b[group][k].shape for k in a[group]):
            raise ValueError(f"the checkpoints' {group} have different keys or shapes: not the same model")
        out[group] = max((float((a[group][k].double() - b[group][k].double()).abs().max()) for k in a[group]), default=0.0)
    for moment in ("exp_avg", "exp_avg_sq"):
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        out[moment] = max((float((sa[i][moment].double() - sb[i][moment].double()).abs().max()) for i in sa if i in sb), default=0.0)
    return out


@dataclass(frozen=True)
class Verdict:
    """Whether two runs are the same run (``same``), and the line that says so."""

    same: bool
    line: str


def verdict(config_a: dict, config_b: dict, losses: list[tuple[int, float]], weights: dict[str, float], rtol: float,
            atol: float) -> Verdict:
    """The verdict of the module docstring from the two configs, :func:`loss_differences` and :func:`weight_differences`."""
    diffs = config_differences(config_a, config_b, ignore=RUN_OPTIONS)
    if diffs:
        shown = "; ".join(d.replace("checkpoint ", "", 1).replace(", now ", " against ") for d in diffs[:3])
        return Verdict(False, f"a different run: the configs differ ({shown}{' ...' if len(diffs) > 3 else ''})")
    if max(d for _, d in losses) <= rtol and all(v <= atol for v in weights.values()):
        return Verdict(True, f"the same run (every difference within rtol {rtol:g} / atol {atol:g})")
    start = losses[:START_STEPS]
    first, at = max((d, s) for s, d in start)
    if first > START_RTOL:
        return Verdict(False, f"a different run: the losses differ by {first:.2g} at step {at} already, beyond the {START_RTOL:g} "
                              "of float32 rounding (another seed, other data or another batch order)")
    worst, where = max((d, s) for s, d in losses)
    return Verdict(True, f"the same run up to float32 summation order: the same config, the first {len(start)} steps' losses "
                         f"within {START_RTOL:g} (largest {first:.2g}), the differences then grown to {worst:.2g} by step "
                         f"{where}, as AdamW amplifies float32 rounding (see --help)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ShortErrorParser(
        prog=python_command("examples.diffusion.compare_runs"),
        description=__doc__.split("::")[0].split("\n\n")[0].replace("\n", " ") + " Verdicts: 'the same run' when every "
        "difference is within --rtol/--atol; 'the same run up to float32 summation order' when the configs agree and the "
        f"first {START_STEPS} steps' losses agree within {START_RTOL:g} (30x what 2 processes against 1, or 2 threads against "
        "1, gave there: below 3e-7; another seed or other data differ by 1e-3 and up at step 1), however far AdamW "
        "amplified the difference later (a thread-count change measured 1.1e-5 in the losses and 5.6e-5 in the weights "
        "after 100 steps of the CPU preset); else 'a different run'. Exit status 0 for the same run (either kind), 3 for "
        "a different run, 1 when a run cannot be read.",
    )
    parser.add_argument("run_a", help="a run folder the training command wrote")
    parser.add_argument("run_b", help="another run folder (e.g. the same command under torchrun)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="allowed relative loss difference of 'the same run' (default 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-5, help="allowed absolute weight difference of 'the same run' (default 1e-5)")
    args = parser.parse_args(argv)
    for flag in ("rtol", "atol"):
        value = getattr(args, flag)
        if not (value >= 0 and value != float("inf")):
            parser.error(f"--{flag} must be a finite number >= 0, got {value}")
    try:
        runs = [Path(args.run_a), Path(args.run_b)]
        for run in runs:
            if not run.is_dir():
                raise ValueError(f"'{run}' is not a run folder")
        losses = loss_differences(*runs)
        checkpoints = [load_checkpoint(checkpoint_path(r)) for r in runs]
        weights = weight_differences(*checkpoints)
        configs = [c["config"] for c in checkpoints]
    except KeyError as e:
        print(f"error: a checkpoint lacks {e}: not a checkpoint of the training command", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    loss, step = max((d, s) for s, d in losses)
    print(f"losses: {len(losses)} steps compared; largest relative difference {loss:.2g} (step {step})")
    print("final weights, largest absolute difference: " + ", ".join(f"{k} {v:.2g}" for k, v in weights.items()))
    within = loss <= args.rtol and all(v <= args.atol for v in weights.values())
    print(f"within rtol {args.rtol:g} / atol {args.atol:g}: {'yes' if within else 'no'}")
    result = verdict(*configs, losses, weights, args.rtol, args.atol)
    print(f"verdict: {result.line}")
    return 0 if result.same else 3


if __name__ == "__main__":
    sys.exit(main())
