"""Figures with matplotlib (the Agg renderer, no pyplot): line plots, 2-D scatter plots, and maps over a plane.

Every figure has real text and axes, its legend outside the axes (it never covers data), a fixed
size in pixels, and is written atomically (a reader never sees half a file, a failed write leaves a
previous file in place). No figure is registered with pyplot, so none is left open.

>>> import os, tempfile, torch
>>> d = tempfile.mkdtemp()
>>> save_line_plot(os.path.join(d, "loss.png"), {"loss": [1.0, 0.5, 0.3]}, title="training loss", log_y=True)
>>> save_scatter(os.path.join(d, "points.png"), {"samples": torch.randn(100, 2)}, title="samples")
>>> save_map(os.path.join(d, "map.png"), torch.rand(20, 30), extent=(0.0, 3.0, 0.0, 2.0), title="a field")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib
import matplotlib.colors
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from examples.atomic import write_atomically

__all__ = ["save_line_plot", "save_scatter", "save_map"]

PathLike = Union[str, os.PathLike]
Bounds = tuple[float, float, float, float]

DPI = 100
# Okabe-Ito: distinct for colour-blind readers, and none of them close to white.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


def save_line_plot(
    path: PathLike,
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    log_y: bool = False,
    x: Optional[Sequence[float]] = None,
    size: tuple[int, int] = (900, 500),
) -> None:
    """Plot each ``series[name]`` as a line, against ``x`` (default ``0, 1, 2...``), with a legend.

    All series share ``x`` when it is given (each then has ``len(x)`` values). NaN and infinite
    values are left out (a gap in the line), and so are values <= 0 when ``log_y``. ``size`` is
    ``(width, height)`` in pixels. Raises ``ValueError`` when there is nothing to plot or the
    lengths disagree, ``OSError`` when the file cannot be written.
    """
    fmt = _format_of(path, "save_line_plot")
    if not isinstance(series, Mapping) or not series:
        raise ValueError("save_line_plot: series must be a non-empty mapping of name -> list of numbers")
    curves = {}
    for name, ys in series.items():
        if not isinstance(name, str):
            raise ValueError(f"save_line_plot: series names must be strings, got {name!r}")
        values = _numbers(ys, f"save_line_plot: series {name!r}")
        if x is not None and len(values) != len(x):
            raise ValueError(f"save_line_plot: series {name!r} has {len(values)} values but x has {len(x)}")
        curves[name] = [v if math.isfinite(v) and (v > 0 or not log_y) else math.nan for v in values]
    xs = _numbers(x, "save_line_plot: x") if x is not None else None
    if not any(math.isfinite(v) for ys in curves.values() for v in ys):
        raise ValueError(f"save_line_plot: no finite{' positive' if log_y else ''} values to plot in {list(series)}")
    fig, ax = _figure(size)
    for k, (name, ys) in enumerate(curves.items()):
        at = xs if xs is not None else list(range(len(ys)))
        lone = [i for i, v in enumerate(ys) if math.isfinite(v) and not _finite_neighbour(ys, i)]
        ax.plot(at, ys, color=COLORS[k % len(COLORS)], linewidth=1.5, label=_text(name),
                marker="o" if lone else None, markevery=lone or None, markersize=3)
    if log_y:
        ax.set_yscale("log")
    _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)
    _save(fig, path, fmt, "save_line_plot")


def save_scatter(
    path: PathLike,
    points: Mapping[str, Tensor],
    *,
    title: str,
    bounds: Optional[Bounds] = None,
    xlabel: str = "x",
    ylabel: str = "y",
    marker_size: float = 4.0,
    size: tuple[int, int] = (800, 640),
) -> None:
    """Scatter plot of labelled point sets ``{name: [N_i, 2]}``, each in its own colour, equal axes.

    ``bounds = (xmin, xmax, ymin, ymax)``; by default the data's range plus 5%. Rows with a NaN or
    infinite coordinate are left out. ``marker_size`` is matplotlib's ``s`` (points squared).
    Raises ``ValueError`` for a set that is not ``[N, 2]`` or when no finite point is left.
    """
    fmt = _format_of(path, "save_scatter")
    sets = _point_sets(points, "save_scatter")
    if not any(len(p) for p in sets.values()):
        raise ValueError(f"save_scatter: no finite points to plot in {list(points)}")
    limits = _bounds(bounds, sets, "save_scatter")
    fig, ax = _figure(size)
    for k, (name, p) in enumerate(sets.items()):
        ax.scatter(p[:, 0], p[:, 1], s=marker_size, color=COLORS[k % len(COLORS)], label=_text(name),
                   linewidths=0, alpha=0.8)
    ax.set_xlim(limits[0], limits[1])
    ax.set_ylim(limits[2], limits[3])
    ax.set_aspect("equal", adjustable="box")
    _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel, markerscale=max(1.0, 24 / marker_size) ** 0.5)
    _save(fig, path, fmt, "save_scatter")


def save_map(
    path: PathLike,
    values: Tensor,
    *,
    extent: Bounds,
    title: str,
    colorbar_label: str = "",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "RdBu_r",
    region: Optional[Tensor] = None,
    region_label: str = "",
    points: Optional[Mapping[str, Tensor]] = None,
    point_colors: Optional[Sequence[str]] = None,
    xlabel: str = "x",
    ylabel: str = "y",
    size: tuple[int, int] = (800, 760),
) -> None:
    """A field over a rectangle: ``values`` (``[ny, nx]``, row ``i`` at the ``i``-th y from the
    bottom, column ``j`` at the ``j``-th x from the left) as colours with a colour bar.

    ``extent = (xmin, xmax, ymin, ymax)`` is the rectangle the grid spans. ``region``, a boolean
    ``[ny, nx]`` mask, is hatched and outlined (with ``region_label`` in the legend), and
    ``points`` (``{name: [N, 2]}``) are drawn on top, each set in its own colour (``point_colors``,
    matplotlib colour names, one per set; by default colours that stand out on ``RdBu_r``) with a black
    edge. The legend goes below the map, the colour bar beside it.
    NaN values are left blank. Raises ``ValueError`` for mismatched shapes or a bad extent.
    """
    fmt = _format_of(path, "save_map")
    if not isinstance(values, Tensor) or values.dim() != 2 or min(values.shape) < 2:
        got = f"shape {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"save_map: values must be a [ny, nx] tensor with ny, nx >= 2, got {got}")
    z = values.detach().to("cpu", torch.float64)
    z = torch.where(torch.isfinite(z), z, torch.full_like(z, math.nan))
    if not bool(torch.isfinite(z).any()):
        raise ValueError("save_map: values hold no finite number")
    xmin, xmax, ymin, ymax = _check_bounds(extent, "save_map: extent")
    if region is not None and (not isinstance(region, Tensor) or region.shape != values.shape):
        got = f"shape {tuple(region.shape)}" if isinstance(region, Tensor) else type(region).__name__
        raise ValueError(f"save_map: region must be a boolean mask of values' shape {tuple(values.shape)}, got {got}")
    sets = _point_sets(points, "save_map") if points is not None else {}
    colors = list(point_colors) if point_colors is not None else [COLORS[(k + 4) % len(COLORS)] for k in range(len(sets))]
    if len(colors) != len(sets) or not all(matplotlib.colors.is_color_like(c) for c in colors):
        raise ValueError(f"save_map: point_colors must be {len(sets)} matplotlib colours, one per point set, got {point_colors!r}")
    fig, ax = _figure(size)
    ny, nx = z.shape
    gx = torch.linspace(xmin, xmax, nx).tolist()
    gy = torch.linspace(ymin, ymax, ny).tolist()
    mesh = ax.pcolormesh(gx, gy, z.tolist(), shading="nearest", cmap=cmap, vmin=vmin, vmax=vmax, rasterized=True)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.02)
    if colorbar_label:
        bar.set_label(_text(colorbar_label))
    handles = []
    if region is not None and bool(region.any()):
        mask = region.detach().to("cpu", torch.float64).tolist()
        ax.contourf(gx, gy, mask, levels=[0.5, 1.5], colors="none", hatches=["...."])
        ax.contour(gx, gy, mask, levels=[0.5], colors="black", linewidths=1.0)
        handles.append(Patch(facecolor="none", edgecolor="black", hatch="....", label=_text(region_label or "region")))
    for k, (name, p) in enumerate(sets.items()):
        handles.append(ax.scatter(p[:, 0], p[:, 1], s=14, color=colors[k], edgecolors="black",
                                  linewidths=0.6, label=_text(name)))
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_aspect("equal", adjustable="box")
    _finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel, handles=handles, below=True, markerscale=1.5)
    _save(fig, path, fmt, "save_map")


# ------------------------------------------------------------------------------ shared pieces
def _figure(size: tuple[int, int]) -> tuple[Figure, "matplotlib.axes.Axes"]:
    if (not isinstance(size, tuple) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and 64 <= s <= 8000 for s in size)):
        raise ValueError(f"size must be (width, height) in pixels, each an integer in [64, 8000], got {size!r}")
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, ax, *, title: str, xlabel: str, ylabel: str, handles=None, markerscale: float = 1.0,
            below: bool = False) -> None:
    for name, text in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {text!r}")
    ax.set_title(_text(title))
    ax.set_xlabel(_text(xlabel))
    ax.set_ylabel(_text(ylabel))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if handles:  # outside the axes, on the right (or below): it never covers data
        fig.legend(handles=handles, loc="outside lower center" if below else "outside right upper", frameon=False,
                   markerscale=markerscale, ncols=min(len(handles), 3) if below else 1)


def _save(fig: Figure, path: PathLike, fmt: str, what: str) -> None:
    write_atomically(path, lambda f: fig.savefig(f, format=fmt, dpi=DPI), what=what)


def _format_of(path: PathLike, what: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    supported = FigureCanvasAgg.get_supported_filetypes()
    if ext not in supported:
        raise ValueError(f"{what}: cannot tell a figure format from the name {Path(path).name!r}; "
                         f"end it in one of {', '.join('.' + e for e in sorted(supported))}")
    return ext


def _text(s: str) -> str:
    """``s`` shown as written: a ``$`` would otherwise start matplotlib's maths mode (and can fail)."""
    return str(s).replace("$", r"\$")


