"""Training images: procedurally drawn shapes (embedded, no download) or a folder of images.

:func:`draw_shapes` renders labelled, anti-aliased shapes (disk, square, triangle,
cross, ring) of random size, position and brightness (grayscale) or colour (RGB) on
a black background, deterministically from a ``torch.Generator``. The labels feed
the sample-quality judge (:mod:`.quality`). :func:`load_image_folder` reads every
image in a folder with Pillow (any format it reads), refusing malformed files and
decompression bombs by name, and centre-crops and resizes them.

>>> import torch
>>> x, y = draw_shapes(4, image_size=16, channels=1, generator=torch.Generator().manual_seed(0))
>>> x.shape, y.shape, bool(x.min() >= 0), bool(x.max() <= 1)
(torch.Size([4, 1, 16, 16]), torch.Size([4]), True, True)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .png_data import png_data_problem

__all__ = [
    "SHAPES",
    "MIN_SHAPES_SIZE",
    "draw_shapes",
    "BadImageError",
    "image_extensions",
    "pixel_limit",
    "read_image",
    "list_image_files",
    "ImageFolder",
    "load_image_folder",
    "BatchOrder",
]

SHAPES = ("disk", "square", "triangle", "cross", "ring")
MIN_SHAPES_SIZE = 4  # the smallest image side draw_shapes renders


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
    if image_size < MIN_SHAPES_SIZE:
        raise ValueError(f"draw_shapes: image_size must be at least {MIN_SHAPES_SIZE}, got {image_size}")
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
DEFAULT_PIXEL_LIMIT = 89_478_485  # Pillow's own default Image.MAX_IMAGE_PIXELS (a 0.25 GB 8-bit RGB image)


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file and says why."""


#: The extensions the empty-folder message names first.
COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# formats Pillow only identifies: decoding them needs a handler installed by the application (or Windows)
_IDENTIFY_ONLY = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "WMF"})


def image_extensions() -> tuple[str, ...]:
    """The file extensions of every format this Pillow can read (``.png``, ``.jpg``, ``.webp``, ``.tif`` ...)."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in _IDENTIFY_ONLY))


def pixel_limit() -> int:
    """The largest image, in pixels, that is decoded: Pillow's decompression-bomb limit, never off."""
    limit = Image.MAX_IMAGE_PIXELS
    return DEFAULT_PIXEL_LIMIT if limit is None else int(limit)


def _png_palette_problem(im: "Image.Image") -> Optional[str]:
    """Why a (loaded) palette PNG is malformed: a PLTE that is not whole RGB entries, or a pixel past its end."""
    raw = im.palette.palette if im.palette is not None else b""
    if len(raw) % 3:
        return f"its palette (PLTE) holds {len(raw)} bytes, not a whole number of RGB entries (a short palette)"
    entries = len(raw) // 3
    highest = im.getextrema()[1]
    if highest >= entries:
        return f"a pixel uses palette index {highest}, past the end of its {entries}-entry palette"
    return None


