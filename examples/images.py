"""Image grids written with Pillow: ``[N, C, H, W]`` tensors in ``[0, 1]`` to one PNG (or any format Pillow saves).

>>> import os, tempfile, torch
>>> from PIL import Image
>>> path = os.path.join(tempfile.mkdtemp(), "grid.png")
>>> save_image_grid(path, torch.rand(6, 3, 8, 8), nrow=3, scale=2)
>>> Image.open(path).size                 # 3 columns, 2 rows of 16x16 images, 2 pixels of padding
(56, 38)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Union

import torch
from PIL import Image
from torch import Tensor

from examples.atomic import write_atomically

__all__ = ["save_image_grid"]


def save_image_grid(
    path: Union[str, os.PathLike],
    images: Tensor,
    *,
    nrow: int,
    scale: int = 1,
    padding: int = 2,
    pad_value: float = 1.0,
) -> None:
    """Save ``images`` (``[N, C, H, W]``, ``C`` 1 or 3, values in ``[0, 1]``) as one grid image.

    ``nrow`` images per row (as ``torchvision.utils.make_grid``), ``padding`` pixels between them
    and around them, filled with ``pad_value`` (white by default); each image is enlarged ``scale``
    times (nearest neighbour), which makes 8x8 samples readable. Values are clamped to ``[0, 1]``;
    NaN or infinite values are an error (a grid of black squares would hide a broken sampler).
    One channel is saved as grayscale, three as RGB. The format follows the extension of
    ``path`` (``.png``, ``.jpg``, ``.webp``...). The file is written atomically: a reader never
    sees half an image, and a failed write leaves a previous file in place.

    Raises ``ValueError`` (bad shapes, empty input, non-finite values, an unknown extension, a
    grid too large for Pillow to read back) and ``OSError`` (a missing or read-only folder).
    """
    path = Path(path)
    fmt = _format_of(path)
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"save_image_grid: images must be a [N, C, H, W] tensor, got {got}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_image_grid: images must have 1 or 3 channels (dim 1), got {c}")
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"save_image_grid: no pixels to save: images have shape {tuple(images.shape)}")
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"save_image_grid: images must be real numbers in [0, 1], got dtype {images.dtype}")
    for name, value, low in (("nrow", nrow, 1), ("scale", scale, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"save_image_grid: {name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(pad_value, (int, float)) and 0.0 <= float(pad_value) <= 1.0):
        raise ValueError(f"save_image_grid: pad_value must be a number in [0, 1], got {pad_value!r}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    height = rows * (h * scale + padding) + padding
    width = cols * (w * scale + padding) + padding
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(
            f"save_image_grid: a {width}x{height} grid is over Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels "
            f"(a decompression bomb to readers); save fewer images or a smaller scale"
        )
    x = images.detach().to("cpu", torch.float32)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"save_image_grid: images hold {bad} NaN or infinite values; nothing was written to {path}")
    x = x.clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = torch.full((c, height, width), float(pad_value))
    hs, ws = h * scale, w * scale
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (hs + padding), padding + q * (ws + padding)
        grid[:, top : top + hs, left : left + ws] = x[i]
    pixels = (grid * 255).round().to(torch.uint8)
    image = Image.fromarray((pixels[0] if c == 1 else pixels.permute(1, 2, 0)).numpy())  # uint8: L or RGB
    write_atomically(path, lambda f: image.save(f, format=fmt), what="save_image_grid")


def _format_of(path: Path) -> str:
    """Pillow's format name for the extension of ``path`` (one Pillow can write)."""
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(
            f"save_image_grid: cannot tell an image format Pillow writes from the name {path.name!r}; "
            f"end it in .png, .jpg, .webp or another extension Pillow saves"
        )
    return fmt
