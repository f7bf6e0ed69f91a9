"""What the GAN is trained on: the data, the two networks sized for it, and how samples are scored.

* :func:`mixture_task`: a 2-D mixture of Gaussians (``ring8``, ``grid25``), labelled by
  mode; MLP networks; scored by mode coverage and the fraction of high-quality
  samples (:mod:`.metrics`); samples plotted as a scatter (matplotlib).
* :func:`shapes_task`: the procedurally drawn shapes of the diffusion example
  (:func:`examples.diffusion.data.draw_shapes`, five labelled classes); conv networks;
  scored by the diffusion example's shape judge (Fréchet classifier distance with
  its real/noise brackets, fraction recognised, fraction of the asked-for class);
  samples saved as an image grid, one row per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from examples.diffusion.data import SHAPES, draw_shapes
from examples.diffusion.quality import evaluate_shapes, train_judge
from examples.images import save_image_grid
from examples.plots import save_scatter

from .data import mixture
from .metrics import mode_coverage
from .models import ConvDiscriminator, ConvGenerator, MLPDiscriminator, MLPGenerator

__all__ = ["Task", "mixture_task", "shapes_task"]

Labels = Optional[Tensor]


@dataclass(frozen=True)
class Task:
    """A data set with matching networks and scores.

    ``draw_real(n, generator) -> (x, labels or None)`` gives training batches in the
    generator's output range; ``score(x, labels)`` is a quick JSON-ready score used at
    log points, ``final_score`` the full one; ``describe(scores)`` is one line of text;
    ``save_samples(path, x, labels, title)`` writes a PNG (image grids: 8 per row, so
    labels ``arange(classes).repeat_interleave(8)`` give one row per class).
    """

    name: str
    generator: nn.Module
    discriminator: nn.Module
    z_dim: int
    num_classes: int
    draw_real: Callable[[int, torch.Generator], tuple[Tensor, Labels]]
    score: Callable[[Tensor, Labels], dict]
    final_score: Callable[[Tensor, Labels], dict]
    describe: Callable[[dict], str]
    save_samples: Callable[[Path, Tensor, Labels, str], None]


def mixture_task(name: str, *, conditional: bool, z_dim: int, hidden: int, min_count: int, seed: int) -> Task:
    """The 2-D mixture ``name`` (``"ring8"`` or ``"grid25"``); classes are the modes when ``conditional``."""
    mog = mixture(name)
    classes = mog.num_modes if conditional else 0

    def draw_real(n, g):
        x, y = mog.sample(n, g)
        return x, (y if conditional else None)

    def score(x, y):
        return mode_coverage(x.cpu(), mog, None if y is None else y.cpu(), min_count=min_count).as_dict()

    def describe(s):
        on = "" if s["on_label"] is None else f", on the asked-for mode {s['on_label']:.3f}"
        return (f"modes hit {s['modes_hit']}/{s['num_modes']} (>= {min_count} high-quality samples each), "
                f"high-quality {s['high_quality']:.3f} (within 3 std of a mode){on}")

    def save(path, x, y, title):
        real, _ = mog.sample(x.shape[0], torch.Generator().manual_seed(seed))
        save_scatter(path, {"data": real, "generated": x.cpu()}, title=title, marker_size=3)

    return Task(name, MLPGenerator(z_dim, hidden, classes), MLPDiscriminator(hidden, classes), z_dim, classes,
                draw_real, score, score, describe, save)


def shapes_task(
    *,
    image_size: int,
    channels: int,
    conditional: bool,
    z_dim: int,
    width: int,
    train_size: int,
    judge_steps: int,
    seed: int,
    device: torch.device,
) -> Task:
    """The diffusion example's shapes (``train_size`` images drawn once from ``seed``), scaled to ``[-1, 1]``."""
    images, labels = draw_shapes(train_size, image_size, channels, torch.Generator().manual_seed(seed))
    images = images * 2 - 1
    classes = len(SHAPES) if conditional else 0
    # the judge sees 128 images a step: draw no more training images than it can see (8192 at most, its default)
    judge, judge_accuracy = train_judge(image_size, channels, device, steps=judge_steps,
                                        train_size=min(8192, 128 * judge_steps))

    def draw_real(n, g):
        idx = torch.randint(0, train_size, (n,), generator=g)
        return images[idx], (labels[idx] if conditional else None)

    def score(x, y):
        """Recognised fraction (judge confidence > 0.9) and fraction judged the asked-for class."""
        with torch.no_grad():
            _, logits = judge(((x + 1) / 2).clamp(0, 1).to(device))
        probs = logits.softmax(-1).cpu()
        recognised = float((probs.max(1).values > 0.9).float().mean())
        on_label = None if y is None else float((probs.argmax(1) == y.cpu()).float().mean())
        return {"recognised": recognised, "on_label": on_label}

    def final_score(x, y):
        scores = score(x, y)
        real, real_labels = draw_shapes(x.shape[0], image_size, channels, torch.Generator().manual_seed(seed + 1))
        brackets = evaluate_shapes(((x.cpu() + 1) / 2).clamp(0, 1), image_size, channels, device, judge=judge)
        return {
            **scores,
            "recognised_real_data": score(real * 2 - 1, real_labels)["recognised"],
            "fcd": brackets["samples"]["fcd"],
            "fcd_real_data": brackets["real"]["fcd"],
            "fcd_noise": brackets["noise"]["fcd"],
            "judge_accuracy": judge_accuracy,
            "brackets": brackets,
        }

    def describe(s):
        on = "" if s["on_label"] is None else f", judged the asked-for class {s['on_label']:.3f}"
        text = f"recognised {s['recognised']:.3f}{on}"
        if "fcd" in s:
            text = (f"FCD {s['fcd']:.2f} (real data {s['fcd_real_data']:.2f}, noise {s['fcd_noise']:.2f}); {text} "
                    f"(real data: recognised {s['recognised_real_data']:.3f}, judged its class {s['judge_accuracy']:.3f})")
        return text

    def save(path, x, y, title):
        save_image_grid(path, ((x.cpu() + 1) / 2).clamp(0, 1), nrow=8, scale=3)

    return Task("shapes", ConvGenerator(z_dim, width, classes, channels, image_size),
                ConvDiscriminator(width, classes, channels, image_size), z_dim, classes,
                draw_real, score, final_score, describe, save)
