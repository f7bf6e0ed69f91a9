"""Training images: procedurally drawn shapes (embedded, no download) or a folder of images.

:func:`draw_shapes` renders labelled, anti-aliased shapes (disk, square, triangle,
cross, ring) of random size, position and brightness (grayscale) or colour (RGB) on
a black background, deterministically from a ``torch.Generator``. The labels feed
the sample-quality judge (:mod:`.quality`). :func:`load_image_folder` reads every
image in a folder (PNG with the built-in decoder; other formats when pillow is
installed), centre-crops and resizes them.

>>> import torch
>>> x, y = draw_shapes(4, image_size=16, channels=1, generator=torch.Generator().manual_seed(0))
>>> x.shape, y.shape, bool(x.min() >= 0), bool(x.max() <= 1)
(torch.Size([4, 1, 16, 16]), torch.Size([4]), True, True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .png import read_png

__all__ = ["SHAPES", "draw_shapes", "load_image_folder", "IMAGE_EXTENSIONS", "BatchOrder"]

SHAPES = ("disk", "square", "triangle", "cross", "ring")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``[N]`` hue, saturation, value in ``[0, 1]`` -> ``[N, 3]`` RGB."""
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6.0) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=-1)


def _shape_mask(kind: int, cx: Tensor, cy: Tensor, r: Tensor, u: Tensor) -> Tensor:
    """Coverage ``[N, R, R]`` in {0, 1} of shape ``SHAPES[kind]`` on the grid ``u`` (pixel centres in [0, 1])."""
    x = u[None, None, :] - cx[:, None, None]
    y = u[None, :, None] - cy[:, None, None]
    r = r[:, None, None]
    ax, ay = x.abs(), y.abs()
    if kind == 0:  # disk
        mask = x * x + y * y <= r * r
    elif kind == 1:  # square
        mask = torch.maximum(ax, ay) <= 0.8 * r
    elif kind == 2:  # upright isosceles triangle, apex up
        top, base = -r, 0.75 * r
        mask = (y >= top) & (y <= base) & (ax <= (y - top) / (base - top) * 0.95 * r)
    elif kind == 3:  # cross
        arm = 0.3 * r
        mask = ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    else:  # ring
        d2 = x * x + y * y
        mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    return mask.float()


def draw_shapes(
    n: int,
    image_size: int,
    channels: int,
    generator: torch.Generator,
    *,
    supersample: int = 4,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``(images [n, channels, S, S] in [0, 1], labels [n])``: random shapes from :data:`SHAPES`.

    Each image holds one shape (class uniform), radius 22-42% of the image, placed
    fully inside, anti-aliased by ``supersample``-times supersampling. Grayscale
    shapes have brightness in ``[0.55, 1]``; RGB shapes a random hue, saturation in
    ``[0.6, 1]`` and value in ``[0.7, 1]``. Deterministic given ``generator``'s state.
    """
    if n < 0:
        raise ValueError(f"draw_shapes: n must be non-negative, got {n}")
    if image_size < 4:
        raise ValueError(f"draw_shapes: image_size must be at least 4, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"draw_shapes: channels must be 1 or 3, got {channels}")
    g = generator
    label = torch.randint(0, len(SHAPES), (n,), generator=g)
    r = 0.22 + 0.20 * torch.rand(n, generator=g)
    margin = r + 0.5 / image_size
    cx = margin + (1 - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (1 - 2 * margin) * torch.rand(n, generator=g)
    if channels == 1:
        color = (0.55 + 0.45 * torch.rand(n, generator=g))[:, None]
    else:
        hsv = torch.rand(n, 3, generator=g)
        color = _hsv_to_rgb(hsv[:, 0], 0.6 + 0.4 * hsv[:, 1], 0.7 + 0.3 * hsv[:, 2])
    res = image_size * supersample
    u = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    images = torch.empty(n, channels, image_size, image_size)
    for kind in range(len(SHAPES)):
        members = (label == kind).nonzero().flatten()
        for start in range(0, members.numel(), chunk):
            idx = members[start : start + chunk]
            cover = F.avg_pool2d(_shape_mask(kind, cx[idx], cy[idx], r[idx], u)[:, None], supersample)
            images[idx] = cover * color[idx][:, :, None, None]
    return images, label


# ------------------------------------------------------------------------------ a folder of images
def _read_image(path: Path) -> Tensor:
    """``[C, H, W]`` float in [0, 1] (C = 1, 2, 3 or 4 as stored)."""
    if path.suffix.lower() == ".png":
        return read_png(path)
    try:
        from PIL import Image  # optional: only for formats the built-in PNG decoder does not read
    except ImportError:
        raise ValueError(
            f"cannot read {path}: only PNG is built in; install pillow for {path.suffix} files or convert them to PNG"
        ) from None
    with Image.open(path) as im:
        im = im.convert("RGB")
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return data.reshape(im.height, im.width, 3).permute(2, 0, 1).float() / 255.0


def _to_channels(img: Tensor, channels: int) -> Tensor:
    c = img.shape[0]
    if c in (2, 4):  # drop alpha
        img, c = img[: c - 1], c - 1
    if c == channels:
        return img
    if channels == 3:
        return img.expand(3, *img.shape[1:])
    weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]  # ITU-R 601 luma
    return (img * weights).sum(0, keepdim=True)


def _center_crop_resize(img: Tensor, size: int) -> Tensor:
    _, h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top : top + s, left : left + s]
    if s != size:
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return img.clamp(0, 1)


def load_image_folder(path: Union[str, os.PathLike], image_size: int, channels: int) -> Tensor:
    """Every image under ``path`` (recursively, sorted by path), centre-cropped to a square and
    resized to ``image_size``, as ``[N, channels, image_size, image_size]`` in ``[0, 1]``.

    Raises ``FileNotFoundError`` when ``path`` is not a folder, ``ValueError`` when it
    holds no images or a file cannot be decoded (naming the file).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir: {str(path)!r} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 or 3, got {channels}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"--data-dir: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(path)!r}")
    out = torch.empty(len(files), channels, image_size, image_size)
    for i, f in enumerate(files):
        try:
            img = _read_image(f)
        except ValueError as e:
            raise ValueError(f"--data-dir: cannot decode {f}: {e}") from None
        out[i] = _center_crop_resize(_to_channels(img, channels), image_size)
    return out


# ------------------------------------------------------------------------------ batch order
class BatchOrder:
    """Indices of the next batch: shuffled epochs (a fresh permutation each epoch, remainder dropped).

    All randomness comes from ``generator``; :meth:`state_dict` / :meth:`load_state_dict`
    save and restore it (generator state, current permutation, position) so a resumed
    run draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, num_examples: int, batch_size: int, generator: torch.Generator):
        if batch_size > num_examples:
            raise ValueError(f"batch size {batch_size} is larger than the data set ({num_examples} images)")
        self.num_examples, self.batch_size, self.generator = num_examples, batch_size, generator
        self.perm = torch.randperm(num_examples, generator=generator)
        self.pos = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def next(self) -> Tensor:
        """The next ``[batch_size]`` indices."""
        if self.pos + self.batch_size > self.num_examples:
            self.perm = torch.randperm(self.num_examples, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        if sd["perm"].shape != (self.num_examples,):
            raise ValueError(
                f"the checkpoint's data order covers {sd['perm'].shape[0]} images, the data set has {self.num_examples}"
            )
        self.generator.set_state(sd["generator"])
        self.perm = sd["perm"].clone()
        self.pos = int(sd["pos"])