def _numbers(values: object, what: str) -> list[float]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().flatten().tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{what} must be a sequence of numbers, got {type(values).__name__}")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold only numbers") from None


def _finite_neighbour(ys: list[float], i: int) -> bool:
    return any(0 <= j < len(ys) and math.isfinite(ys[j]) for j in (i - 1, i + 1))


def _point_sets(points: object, what: str) -> dict[str, Tensor]:
    if not isinstance(points, Mapping) or not points:
        raise ValueError(f"{what}: points must be a non-empty mapping of name -> [N, 2] tensor")
    sets = {}
    for name, p in points.items():
        if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != 2 or p.is_complex():
            got = f"shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"{what}: points {name!r} must be a real [N, 2] tensor, got {got}")
        p = p.detach().to("cpu", torch.float64)
        sets[str(name)] = p[torch.isfinite(p).all(dim=1)]
    return sets


def _bounds(bounds: Optional[Bounds], sets: dict[str, Tensor], what: str) -> Bounds:
    if bounds is not None:
        return _check_bounds(bounds, f"{what}: bounds")
    allp = torch.cat([p for p in sets.values() if len(p)])
    lo, hi = allp.min(0).values.tolist(), allp.max(0).values.tolist()
    pad_x, pad_y = (hi[0] - lo[0]) * 0.05 or 0.5, (hi[1] - lo[1]) * 0.05 or 0.5
    return lo[0] - pad_x, hi[0] + pad_x, lo[1] - pad_y, hi[1] + pad_y


def _check_bounds(bounds: object, what: str) -> Bounds:
    try:
        xmin, xmax, ymin, ymax = (float(b) for b in bounds)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be four numbers (xmin, xmax, ymin, ymax), got {bounds!r}") from None
    if not all(math.isfinite(b) for b in (xmin, xmax, ymin, ymax)) or not (xmin < xmax and ymin < ymax):
        raise ValueError(f"{what} must be finite with xmin < xmax and ymin < ymax, got {bounds!r}")
    return xmin, xmax, ymin, ymax
