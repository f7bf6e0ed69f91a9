"""An ensemble of spectrally normalised MLPs trained at once with ``torch.func.vmap``.

``N`` members, each initialised from its own generator and fed its own data order,
live in one stacked ``(params, state)`` (every leaf has a leading member dim) and are
trained by one ``torch.optim.Adam`` over the stacked tensors: Adam is elementwise, so
this is exactly ``N`` independent Adams. Spectral norm runs in training mode under
``vmap`` (torch's own cannot: its power iteration writes with ``out=``). Member ``k``
of the vmapped run equals a solo run of member ``k`` with the same seeds; the run
checks that, times a vmapped step against a Python loop of ``N`` modules with
``torch.nn.utils.parametrizations.spectral_norm`` (one Adam each), and scores the
ensemble on two interleaved spirals.

Run from the repository root::

    python -m examples.ensemble                      # about 15 s on 2 CPU cores
    python -m examples.ensemble --members 4 --steps 20 --timing-budget 1 --timing-repeats 2   # smoke test

Each run writes a new folder ``<--results-dir>/<YYYY-mm-dd_HH-MM-SS>_<N>members/`` (default
``--results-dir results/ensemble``; a previous run is never overwritten) with ``metrics.json`` and
``ensemble.png``. Progress (loss, time left) goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pfunc as pf
from benchmarks.timing import measure
from examples import arguments as A
from examples.atomic import write_atomically
from examples.busy_machine import busy_machine_advice
from examples.plots import save_map
from examples.progress import progress
from examples.run_folder import run_in_new_folder
from pfunc.parametrizations import SpectralNorm
from pfunc.spectral import spectral_norm_spec

__all__ = [
    "spirals",
    "mlp",
    "spectral_mlp",
    "batch_order",
    "init_members",
    "train_ensemble",
    "train_solo",
    "torch_twins",
    "compare_speed",
    "far_points",
    "evaluate",
    "max_abs_diff",
    "save_decision_map",
    "main",
]

Tree = dict  # dict[str, Tensor]


def spirals(n: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved spirals: ``(x (n, 2), label (n,))`` with labels 0/1, radius up to 1."""
    label = torch.randint(0, 2, (n,), generator=generator)
    t = torch.rand(n, generator=generator) ** 0.5 * 2.5 * math.pi + 0.3
    angle = t + math.pi * label
    r = t / (2.8 * math.pi)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)
    return x + noise * torch.randn(n, 2, generator=generator), label.float()


def mlp(hidden: int, depth: int = 3) -> nn.Sequential:
    """``2 -> hidden -> ... -> 1`` with ReLU, ``depth`` linear layers."""
    sizes = [2] + [hidden] * (depth - 1)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 1))


def _hidden_layers(module: nn.Sequential) -> Callable[[str, nn.Module, Tensor], bool]:
    last = str(len(module) - 1)
    return lambda name, layer, t: t.ndim >= 2 and not name.startswith(last + ".")


def spectral_mlp(hidden: int, depth: int = 3, scale: float = 8.0) -> tuple[pf.Parametrized, nn.Sequential]:
    """The MLP with torch's spectral norm on every hidden weight (the readout stays free, so the
    logit scale can grow), inputs multiplied by ``scale`` first. Returns ``(net, module)``."""
    module = nn.Sequential(_Scale(scale), *mlp(hidden, depth))
    return pf.parametrize(module, spectral_norm_spec(module, SpectralNorm(), include=_hidden_layers(module))), module


