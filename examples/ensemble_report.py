"""Scoring and writing an ensemble run: accuracy and disagreement, the decision map, the files.

:func:`evaluate` scores the members and their mean in eval mode, and how much they disagree on the
test data and on points far from it (:func:`far_points`); :func:`save_decision_map` draws the
ensemble's mean probability with the region where members disagree; :func:`write_results` writes a
run folder's ``metrics.json``, ``members.pt`` and ``ensemble.png``. Used by ``python -m
examples.ensemble`` in one process, and by rank 0 after it gathered every member under torchrun.

>>> far = far_points(3, __import__("torch").Generator().manual_seed(0))
>>> far.shape, bool((far.norm(dim=1) >= 2).all())
(torch.Size([3, 2]), True)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

import pfunc as pf
from examples.atomic import write_atomically
from examples.plots import save_map

__all__ = ["far_points", "evaluate", "save_decision_map", "write_results"]

Tree = dict  # dict[str, Tensor]


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


def write_results(out: Path, net: pf.Parametrized, params: Tree, state: Tree, losses: Tensor, train_data: tuple[Tensor, Tensor],
                  metrics: dict) -> None:
    """Print the scores and write ``metrics.json``, ``ensemble.png`` and ``members.pt`` (every member's final
    ``params`` and ``state``, stacked, and the ``losses`` ``(steps, members)``) in the run folder ``out``."""
    scores, members, steps = metrics["accuracy"], losses.shape[1], losses.shape[0]
    print(f"trained {members} members x {steps} steps in {metrics['train_seconds']:.1f}s; test accuracy: members "
          f"{scores['member_accuracy_mean']:.3f} (min {scores['member_accuracy_min']:.3f}, max {scores['member_accuracy_max']:.3f}), "
          f"ensemble {scores['ensemble_accuracy']:.3f}; members disagree by {scores['disagreement_test']:.3f} on test data, "
          f"{scores['disagreement_far']:.3f} far from it (std of their probabilities)")
    write_atomically(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()), what="ensemble")
    trained = {"params": {k: v.detach() for k, v in params.items()}, "state": state, "losses": losses}
    write_atomically(out / "members.pt", lambda f: torch.save(trained, f), what="ensemble")
    save_decision_map(out / "ensemble.png", net, params, state, train_data)
    print(f"wrote metrics.json, members.pt and ensemble.png in {out}")
