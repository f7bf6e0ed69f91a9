"""Sample quality for the shapes data: a Fréchet distance in a shape classifier's feature space.

The judge is a small CNN trained (deterministically, from a fixed seed independent
of the run's ``--seed``) to tell the five :data:`~.data.SHAPES` apart. Its
penultimate features stand in for Inception's in FID: the **Fréchet classifier
distance** (FCD) between generated images and held-out real images is low when the
samples look like the data in shape, size, placement and variety, and high when
they do not. Two brackets are computed with the same sample counts: ``real`` (fresh
real images against the same reference; the floor a perfect model reaches) and
``noise`` (images of ``N(0, 1)`` noise mapped to ``[0, 1]`` and clamped, what an
untrained model gives). Also reported: the histogram of the judge's classes (mode
coverage) and the RMS distance of each sample to its nearest held-out real image.

For a folder of images (no labels) only the nearest-neighbour distance to the
training images is available (:func:`nearest_neighbour_rms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import SHAPES, draw_shapes

__all__ = [
    "ShapeJudge",
    "train_judge",
    "frechet_distance",
    "nearest_neighbour_rms",
    "ShapeScores",
    "score_images",
    "evaluate_shapes",
    "evaluate_folder",
    "evaluate",
    "JUDGE_SEED",
    "JUDGE_STEPS",
]

JUDGE_SEED = 1234  # the judge and its reference data never depend on the run's --seed
JUDGE_STEPS = 400  # training steps of the judge that evaluate_shapes trains


class ShapeJudge(nn.Module):
    """A small CNN: ``[B, C, S, S]`` in ``[0, 1]`` -> ``(features [B, 128], logits [B, 5])``."""

    def __init__(self, channels: int, num_classes: int = len(SHAPES), feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),  # keeps coarse placement: 64 x 2 x 2
            nn.Flatten(),
            nn.Linear(256, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.body(x)
        return f, self.head(f)


def train_judge(
    image_size: int,
    channels: int,
    device: torch.device | str = "cpu",
    *,
    steps: int = JUDGE_STEPS,
    batch_size: int = 128,
    train_size: int = 8192,
    on_step: Optional[Callable[[], None]] = None,
) -> tuple[ShapeJudge, float]:
    """A trained :class:`ShapeJudge` and its accuracy on 2048 fresh images.

    Trained with Adam on :func:`~.data.draw_shapes` images plus mild Gaussian pixel
    noise (so imperceptible noise in samples does not sway it), all from
    :data:`JUDGE_SEED`; the global RNG is left untouched. ``on_step()`` is called after
    each of the ``steps`` steps (a progress display).
    """
    g = torch.Generator().manual_seed(JUDGE_SEED)
    x, y = draw_shapes(train_size, image_size, channels, g)
    x_test, y_test = draw_shapes(2048, image_size, channels, g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(JUDGE_SEED)
        judge = ShapeJudge(channels)
    judge = judge.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, train_size, (batch_size,), generator=g).to(device)
        sigma = 0.05 * torch.rand(batch_size, 1, 1, 1, generator=g).to(device)
        noise = torch.randn(batch_size, channels, image_size, image_size, generator=g).to(device)
        _, logits = judge((x[idx] + sigma * noise).clamp(0, 1))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    judge.eval()
    with torch.no_grad():
        _, logits = judge(x_test.to(device))
        accuracy = (logits.argmax(1).cpu() == y_test).float().mean().item()
    return judge, accuracy


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, in float64 with
    symmetric eigendecompositions (no scipy).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance: need [N, D] and [M, D] with N, M >= 2; got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    d = a.shape[1]
    cov_a, cov_b = torch.cov(a.T).reshape(d, d), torch.cov(b.T).reshape(d, d)
    ev, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = (vecs * ev.clamp(min=0).sqrt()) @ vecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


def nearest_neighbour_rms(samples: Tensor, reference: Tensor, *, exclude_self: bool = False, chunk: int = 256) -> float:
    """Mean over ``samples`` of the RMS pixel distance to the nearest image in ``reference``.

    ``exclude_self`` (when ``samples`` *is* ``reference``) skips the zero distance of
    each image to itself: a leave-one-out bracket for real data.
    """
    s, r = samples.flatten(1).float(), reference.flatten(1).float()
    best = []
    for start in range(0, s.shape[0], chunk):
        d = torch.cdist(s[start : start + chunk], r)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        best.append(d.min(dim=1).values)
    return float((torch.cat(best) / s.shape[1] ** 0.5).mean())


@dataclass(frozen=True)
class ShapeScores:
    """Scores of one image set against the reference set."""

    fcd: float
    class_counts: list[int]
    nn_rms: float

    def to_dict(self) -> dict:
        return {"fcd": self.fcd, "class_counts": self.class_counts, "nn_rms": self.nn_rms}


@torch.no_grad()
def _features(judge: ShapeJudge, images: Tensor, device: torch.device | str) -> tuple[Tensor, Tensor]:
    feats, probs = [], []
    for start in range(0, images.shape[0], 512):
        f, logits = judge(images[start : start + 512].to(device).float())
        feats.append(f.cpu())
        probs.append(logits.softmax(-1).cpu())
    return torch.cat(feats), torch.cat(probs)


def score_images(judge: ShapeJudge, images: Tensor, reference: Tensor, reference_features: Tensor, device: torch.device | str) -> ShapeScores:
    """FCD, class histogram and nearest-neighbour RMS of ``images`` (``[N, C, S, S]`` in [0, 1])."""
    feats, probs = _features(judge, images, device)
    return ShapeScores(
        fcd=frechet_distance(feats, reference_features),
        class_counts=torch.bincount(probs.argmax(dim=1), minlength=len(SHAPES)).tolist(),
        nn_rms=nearest_neighbour_rms(images.cpu(), reference),
    )


def evaluate_shapes(
    samples: Tensor,
    image_size: int,
    channels: int,
    device: torch.device | str = "cpu",
    *,
    reference_size: int = 2000,
    judge: Optional[ShapeJudge] = None,
    on_step: Optional[Callable[[], None]] = None,
) -> dict:
    """Scores of ``samples`` with the ``real`` and ``noise`` brackets, as a JSON-ready dict.

    ``{"samples": {...}, "real": {...}, "noise": {...}, "judge_accuracy": float, "n": N, "reference_size": R}``;
    each bracket uses as many images as ``samples``. Without a ``judge`` one is trained
    (:func:`train_judge`, which calls ``on_step()`` after each of its :data:`JUDGE_STEPS` steps).
    NaN or infinite samples are a ``ValueError`` (no distance is defined for them).
    """
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"evaluate_shapes: need at least 2 samples, got {n}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(f"evaluate_shapes: {int((~torch.isfinite(samples)).sum())} sample values are NaN or infinite")
    accuracy = None
    if judge is None:
        judge, accuracy = train_judge(image_size, channels, device, steps=JUDGE_STEPS, on_step=on_step)
    g = torch.Generator().manual_seed(JUDGE_SEED + 1)
    reference, _ = draw_shapes(reference_size, image_size, channels, g)
    real, _ = draw_shapes(n, image_size, channels, g)
    noise = ((torch.randn(n, channels, image_size, image_size, generator=g) + 1) / 2).clamp(0, 1)
    ref_feats, _ = _features(judge, reference, device)
    out = {
        name: score_images(judge, imgs, reference, ref_feats, device).to_dict()
        for name, imgs in (("samples", samples.cpu()), ("real", real), ("noise", noise))
    }
    out.update(judge_accuracy=accuracy, n=n, reference_size=reference_size, classes=list(SHAPES))
    return out


def evaluate_folder(samples: Tensor, reference: Tensor) -> dict:
    """Nearest-neighbour RMS of ``samples`` to ``reference`` (training images), with brackets.

    ``real``: each reference image to its nearest *other* reference image (leave one out);
    ``noise``: as many ``N(0, 1)`` noise images mapped to ``[0, 1]``. Lower is closer to the data
    (this measures fidelity, not diversity: a model that copies training images scores 0).
    """
    if samples.shape[0] < 1 or reference.shape[0] < 2:
        raise ValueError(f"evaluate_folder: need samples and at least 2 reference images, got {samples.shape[0]} and {reference.shape[0]}")
    g = torch.Generator().manual_seed(JUDGE_SEED + 2)
    noise = ((torch.randn(samples.shape, generator=g) + 1) / 2).clamp(0, 1)
    return {
        "samples": {"nn_rms": nearest_neighbour_rms(samples, reference)},
        "real": {"nn_rms": nearest_neighbour_rms(reference, reference, exclude_self=True)},
        "noise": {"nn_rms": nearest_neighbour_rms(noise, reference)},
        "n": samples.shape[0],
        "reference_size": reference.shape[0],
    }


def evaluate(
    samples: Tensor,
    *,
    dataset: str,
    image_size: int,
    channels: int,
    device: torch.device | str = "cpu",
    reference: Optional[Tensor] = None,
    on_step: Optional[Callable[[], None]] = None,
) -> dict:
    """The quality block of a run's ``metrics.json`` (and of a sample folder's JSON).

    ``dataset`` ``"shapes"``: ``{"metric": "fcd", **evaluate_shapes(...)}`` (``on_step`` follows the
    judge's training); ``"folder"``: ``{"metric": "nn_rms", **evaluate_folder(samples, reference[:2000])}``
    with ``reference`` the training images.
    """
    if dataset == "shapes":
        return {"metric": "fcd", **evaluate_shapes(samples, image_size, channels, device, on_step=on_step)}
    if reference is None:
        raise ValueError("evaluate: a folder data set is scored against its images: pass reference")
    return {"metric": "nn_rms", **evaluate_folder(samples, reference[:2000].cpu())}
