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
    torchrun --nproc_per_node=2 -m examples.ensemble  # the members split over 2 processes

Each run writes a new folder ``<--results-dir>/<YYYY-mm-dd_HH-MM-SS>_<N>members/`` (default
``--results-dir results/ensemble``; a previous run is never overwritten) with ``metrics.json``,
``members.pt`` (the trained members and their losses) and ``ensemble.png``. Progress (loss, time
left) goes to standard error. Under torchrun each process vmaps its share of the members and
rank 0 writes (:mod:`examples.ensemble_split`); member ``k`` is the same wherever it trains.
"""

from __future__ import annotations

import argparse
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
from examples.threads import choose_threads
from examples.ensemble_report import evaluate, far_points, save_decision_map, write_results
from examples.progress import progress
from examples.run_folder import run_in_new_folder
from examples.torchrun import LaunchError, launch_from_env, silenced
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
    "write_results",
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
    with 1, Ctrl-C with 130 (a run folder with nothing in it yet is removed), each with one line.
    Under torchrun the members are split over the processes (:mod:`examples.ensemble_split`);
    rank 0 writes and returns the metrics, the other ranks return ``{}``."""
    parser = _parser()
    try:
        launch = launch_from_env()
    except LaunchError as e:
        parser.error(str(e))
    with silenced(launch is not None and not launch.is_writer):  # the same argv everywhere: rank 0 says what is wrong
        args = parser.parse_args(argv)
        if args.check_member >= args.members:
            parser.error(f"argument --check-member: must be below --members ({args.members}), got {args.check_member}")
        if args.batch > args.train_size:
            parser.error(f"argument --batch: must be at most --train-size ({args.train_size}), got {args.batch}")
        if launch is not None and args.members < launch.world_size:
            parser.error(f"argument --members: {args.members} members cannot be split over the {launch.world_size} processes "
                         f"torchrun started (each needs at least one): pass --members {launch.world_size} or more")
    if launch is not None:
        from examples.ensemble_split import run_split  # torchrun only

        return run_split(args, launch)
    return run_in_new_folder(args.results_dir, f"{args.members}members", lambda out: _run(args, out))


def _run(args: argparse.Namespace, out: Path) -> dict:
    note = choose_threads(args.threads)
    if note:
        print(note, file=sys.stderr)
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
    metrics = {
        "equality": {"member": k, "steps": n, "max_abs_diff_params": diff_params, "max_abs_diff_state": diff_state},
        "speed": speed,
        "accuracy": scores,
        "train_seconds": seconds,
        "args": {key: str(v) for key, v in vars(args).items()},
    }
    write_results(out, net, params, state, losses, train_data, metrics)
    return {**metrics, "losses": losses, "run_folder": str(out)}


if __name__ == "__main__":
    main()
