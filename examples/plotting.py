"""PNG figures with the standard library only: image grids, line plots, scatter plots.

No numpy, pillow or matplotlib: pixels are drawn into an RGB ``bytearray`` and written
as an 8-bit RGB PNG with ``zlib`` and ``struct``. Text (titles, tick labels, legends)
uses a built-in 5x7 bitmap font (upper-case letters, digits and common punctuation;
lower case is drawn as upper case).

>>> import torch, tempfile, os
>>> from examples.plotting import save_image_grid, save_line_plot, save_scatter
>>> d = tempfile.mkdtemp()
>>> save_image_grid(os.path.join(d, "grid.png"), torch.rand(6, 1, 8, 8), nrow=3)
>>> save_line_plot(os.path.join(d, "loss.png"), {"loss": [1.0, 0.5, 0.3]}, title="loss", log_y=True)
>>> save_scatter(os.path.join(d, "pts.png"), torch.randn(100, 2), title="samples")
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["write_png", "save_image_grid", "save_line_plot", "save_scatter"]

Color = tuple[int, int, int]

# Distinct, colour-blind friendly series colours (Okabe-Ito).
PALETTE: tuple[Color, ...] = (
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (0, 0, 0),
)


# ------------------------------------------------------------------------------ PNG encoding
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Union[str, os.PathLike], rgb: bytes, width: int, height: int) -> None:
    """Write ``rgb`` (``height`` rows of ``width`` RGB triples, row-major) as an 8-bit RGB PNG.

    The file is written to a temporary name in the same folder and moved into place,
    so a reader never sees half a PNG.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"write_png: width and height must be positive, got {width}x{height}")
    if len(rgb) != width * height * 3:
        raise ValueError(f"write_png: rgb has {len(rgb)} bytes, expected {width}*{height}*3 = {width * height * 3}")
    stride = width * 3
    raw = bytearray()
    for y in range(height):
        raw.append(0)  # filter type 0 (none) for every scanline
        raw += rgb[y * stride : (y + 1) * stride]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + _chunk(b"IEND", b"")
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ image grids
def save_image_grid(
    path: Union[str, os.PathLike],
    images: Tensor,
    nrow: int = 8,
    *,
    padding: int = 2,
    scale: int = 1,
    pad_value: float = 1.0,
) -> None:
    """Save ``images`` (``[N, C, H, W]``, values in ``[0, 1]``, ``C`` 1 or 3) as one PNG grid.

    ``nrow`` images per row (as ``torchvision.utils.make_grid``), ``padding`` pixels
    between them filled with ``pad_value``; each image is enlarged ``scale`` times
    (nearest neighbour), which makes 8x8 samples readable. Values are clamped to ``[0, 1]``.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"save_image_grid: images must be a [N, C, H, W] tensor, got {_shape_of(images)}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_image_grid: images must have 1 or 3 channels, got {c}")
    if n == 0:
        raise ValueError("save_image_grid: no images to save")
    if nrow < 1 or scale < 1 or padding < 0:
        raise ValueError(f"save_image_grid: need nrow >= 1, scale >= 1, padding >= 0; got {nrow}, {scale}, {padding}")
    x = images.detach().to("cpu", torch.float32).clamp(0, 1)
    if c == 1:
        x = x.expand(n, 3, h, w)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    H = rows * (h + padding) + padding
    W = cols * (w + padding) + padding
    grid = torch.full((3, H, W), float(pad_value))
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    write_png(path, bytes(pixels.flatten().tolist()), W, H)


def _shape_of(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


# ------------------------------------------------------------------------------ a tiny canvas
# 5x7 glyphs, one int per row, most significant of the 5 bits on the left.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0, 0, 0, 0, 0, 0, 0),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "[": (0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E),
    "]": (0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0),
    "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04),
}
_GLYPH_W, _GLYPH_H = 6, 7  # 5 pixels plus one of spacing


class _Canvas:
    """An RGB raster with the few drawing operations the plots need."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle with corners ``(x0, y0)`` and ``(x1, y1)``, both included."""
        for y in range(max(y0, 0), min(y1, self.height - 1) + 1):
            for x in range(max(x0, 0), min(x1, self.width - 1) + 1):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thickness: int = 1) -> None:
        """Bresenham's line, ``thickness`` pixels wide."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        r = thickness // 2
        while True:
            if thickness == 1:
                self.set(x0, y0, color)
            else:
                self.rect(x0 - r, y0 - r, x0 - r + thickness - 1, y0 - r + thickness - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), size: int = 1) -> None:
        """Draw ``s`` with its top-left corner at ``(x, y)``."""
        for k, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (0x10 >> col):
                        px, py = x + (k * _GLYPH_W + col) * size, y + row * size
                        self.rect(px, py, px + size - 1, py + size - 1, color)

    def save(self, path: Union[str, os.PathLike]) -> None:
        write_png(path, bytes(self.pixels), self.width, self.height)


def _text_width(s: str, size: int = 1) -> int:
    return len(s) * _GLYPH_W * size


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e7:
        return str(int(v))
    return f"{v:.3g}"


class _Axes:
    """Maps data coordinates into a plotting rectangle of a canvas, and draws the frame."""

    def __init__(self, canvas: _Canvas, box: tuple[int, int, int, int], xlim: tuple[float, float], ylim: tuple[float, float]):
        self.canvas = canvas
        self.left, self.top, self.right, self.bottom = box
        self.xlim = xlim if xlim[1] > xlim[0] else (xlim[0] - 0.5, xlim[0] + 0.5)
        self.ylim = ylim if ylim[1] > ylim[0] else (ylim[0] - 0.5, ylim[0] + 0.5)

    def px(self, x: float, y: float) -> tuple[int, int]:
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        u = self.left + (x - x0) / (x1 - x0) * (self.right - self.left)
        v = self.bottom - (y - y0) / (y1 - y0) * (self.bottom - self.top)
        return int(round(u)), int(round(v))

    def frame(self, xticks: Sequence[float], yticks: Sequence[float], ylabels: Optional[Sequence[str]] = None) -> None:
        c, grid, ink = self.canvas, (225, 225, 225), (0, 0, 0)
        for i, t in enumerate(yticks):
            _, v = self.px(self.xlim[0], t)
            if self.top <= v <= self.bottom:
                c.line(self.left, v, self.right, v, grid)
                label = ylabels[i] if ylabels is not None else _fmt(t)
                c.text(self.left - 4 - _text_width(label), v - 3, label, ink)
        for t in xticks:
            u, _ = self.px(t, self.ylim[0])
            if self.left <= u <= self.right:
                c.line(u, self.top, u, self.bottom, grid)
                label = _fmt(t)
                c.text(u - _text_width(label) // 2, self.bottom + 5, label, ink)
        c.line(self.left, self.top, self.left, self.bottom, ink)
        c.line(self.left, self.bottom, self.right, self.bottom, ink)
        c.line(self.right, self.top, self.right, self.bottom, ink)
        c.line(self.left, self.top, self.right, self.top, ink)


def _legend(canvas: _Canvas, labels: Sequence[str], x: int, y: int) -> None:
    for i, label in enumerate(labels):
        color = PALETTE[i % len(PALETTE)]
        canvas.rect(x, y + i * 12, x + 9, y + i * 12 + 6, color)
        canvas.text(x + 14, y + i * 12, label)


# ------------------------------------------------------------------------------ line plots
def save_line_plot(
    path: Union[str, os.PathLike],
    series: Mapping[str, Sequence[float]],
    title: str,
    log_y: bool = False,
    *,
    x_label: str = "step",
    width: int = 640,
    height: int = 400,
) -> None:
    """Plot each ``series[name]`` (y values at x = 0, 1, 2, ...) as a coloured line, with a legend.

    ``log_y`` uses a base-10 logarithmic y axis (non-positive values are skipped).
    Non-finite values are skipped. Raises ``ValueError`` when there is nothing to plot.
    """
    if not isinstance(series, Mapping) or not series:
        raise ValueError("save_line_plot: series must be a non-empty mapping of name -> list of numbers")
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, ys in series.items():
        pts = []
        for i, y in enumerate(ys):
            y = float(y)
            if not math.isfinite(y) or (log_y and y <= 0):
                continue
            pts.append((float(i), math.log10(y) if log_y else y))
        curves[name] = pts
    all_pts = [p for pts in curves.values() for p in pts]
    if not all_pts:
        raise ValueError(f"save_line_plot: no finite{' positive' if log_y else ''} values to plot in {list(series)}")
    xs = [p[0] for p in all_pts]
    ys = [p[1] for p in all_pts]
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or 0.5
    ylim = (ylo - pad, yhi + pad)
    xlim = (min(xs), max(max(xs), min(xs) + 1))
    canvas = _Canvas(width, height)
    axes = _Axes(canvas, (70, 30, width - 20, height - 40), xlim, ylim)
    if log_y:
        lo_dec, hi_dec = math.floor(ylim[0]), math.ceil(ylim[1])
        if hi_dec - lo_dec >= 2:
            yticks = [float(d) for d in range(lo_dec, hi_dec + 1)]
        else:  # less than two decades: round values between, placed on the log scale
            yticks = [math.log10(t) for t in _nice_ticks(10 ** ylim[0], 10 ** ylim[1]) if t > 0]
        labels = [_fmt(10**t) for t in yticks]
    else:
        yticks = _nice_ticks(*ylim)
        labels = None
    axes.frame(_nice_ticks(*xlim, target=6), yticks, labels)
    for k, pts in enumerate(curves.values()):
        color = PALETTE[k % len(PALETTE)]
        prev = None
        for x, y in pts:
            cur = axes.px(x, y)
            if prev is not None:
                canvas.line(*prev, *cur, color, thickness=2 if len(pts) < width else 1)
            elif len(pts) == 1:
                canvas.rect(cur[0] - 1, cur[1] - 1, cur[0] + 1, cur[1] + 1, color)
            prev = cur
    canvas.text((width - _text_width(title, 2)) // 2, 8, title, size=2)
    canvas.text((width - _text_width(x_label)) // 2, height - 14, x_label)
    _legend(canvas, list(curves), width - 20 - 14 - max(_text_width(n) for n in curves) - 6, 36)
    canvas.save(path)


# ------------------------------------------------------------------------------ scatter plots
def save_scatter(
    path: Union[str, os.PathLike],
    points: Union[Tensor, Mapping[str, Tensor]],
    title: str = "",
    *,
    bounds: Optional[tuple[float, float, float, float]] = None,
    size: int = 480,
    marker: int = 2,
) -> None:
    """Scatter plot of ``points`` (``[N, 2]``), or of several labelled sets ``{name: [N_i, 2]}``.

    Each set gets its own colour (and a legend when named). ``bounds`` =
    ``(xmin, xmax, ymin, ymax)``; by default the data's range plus 5%. ``marker``
    is the side of each dot in pixels.
    """
    sets = {"": points} if isinstance(points, Tensor) else dict(points)
    if not sets:
        raise ValueError("save_scatter: no point sets given")
    for name, p in sets.items():
        if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != 2:
            raise ValueError(f"save_scatter: points{f' {name!r}' if name else ''} must be [N, 2], got {_shape_of(p)}")
    clean = {n: p.detach().to("cpu", torch.float64) for n, p in sets.items()}
    clean = {n: p[torch.isfinite(p).all(dim=1)] for n, p in clean.items()}
    if bounds is None:
        allp = torch.cat(list(clean.values()))
        if allp.numel() == 0:
            raise ValueError("save_scatter: no finite points to plot")
        lo, hi = allp.min(0).values.tolist(), allp.max(0).values.tolist()
        px_, py_ = (hi[0] - lo[0]) * 0.05 or 0.5, (hi[1] - lo[1]) * 0.05 or 0.5
        bounds = (lo[0] - px_, hi[0] + px_, lo[1] - py_, hi[1] + py_)
    xmin, xmax, ymin, ymax = bounds
    canvas = _Canvas(size + 90, size + 70)
    axes = _Axes(canvas, (70, 30, 70 + size, 30 + size), (xmin, xmax), (ymin, ymax))
    axes.frame(_nice_ticks(xmin, xmax), _nice_ticks(ymin, ymax))
    r = marker // 2
    for k, p in enumerate(clean.values()):
        color = PALETTE[k % len(PALETTE)]
        for x, y in p.tolist():
            if xmin <= x <= xmax and ymin <= y <= ymax:
                u, v = axes.px(x, y)
                canvas.rect(u - r, v - r, u - r + marker - 1, v - r + marker - 1, color)
    if title:
        canvas.text((canvas.width - _text_width(title, 2)) // 2, 8, title, size=2)
    if any(clean):
        _legend(canvas, list(clean), 80, 36)
    canvas.save(path)