class _Scale(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def batch_order(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless minibatch indices ``(batch,)``: a fresh permutation of ``range(n)`` per epoch."""
    if batch > n:
        raise ValueError(f"batch_order: batch ({batch}) is larger than the data ({n})")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def init_members(net: pf.Parametrized, seed: int, members: int) -> tuple[Tree, Tree]:
    """Stacked ``(params, state)``; member ``k`` is initialised from generator ``seed + k`` alone.

    The stacked params are made leaves (``torch.optim`` refuses the outputs of ``torch.stack``).
    """
    params, state = pf.ensemble.init(net, pf.ensemble.generators(seed, members))
    return {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}, state


def _loss(net: pf.Parametrized, p: Tree, s: Tree, x: Tensor, y: Tensor) -> tuple[Tensor, Tree]:
    logits, s = net(p, s, x, training=True)
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y), s


def train_ensemble(
    net: pf.Parametrized,
    data: tuple[Tensor, Tensor],
    members: int,
    steps: int,
    batch: int,
    lr: float,
    init_seed: int,
    data_seed: int,
    on_step: Callable[[Tensor], None] = lambda losses: None,
) -> tuple[Tree, Tree, Tensor]:
    """``members`` models trained together: one vmapped forward/backward and one Adam step per step.

    Returns the stacked ``(params, state)`` and the losses ``(steps, members)``. ``on_step(losses)``
    gets each step's ``(members,)`` losses (a progress bar).
    """
    x, y = data
    params, state = init_members(net, init_seed, members)
    orders = [batch_order(len(x), batch, g) for g in pf.ensemble.generators(data_seed, members)]
    opt = torch.optim.Adam(params.values(), lr=lr)
    # one vmapped forward, one backward of the summed member losses: member k's gradient is its own
    step = pf.ensemble.grad_and_value(lambda p, s, xb, yb: _loss(net, p, s, xb, yb), has_aux=True)
    history = []
    for _ in range(steps):
        idx = torch.stack([next(o) for o in orders])  # (members, batch)
        grads, (losses, state) = step(params, state, x[idx], y[idx])
        _set_grads(params, grads)
        opt.step()
        history.append(losses)
        on_step(history[-1])
    return params, state, torch.stack(history)


def _set_grads(params: Tree, grads: Tree) -> None:
    """Hand functional gradients to a torch optimizer over ``params.values()``."""
    for k, p in params.items():
        p.grad = grads[k]


def train_solo(
    net: pf.Parametrized,
    data: tuple[Tensor, Tensor],
    member: int,
    steps: int,
    batch: int,
    lr: float,
    init_seed: int,
    data_seed: int,
) -> tuple[Tree, Tree, Tensor]:
    """Member ``member`` alone, without vmap: same generators as in :func:`train_ensemble`."""
    x, y = data
    params, state = pf.ensemble.member(init_members(net, init_seed + member, 1), 0)
    params = {k: v.detach().requires_grad_(v.requires_grad) for k, v in params.items()}
    order = batch_order(len(x), batch, pf.ensemble.generators(data_seed + member, 1)[0])
    opt = torch.optim.Adam(params.values(), lr=lr)
    step = pf.grad_and_value(lambda p, s, xb, yb: _loss(net, p, s, xb, yb), has_aux=True)
    history = []
    for _ in range(steps):
        idx = next(order)
        grads, (loss, state) = step(params, state, x[idx], y[idx])
        _set_grads(params, grads)
        opt.step()
        history.append(loss)
    return params, state, torch.stack(history)


def torch_twins(net: pf.Parametrized, params: Tree, state: Tree) -> list[nn.Module]:
    """Every member as its own module parametrized in place by torch (``spectral_norm``), same values."""
    return [pf.to_torch(net, p, s) for p, s in zip(pf.tree.unstack(params), pf.tree.unstack(state))]


def compare_speed(
    net: pf.Parametrized,
    data: tuple[Tensor, Tensor],
    members: int,
    batch: int,
    lr: float,
    seed: int,
    budget_s: float = 5.0,
    min_repeats: int = 5,
) -> dict:
    """Seconds of one training step of all members (medians of interleaved rounds, see
    :func:`benchmarks.timing.measure`): pfunc vmapped vs a Python loop of torch modules."""
    x, y = data
    params, state = init_members(net, seed, members)
    twins = torch_twins(net, params, state)
    for m in twins:
        m.train()
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in twins]
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (members, batch), generator=g)
    xb, yb = x[idx], y[idx]
    step = pf.ensemble.grad_and_value(lambda p, s, a, b: _loss(net, p, s, a, b), has_aux=True)
    box = {"state": state}

    def vmapped_step():
        grads, (_, box["state"]) = step(params, box["state"], xb, yb)
        _set_grads(params, grads)
        opt.step()

    def torch_loop_step():
        for k, (m, o) in enumerate(zip(twins, opts)):
            loss = F.binary_cross_entropy_with_logits(m(xb[k]).squeeze(-1), yb[k])
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    timing = measure({"vmapped": vmapped_step, "torch_loop": torch_loop_step}, budget_s=budget_s, min_repeats=min_repeats, warmup=2)
    return {
        "vmapped_seconds_per_step": timing.medians["vmapped"],
        "torch_loop_seconds_per_step": timing.medians["torch_loop"],
        "speedup": timing.ratio("torch_loop", "vmapped"),
        "repeats": timing.repeats,
        "iqr_fraction": {name: timing.iqr_fraction(name) for name in ("vmapped", "torch_loop")},
    }


def max_abs_diff(a: Tree, b: Tree) -> float:
    """Largest ``|a[k] - b[k]|`` over the keys of two trees with the same keys."""
    if a.keys() != b.keys():
        raise KeyError(f"max_abs_diff: different keys: {sorted(a.keys() ^ b.keys())}")
    return max((float((a[k].detach() - b[k].detach()).abs().max()) for k in a), default=0.0)


def far_points(n: int, generator: torch.Generator, radius: tuple[float, float] = (2.0, 4.0)) -> Tensor:
    """``(n, 2)`` points on an annulus well outside the spirals (which reach radius 1)."""
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    r = radius[0] + (radius[1] - radius[0]) * torch.rand(n, generator=generator)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)


def evaluate(net: pf.Parametrized, params: Tree, state: Tree, data: tuple[Tensor, Tensor], far: Tensor) -> dict:
    """Eval-mode scores: test accuracy of each member and of the ensemble (mean probability), and
    the members' disagreement (std of their probabilities, averaged) on the test data and on ``far``."""
    x, y = data

    def probabilities(inputs):
        with torch.no_grad():
            logits, _ = pf.ensemble.call(net, params, state, inputs, training=False)
        return torch.sigmoid(logits.squeeze(-1))  # (members, n)

    probs = probabilities(x)
    member_acc = ((probs > 0.5).float() == y).float().mean(dim=1)
    ensemble_acc = ((probs.mean(0) > 0.5).float() == y).float().mean()
    return {
        "member_accuracy_mean": float(member_acc.mean()),
        "member_accuracy_min": float(member_acc.min()),
        "member_accuracy_max": float(member_acc.max()),
        "ensemble_accuracy": float(ensemble_acc),
        "disagreement_test": float(probs.std(dim=0).mean()),
        "disagreement_far": float(probabilities(far).std(dim=0).mean()),
    }


def save_decision_map(path: Path, net: pf.Parametrized, params: Tree, state: Tree, data: tuple[Tensor, Tensor], n: int = 96) -> None:
    """The ensemble's mean probability of class 1 over an ``n x n`` grid as colours, the grid
    points where the members disagree (std of their probabilities > 0.05) hatched, and the
    training points on top (class 0 white, class 1 black; the legend below the map and the colour
    bar beside it, off the data)."""
    lim = 1.3
    axis = torch.linspace(-lim, lim, n)
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")  # row i: y = axis[i]; column j: x = axis[j]
    grid = torch.stack([gx.flatten(), gy.flatten()], dim=-1)
    with torch.no_grad():
        logits, _ = pf.ensemble.call(net, params, state, grid, training=False)
    probs = torch.sigmoid(logits.squeeze(-1))  # (members, n*n)
    mean, spread = probs.mean(0).reshape(n, n), probs.std(0).reshape(n, n)
    x, y = data
    save_map(
        path,
        mean,
        extent=(-lim, lim, -lim, lim),
        title=f"{probs.shape[0]} spectrally normalised MLPs, trained in one vmap",
        colorbar_label="ensemble's mean P(class 1)",
        vmin=0.0,
        vmax=1.0,
        region=spread > 0.05,
        region_label="members disagree (std > 0.05)",
        points={"training data, class 0": x[y == 0], "training data, class 1": x[y == 1]},
        point_colors=["white", "black"],
    )


def _parser() -> argparse.ArgumentParser:
    p = A.ArgumentParser(prog="python -m examples.ensemble", description=__doc__.split("\n")[0])
    p.add_argument("--members", type=A.positive_int, default=16, help="models in the ensemble")
    p.add_argument("--hidden", type=A.positive_int, default=64, help="MLP width")
    p.add_argument("--steps", type=A.positive_int, default=2000, help="training steps of the ensemble")
    p.add_argument("--batch", type=A.positive_int, default=64, help="points per batch (at most --train-size)")
    p.add_argument("--lr", type=A.positive_float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--train-size", type=A.positive_int, default=512, help="training points")
    p.add_argument("--noise", type=A.non_negative_float, default=0.05, help="std of the noise on the spirals")
    p.add_argument("--check-member", type=A.non_negative_int, default=3, help="member re-trained alone to check equality")
    p.add_argument("--check-steps", type=A.positive_int, default=50, help="steps of the equality check")
    p.add_argument("--timing-budget", type=A.positive_float, default=10.0, help="seconds for the timing comparison")
    p.add_argument("--timing-repeats", type=A.positive_int, default=5, help="at least this many timed rounds (medians)")
    p.add_argument("--threads", type=A.positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 avoids oversubscription on a busy machine)")
    p.add_argument("--seed", type=A.seed, default=0, help="member k is initialised from seed + k")
    p.add_argument("--data-seed", type=A.seed, default=1000, help="member k's data order comes from data_seed + k")
    p.add_argument("--results-dir", default="results/ensemble",
                   help="parent of the run folder <YYYY-mm-dd_HH-MM-SS>_<N>members (default results/ensemble)")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    """The command line: check equality, time, train, score, write. Returns the metrics (with
    ``"run_folder"`` and the losses). Bad flags exit with status 2, an unusable results folder
    with 1, Ctrl-C with 130 (a run folder with nothing in it yet is removed), each with one line."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.check_member >= args.members:
        parser.error(f"argument --check-member: must be below --members ({args.members}), got {args.check_member}")
    if args.batch > args.train_size:
        parser.error(f"argument --batch: must be at most --train-size ({args.train_size}), got {args.batch}")
    return run_in_new_folder(args.results_dir, f"{args.members}members", lambda out: _run(args, out))


def _run(args: argparse.Namespace, out: Path) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    advice = busy_machine_advice(args.threads)
    if advice:
        print(advice, file=sys.stderr)
    print(f"run folder: {out}")
    g = torch.Generator().manual_seed(12345)
    train_data = spirals(args.train_size, args.noise, g)
    test_data = spirals(4096, args.noise, g)
    net, _ = spectral_mlp(args.hidden)

    # 1. member k of the vmapped run == member k trained alone
    k, n = args.check_member, args.check_steps
    p_ens, s_ens, _ = train_ensemble(net, train_data, args.members, n, args.batch, args.lr, args.seed, args.data_seed)
    p_solo, s_solo, _ = train_solo(net, train_data, k, n, args.batch, args.lr, args.seed, args.data_seed)
    diff_params = max_abs_diff(pf.ensemble.member(p_ens, k), p_solo)
    diff_state = max_abs_diff(pf.ensemble.member(s_ens, k), s_solo)
    print(f"member {k} after {n} steps, vmapped vs alone: max|params diff| {diff_params:.2e}, max|state diff| {diff_state:.2e}")

    # 2. speed: one vmapped step vs a loop of N torch spectral_norm modules
    print(f"timing one training step both ways (~{args.timing_budget:g} s)...", file=sys.stderr)
    speed = compare_speed(
        net, train_data, args.members, args.batch, args.lr, args.seed, args.timing_budget, args.timing_repeats
    )
    print(f"{args.members} members, one training step: vmapped pfunc {1e3 * speed['vmapped_seconds_per_step']:.2f} ms, "
          f"loop of torch modules {1e3 * speed['torch_loop_seconds_per_step']:.2f} ms -> {speed['speedup']:.1f}x "
          f"(medians of {speed['repeats']} interleaved rounds)")

    # 3. train the ensemble
    t0 = time.perf_counter()
    with progress(args.steps, desc=f"ensemble of {args.members}", unit="step", log_every=max(1, args.steps // 10)) as bar:
        params, state, losses = train_ensemble(net, train_data, args.members, args.steps, args.batch, args.lr, args.seed,
                                               args.data_seed, on_step=lambda step_losses: bar.update(loss=float(step_losses.mean())))
    seconds = time.perf_counter() - t0
    scores = evaluate(net, params, state, test_data, far_points(4096, g))
    print(f"trained {args.members} members x {args.steps} steps in {seconds:.1f}s; test accuracy: members "
          f"{scores['member_accuracy_mean']:.3f} (min {scores['member_accuracy_min']:.3f}, max {scores['member_accuracy_max']:.3f}), "
          f"ensemble {scores['ensemble_accuracy']:.3f}; members disagree by {scores['disagreement_test']:.3f} on test data, "
          f"{scores['disagreement_far']:.3f} far from it (std of their probabilities)")
    metrics = {
        "equality": {"member": k, "steps": n, "max_abs_diff_params": diff_params, "max_abs_diff_state": diff_state},
        "speed": speed,
        "accuracy": scores,
        "train_seconds": seconds,
        "args": {key: str(v) for key, v in vars(args).items()},
    }
    write_atomically(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()), what="ensemble")
    save_decision_map(out / "ensemble.png", net, params, state, train_data)
    print(f"wrote metrics.json and ensemble.png in {out}")
    return {**metrics, "losses": losses, "run_folder": str(out)}


if __name__ == "__main__":
    main()
