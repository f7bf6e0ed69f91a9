"""Sample quality of the main job's Unet layouts and of denoising-diffusion-pytorch's Unet, on one budget.

Every arm trains on the same data with the same streams: the main job's 20,000 shapes, the same
batch indices, times and noise at every step (:func:`examples.diffusion.training.make_generators`
from the training seed), AdamW (lr 2e-3, betas 0.9/0.99, no weight decay: Adam), gradient clipping
at 1, the EMA rule of the main job (copy until step 100, then decay 0.995), the CPU preset's sizes
(dim 16, mults 1,2,4, 2 heads of 16, 1000 cosine steps, noise prediction unless the arm's name says
``@objective=...``). Each trained EMA is
sampled with the main job's DDIM sampler (50 steps, eta 1) from several sampling seeds, and scored
by :mod:`examples.diffusion.quality` (Fréchet classifier distance over 500 samples; one judge for
the whole run).

Arms: the main job's Unet in the ``classic`` layout (denoising-diffusion-pytorch up to 1.5) and the
``modern`` one (2.x), one component of the modern layout at a time added to the classic one, and
the package's own ``Unet`` (``ddpm``: the release found by :mod:`benchmarks.reference_unet`),
trained the stateful way with its own ``GaussianDiffusion``'s loss (``loss.backward()`` on its module; for
``pred_noise`` that loss equals the main job's, for ``pred_v`` and ``pred_x0`` the package weights it per sample). The main job's arms train
functionally, exactly as ``python -m examples.diffusion.train`` does.

    python -m benchmarks.diffusion_quality --arms classic,modern,ddpm --train-seeds 0,1,2 --out results/quality
    python -m benchmarks.diffusion_quality --table results/quality        # the table of what is there

An arm name may end in ``@FIELD=VALUE`` suffixes that change its training recipe (``classic@objective=pred_v``).

Each (arm, training seed) writes ``ARM-seedS.json`` in ``--out`` and is skipped when that file
exists, so a long comparison can be split over processes (one thread each) and resumed. A run of
the full budget takes about 8 minutes per (arm, seed) on one core of this project's machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ARMS", "Arm", "train_and_score", "table", "main"]

# The modern layout's components, as Unet options (the classic layout's values are the defaults).
COMPONENTS = {
    "rmsnorm": dict(block_norm="rmsnorm", attn_norm="rmsnorm", weight_standardization=False),
    "mem_kv": dict(num_mem_kv=4),
    "unscaled_values": dict(scale_linear_values=False),
    "full_attn": dict(full_attn_innermost=True),
}


@dataclass(frozen=True)
class Arm:
    """One network to train: the main job's Unet with ``options`` (``reference=False``) or the package's ``Unet``;
    ``training`` replaces entries of the CPU preset (e.g. ``{"objective": "pred_v"}``)."""

    description: str
    options: dict
    reference: bool = False
    training: dict = field(default_factory=dict)


def _arms() -> dict[str, Arm]:
    from examples.diffusion.unet import LAYOUTS

    arms = {
        "classic": Arm("main job, classic layout (GroupNorm + weight standardization, as releases up to 1.5)", dict(LAYOUTS["classic"])),
        "modern": Arm("main job, modern layout (RMSNorm, memory key/values, as releases 2.x)", dict(LAYOUTS["modern"])),
    }
    for name, change in COMPONENTS.items():
        arms[f"classic+{name}"] = Arm(f"main job, classic layout with the modern {name}", {**LAYOUTS["classic"], **change})
    arms["modern+weight_standardization"] = Arm("main job, modern layout with weight-standardized Block convs (pfunc)",
                                                {**LAYOUTS["modern"], "weight_standardization": True})
    arms["ddpm"] = Arm("denoising-diffusion-pytorch's own Unet, trained statefully", {}, reference=True)
    return arms


ARMS: dict[str, Arm] = {}

#: The order of the table's rows (`--table`; others follow, sorted): the layouts, the package, the components, the objective.
TABLE_ORDER = ("classic", "modern", "ddpm", "classic+rmsnorm", "classic+mem_kv", "classic+unscaled_values",
               "classic+full_attn", "classic@objective=pred_v", "modern@objective=pred_v",
               "modern+weight_standardization@objective=pred_v")

# What an arm's "@field=value" suffix may change: the training recipe, not the budget or the data.
RECIPE_FIELDS = ("objective", "lr", "beta_schedule", "ema_decay", "ema_after", "batch_size", "max_grad_norm", "weight_decay")


def arm(name: str) -> Arm:
    """The arm ``name``: one of :data:`ARMS`, optionally with ``@field=value`` suffixes changing its training recipe
    (``classic@objective=pred_v@lr=0.001``); ``ValueError`` naming what is unknown or invalid."""
    base, *recipe = name.split("@")
    if base not in ARMS:
        raise ValueError(f"unknown arm {base!r}; choose from {', '.join(ARMS)}")
    training = {}
    from examples.diffusion.config import PRESETS, ConfigError, TrainConfig, check_values

    for item in recipe:
        key, eq, text = item.partition("=")
        if key not in RECIPE_FIELDS or not eq:
            raise ValueError(f"{name}: '{item}' is not FIELD=VALUE with FIELD one of {', '.join(RECIPE_FIELDS)}")
        kind = type(PRESETS["cpu"][key])
        try:
            training[key] = kind(text)
        except ValueError:
            raise ValueError(f"{name}: {key} must be a {kind.__name__}, got {text!r}") from None
    try:
        check_values(TrainConfig(**{**PRESETS["cpu"], **training}))
    except ConfigError as e:
        raise ValueError(f"{name}: {e}") from None
    found = ARMS[base]
    return Arm(found.description + "".join(f", {k} {v}" for k, v in training.items()), found.options, found.reference, training)


#: The recipe every arm starts from: the CPU preset with noise prediction, the objective the comparison
#: began with (an arm's ``@objective=...`` changes it); the layout and weight standardization are the arm's.
BASE_RECIPE = {"objective": "pred_noise"}


def config(seed: int, steps: int):
    """The CPU preset of the main job, with :data:`BASE_RECIPE`, training seed ``seed`` and ``steps`` optimizer steps."""
    from examples.diffusion.config import PRESETS, TrainConfig

    return TrainConfig(**{**PRESETS["cpu"], **BASE_RECIPE, "seed": seed, "steps": steps})


def train_and_score(arm: Arm, seed: int, sampling_seeds: Sequence[int], *, steps: int, judge, data: Tensor,
                    reference_path: Optional[str] = None, samples: int = 500, sampling_steps: int = 50,
                    log: Callable[[str], None] = print) -> dict:
    """Train ``arm`` from training seed ``seed`` for ``steps`` steps and score its EMA's ``samples`` images
    (DDIM, ``sampling_steps`` steps, eta 1) from each sampling seed."""
    from benchmarks.reference_unet import stateful_trainer
    from examples.diffusion.model import build_model
    from examples.diffusion.quality import evaluate_shapes
    from examples.diffusion.training import (draw_micro_batch, initial_train_state, make_generators, make_grad_fn,
                                             make_loss_fn, train_step)

    cfg = config(seed, steps).replace(**arm.training)
    device = torch.device("cpu")
    _, net, diffusion = build_model(cfg.replace(layout="classic", weight_standardization=True), None if arm.reference else arm.options)
    gens = make_generators(cfg.seed, data.shape[0], cfg.batch_size, device)
    losses: list[float] = []
    started = time.process_time()
    if arm.reference:
        module, ema, reference_step = stateful_trainer(cfg, reference_path)
        for step in range(1, steps + 1):
            mb = draw_micro_batch(data, gens, diffusion, False, device)
            losses.append(reference_step(mb.x0, mb.t, mb.noise).item())
            if step % 250 == 0:
                log(f"  step {step}: loss {statistics.fmean(losses[-250:]):.4f}")
        sampler_module = copy.deepcopy(module).eval()
        sampler_module.load_state_dict(ema, strict=False)
        model = lambda x, t, sc: sampler_module(x, t, sc)  # noqa: E731
    else:
        ts = initial_train_state(net, cfg.seed, device, cfg.lr, cfg.weight_decay)
        grad_fn = make_grad_fn(make_loss_fn(net, diffusion))
        for step in range(1, steps + 1):
            mb = draw_micro_batch(data, gens, diffusion, False, device)
            losses.append(train_step(ts, grad_fn, [mb], max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay,
                                     ema_every=cfg.ema_every, ema_after=cfg.ema_after))
            if step % 250 == 0:
                log(f"  step {step}: loss {statistics.fmean(losses[-250:]):.4f}")
        values, _ = net.materialize(ts.ema, ts.state, training=False)
        model = lambda x, t, sc: net.apply(values, x, t, sc)  # noqa: E731
    train_s = time.process_time() - started
    scores = []
    with torch.no_grad():
        for sampling_seed in sampling_seeds:
            g = torch.Generator().manual_seed(sampling_seed)
            images = diffusion.sample(model, (samples, cfg.channels, cfg.image_size, cfg.image_size), g, sampling_steps,
                                      cfg.ddim_eta)
            result = evaluate_shapes(images, cfg.image_size, cfg.channels, judge=judge)
            scores.append({"sampling_seed": sampling_seed, "fcd": result["samples"]["fcd"],
                           "class_counts": result["samples"]["class_counts"], "real_fcd": result["real"]["fcd"],
                           "noise_fcd": result["noise"]["fcd"]})
            log(f"  sampling seed {sampling_seed}: FCD {scores[-1]['fcd']:.1f}, classes {scores[-1]['class_counts']}")
    return {"arm": arm.description, "options": arm.options, "seed": seed, "steps": steps, "samples": samples,
            "sampling_steps": sampling_steps,
            "final_loss": statistics.fmean(losses[-100:]), "train_cpu_s": train_s, "scores": scores,
            "torch": torch.__version__}


def table(folder: Path, arms: Optional[Sequence[str]] = None) -> str:
    """A markdown table of the results in ``folder``: per arm, each training seed's mean FCD and the overall mean."""
    results: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*-seed*.json")):
        name = path.name.rsplit("-seed", 1)[0]
        try:
            results.setdefault(name, []).append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a result this command wrote ({e})") from None
    from examples.diffusion.data import SHAPES

    first = list(arms or TABLE_ORDER)
    order = [a for a in first if a in results] + sorted(set(results) - set(first))
    lines = ["| arm | FCD per training seed (mean of its sampling seeds) | mean FCD (all runs) | spread of run means | "
             "disks / crosses / triangles (mean count) | final loss |", "|---|---|---|---|---|---|"]
    for name in order:
        runs = sorted(results[name], key=lambda r: r["seed"])
        per_seed = [statistics.fmean(s["fcd"] for s in r["scores"]) for r in runs]
        every = [s["fcd"] for r in runs for s in r["scores"]]
        counts = [s["class_counts"] for r in runs for s in r["scores"]]
        mean_counts = [statistics.fmean(c[i] for c in counts) for i in range(len(counts[0]))]
        pick = [mean_counts[SHAPES.index(k)] for k in ("disk", "cross", "triangle") if k in SHAPES]
        lines.append(f"| {name} | " + ", ".join(f"s{r['seed']}: {m:.1f}" for r, m in zip(runs, per_seed))
                     + f" | **{statistics.fmean(every):.1f}** | {min(per_seed):.1f}-{max(per_seed):.1f} | "
                     + " / ".join(f"{c:.0f}" for c in pick)
                     + f" | {statistics.fmean(r['final_loss'] for r in runs):.4f} |")
    return "\n".join(lines)


