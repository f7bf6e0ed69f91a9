"""How closely one training run followed another: per-step losses and final weights.

Made to check a ``torchrun`` run against the one-process run of the same command (they should
agree up to float summation order), or two runs with different thread counts::

    .venv/bin/python -m examples.diffusion.compare_runs results/<one-process run> results/<torchrun run>

prints, over the steps both logged, the largest relative difference of the per-step losses and
the step where it happened, then the largest absolute difference of every weight, EMA weight
and AdamW moment of the two final checkpoints (which must be at the same step and of the same
model). Exit status 0 when every difference is within ``--rtol`` / ``--atol`` (both 1e-5, the
tests' tolerance), 3 when one is not, 1 for a run folder or checkpoint that cannot be read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence


from .checkpoint import CheckpointError, load_checkpoint
from .cli import ShortErrorParser
from .run_outputs import LOSSES, read_losses
from .training_checkpoint import checkpoint_path

__all__ = ["loss_difference", "weight_differences", "main"]


def loss_difference(a: Path, b: Path) -> tuple[float, int, int]:
    """``(largest relative loss difference, its step, steps compared)`` over the steps both runs logged."""
    la, lb = dict(read_losses(a / LOSSES)), dict(read_losses(b / LOSSES))
    steps = sorted(set(la) & set(lb))
    if not steps:
        raise ValueError(f"'{a}' and '{b}' have no logged step in common ({LOSSES})")
    worst, where = max((abs(la[s] - lb[s]) / max(abs(la[s]), 1e-30), s) for s in steps)
    return worst, where, len(steps)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ShortErrorParser(
        prog="python -m examples.diffusion.compare_runs",
        description="How closely one diffusion training run followed another: per-step losses and final weights.",
    )
    parser.add_argument("run_a", help="a run folder the training command wrote")
    parser.add_argument("run_b", help="another run folder (e.g. the same command under torchrun)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="allowed relative loss difference (default 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-5, help="allowed absolute weight difference (default 1e-5)")
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
        loss, step, n = loss_difference(*runs)
        weights = weight_differences(*(load_checkpoint(checkpoint_path(r)) for r in runs))
    except KeyError as e:
        print(f"error: a checkpoint lacks {e}: not a checkpoint of the training command", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"losses: {n} steps compared; largest relative difference {loss:.2g} (step {step})")
    print("final weights, largest absolute difference: " + ", ".join(f"{k} {v:.2g}" for k, v in weights.items()))
    within = loss <= args.rtol and all(v <= args.atol for v in weights.values())
    print(f"within rtol {args.rtol:g} / atol {args.atol:g}: {'yes' if within else 'no'}")
    return 0 if within else 3


if __name__ == "__main__":
    sys.exit(main())