def _to_mode(im: "Image.Image", channels: int) -> "Image.Image":
    """``im`` as 8-bit ``L`` (``channels`` 1) or ``RGB`` (3); alpha is dropped, 16-bit values scaled to 8 bits."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = im.convert("I").point(lambda v: v * (1 / 257)).convert("L")  # 16-bit gray: 65535 -> 255
    return im.convert("L" if channels == 1 else "RGB")


def read_image(path: Union[str, os.PathLike], image_size: int, channels: int) -> Tensor:
    """The image at ``path`` centre-cropped to a square and resized to ``image_size``:
    ``[channels, image_size, image_size]`` float in ``[0, 1]``.

    Read with Pillow (any format it reads). Refused with a :class:`BadImageError` naming the
    file: a declared size over :func:`pixel_limit` (checked from the header, before any pixel
    is decoded), a file Pillow cannot identify or decode, a truncated file, a PNG whose chunk
    CRCs do not match (``verify``), a PNG whose image data is shorter or longer than its header
    declares (:func:`~.png_data.png_data_problem`), a palette PNG with a short palette or a pixel
    past its palette. Memory: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least
    ``image_size`` (``Image.draft``); the crop and resize run in Pillow on 8-bit pixels (reducing
    in integer steps first), so only the ``image_size`` result becomes a float tensor.
    """
    path = Path(path)
    limit = pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > limit:
                    raise BadImageError(f"{path} declares {width}x{height} pixels, over the decompression-bomb limit of {limit}")
                if width < 1 or height < 1:
                    raise BadImageError(f"{path} declares an empty image ({width}x{height})")
                fmt = im.format
                if fmt == "PNG":
                    im.verify()  # every chunk's CRC and the structure, without decoding
            if fmt == "PNG":
                problem = png_data_problem(path)  # Pillow decodes a short image data stream as black rows
                if problem:
                    raise BadImageError(f"{path}: {problem}")
            with Image.open(path) as im:
                side = min(width, height)
                if fmt == "JPEG":
                    im.draft("L" if channels == 1 else "RGB", (-(-image_size * width // side), -(-image_size * height // side)))
                im.load()
                if fmt == "PNG" and im.mode == "P":
                    problem = _png_palette_problem(im)
                    if problem:
                        raise BadImageError(f"{path}: {problem}")
                im = _to_mode(im, channels)
                w, h = im.size  # after draft
                s = min(w, h)
                left, top = (w - s) / 2, (h - s) / 2
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s), reducing_gap=2.0)
                data = bytearray(im.tobytes())
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{path} is refused before decoding, a possible decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(f"{path} is not an image Pillow can read (unknown format, or its header is damaged)") from None
    except MemoryError:
        raise BadImageError(f"{path} needs more memory to decode than this machine has") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error ... on bad files
        raise BadImageError(f"{path} cannot be decoded: {e or type(e).__name__}") from None
    x = torch.frombuffer(data, dtype=torch.uint8).reshape(image_size, image_size, channels)
    return x.permute(2, 0, 1).float() / 255.0


class ImageFolder(NamedTuple):
    """:func:`load_image_folder`'s result: the images, and the files skipped with their reasons."""

    images: Tensor
    skipped: list[str]


def list_image_files(path: Union[str, os.PathLike]) -> list[Path]:
    """Every file under ``path`` (recursively, not following links to folders, sorted) whose extension Pillow reads."""
    exts = set(image_extensions())
    files = []
    for folder, _, names in os.walk(path):
        for name in names:
            f = Path(folder) / name
            if f.suffix.lower() in exts and f.is_file():
                files.append(f)
    return sorted(files)


def load_image_folder(
    path: Union[str, os.PathLike],
    image_size: int,
    channels: int,
    *,
    skip_bad: bool = False,
    on_file: Optional[Callable[[], None]] = None,
) -> ImageFolder:
    """Every image under ``path`` (:func:`list_image_files`) read by :func:`read_image`:
    ``images [N, channels, image_size, image_size]`` in ``[0, 1]``.

    A file that cannot be used is a :class:`BadImageError` naming it; with ``skip_bad`` it is
    left out instead and its message listed in ``skipped``. ``FileNotFoundError`` when ``path``
    is not a folder; ``ValueError`` when it holds no (usable) images. ``on_file()`` is called
    after each file (a progress display).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir: {str(path)!r} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 or 3, got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"load_image_folder: image_size must be a positive integer, got {image_size!r}")
    files = list_image_files(root)
    if not files:
        known = image_extensions()
        common = [e for e in COMMON_EXTENSIONS if e in known]
        raise ValueError(f"--data-dir: no images under {str(path)!r} (files ending in {', '.join(common)}, or one of the "
                         f"{len(known) - len(common)} other extensions Pillow reads)")
    out = torch.empty(len(files), channels, image_size, image_size)
    kept, skipped = 0, []
    for f in files:
        try:
            out[kept] = read_image(f, image_size, channels)
            kept += 1
        except BadImageError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
        if on_file is not None:
            on_file()
    if kept == 0:
        raise ValueError(f"--data-dir: none of the {len(files)} image files under {str(path)!r} could be read (first: {skipped[0]})")
    return ImageFolder(out[:kept].clone() if kept < len(files) else out, skipped)


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