def _different_budget(path: Path, args: argparse.Namespace) -> Optional[str]:
    """Why the result in ``path`` is not this command's run (``None``: it is, and is kept)."""
    try:
        done = json.loads(path.read_text())
        budget = (done["steps"], done["samples"], done["sampling_steps"], [r["sampling_seed"] for r in done["scores"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"is not a result this command wrote ({type(e).__name__}: {e})"
    wanted = (args.steps, args.samples, args.sampling_steps, list(args.sampling_seeds))
    if budget != wanted:
        return (f"holds a run of --steps {budget[0]} --samples {budget[1]} --sampling-steps {budget[2]} --sampling-seeds "
                f"{','.join(map(str, budget[3]))}, not this command's")
    return None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ARMS.update(_arms())
    p = argparse.ArgumentParser(prog="python -m benchmarks.diffusion_quality", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--arms", default="classic,modern,ddpm", help=f"comma-separated, from: {', '.join(ARMS)}; "
                   f"an @FIELD=VALUE suffix (several allowed) changes the training recipe, FIELD one of {', '.join(RECIPE_FIELDS)}")
    p.add_argument("--train-seeds", type=_ints, default=[0, 1, 2], help="training seeds (default 0,1,2)")
    p.add_argument("--sampling-seeds", type=_ints, default=[0, 1, 2], help="sampling seeds per trained network (default 0,1,2)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: the CPU preset's 1500)")
    p.add_argument("--samples", type=int, default=500, help="images scored per sampling seed (default 500, as the main job)")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps, eta 1 (default 50, as the main job)")
    p.add_argument("--reference", default=None, help="where denoising-diffusion-pytorch is (default: the installed package; "
                   "or a wheel, an unpacked wheel, a site-packages folder)")
    p.add_argument("--out", type=Path, default=Path("results/quality"), help="folder of the per-run JSON files")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: run several processes instead)")
    p.add_argument("--table", type=Path, metavar="FOLDER", help="print the table of the results in FOLDER and stop")
    args = p.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms:
        p.error(f"--arms: give at least one of {', '.join(ARMS)}")
    chosen = {}
    for name in arms:
        try:
            chosen[name] = arm(name)
        except ValueError as e:
            p.error(f"--arms: {e}")
    for name in ("steps", "threads", "sampling_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.samples < 2:
        p.error(f"--samples must be at least 2 (a Fréchet distance needs a covariance), got {args.samples}")
    if args.sampling_steps >= 1000:
        p.error(f"--sampling-steps must be below the 1000 training timesteps (DDIM), got {args.sampling_steps}")
    if not args.train_seeds or not args.sampling_seeds or min(args.train_seeds + args.sampling_seeds) < 0:
        p.error("--train-seeds and --sampling-seeds must be non-empty lists of non-negative integers")
    if any(a.reference for a in chosen.values()):
        from benchmarks.reference_unet import ReferenceUnavailable, version

        try:
            ddpm_version = version(args.reference)
        except ReferenceUnavailable as e:
            p.error(f"--arms ddpm: {e}")
        print(f"denoising-diffusion-pytorch {ddpm_version}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    from examples.diffusion.data import draw_shapes
    from examples.diffusion.quality import JUDGE_STEPS, train_judge
    from examples.diffusion.train_plan import SHAPES_TRAIN_SEED

    cfg = config(0, args.steps)
    data, _ = draw_shapes(cfg.train_size, cfg.image_size, cfg.channels, torch.Generator().manual_seed(SHAPES_TRAIN_SEED))
    judge = None
    for seed in args.train_seeds:
        for name in arms:
            target = args.out / f"{name}-seed{seed}.json"
            if target.exists():
                problem = _different_budget(target, args)
                if problem:
                    p.error(f"{target} {problem}: give another --out, or delete the file to redo it")
                continue
            if judge is None:
                judge, accuracy = train_judge(cfg.image_size, cfg.channels, "cpu", steps=JUDGE_STEPS)
                print(f"judge trained (accuracy {accuracy:.3f})")
            print(f"{name}, training seed {seed}:", flush=True)
            result = train_and_score(chosen[name], seed, args.sampling_seeds, steps=args.steps, judge=judge, data=data,
                                     reference_path=args.reference, samples=args.samples, sampling_steps=args.sampling_steps,
                                     log=lambda s: print(s, flush=True))
            if chosen[name].reference:
                result["reference_version"] = ddpm_version
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, target)
    print(table(args.out, arms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
