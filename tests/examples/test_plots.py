"""examples/plots.py: valid PNGs of the asked-for size, each series drawn in its colour, legends that
never cover the axes, non-finite data left out, and clear errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from examples import plots
from examples.plots import COLORS, save_line_plot, save_map, save_scatter


def _pixels(path) -> torch.Tensor:
    with Image.open(path) as im:
        im.verify()  # a complete, valid file
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.to(torch.int16).reshape(rgb.height, rgb.width, 3)


def _count(pixels: torch.Tensor, color: str, tol: int = 12, alpha: float = 1.0) -> int:
    """Pixels of ``color`` drawn with ``alpha`` on white."""
    target = torch.tensor([round(255 * (alpha * c + 1 - alpha)) for c in to_rgb(color)], dtype=torch.int16)
    return int(((pixels - target).abs().max(dim=-1).values <= tol).sum())


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save, kept for inspection after they are written."""
    kept = []
    save = plots._save

    def keep(fig, *args, **kwargs):
        kept.append(fig)
        save(fig, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _legend_clear_of_axes(fig) -> bool:
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    return not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def test_line_plot_is_a_png_of_the_asked_size_with_each_series_in_its_colour(tmp_path, figures):
    series = {"loss": [math.exp(-i / 30) for i in range(200)], "smoothed": [0.5] * 200}
    save_line_plot(tmp_path / "p.png", series, title="loss", ylabel="mse", log_y=True, size=(640, 400))
    px = _pixels(tmp_path / "p.png")
    assert px.shape == (400, 640, 3)
    assert _count(px, COLORS[0]) > 200 and _count(px, COLORS[1]) > 200
    ax = figures[0].axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ("loss", "step", "mse", "log")
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == ["loss", "smoothed"]
    assert _legend_clear_of_axes(figures[0])


def test_line_plot_takes_x_values_and_leaves_out_non_finite_and_non_positive_ones(tmp_path, figures):
    ys = [1.0, float("nan"), 0.0, -1.0, float("inf"), 2.0, 3.0]
    save_line_plot(tmp_path / "p.png", {"a": ys}, title="t", x=[10, 20, 30, 40, 50, 60, 70], log_y=True)
    line = figures[0].axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [10, 20, 30, 40, 50, 60, 70]
    finite = [y for y in line.get_ydata() if math.isfinite(y)]
    assert finite == [1.0, 2.0, 3.0]
    assert line.get_marker() == "o" and list(line.get_markevery()) == [0]  # the lone point stays visible


def test_text_is_shown_as_written_even_with_dollar_signs(tmp_path, figures):
    save_line_plot(tmp_path / "p.png", {"cost $x$ in $": [1.0, 2.0]}, title=r"$\notacommand", xlabel="$")
    assert figures[0].axes[0].get_title() == r"\$\notacommand"  # escaped: rendered literally, no maths mode
    assert _pixels(tmp_path / "p.png").shape == (500, 900, 3)


@pytest.mark.parametrize(
    "series, kwargs, message",
    [
        ({}, {}, "non-empty mapping"),
        ([1.0, 2.0], {}, "non-empty mapping"),
        ({"a": [float("nan"), float("inf")]}, {}, "no finite values"),
        ({"a": [0.0, -1.0]}, {"log_y": True}, "no finite positive values"),
        ({"a": "abc"}, {}, "series 'a' must be a sequence of numbers"),
        ({"a": [1.0, "x"]}, {}, "series 'a' must hold only numbers"),
        ({1: [1.0]}, {}, "names must be strings"),
        ({"a": [1.0, 2.0]}, {"x": [1.0]}, "has 2 values but x has 1"),
        ({"a": [1.0]}, {"size": (10, 10)}, r"size must be \(width, height\)"),
        ({"a": [1.0]}, {"title": None}, "title must be a string"),
    ],
)
def test_line_plot_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, series, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_line_plot(tmp_path / "p.png", series, **{"title": "t", **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_the_extension_must_name_a_figure_format(tmp_path):
    with pytest.raises(ValueError, match=r"'p.txt'.*\.png"):
        save_line_plot(tmp_path / "p.txt", {"a": [1.0]}, title="t")
    save_line_plot(tmp_path / "p.svg", {"a": [1.0, 2.0]}, title="t")
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_scatter_draws_each_set_skips_non_finite_rows_and_keeps_the_legend_off_the_data(tmp_path, figures):
    real = 0.5 * torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    pts = {"real": real, "fake": torch.tensor([[2.5, 2.5], [float("nan"), 1.0], [1.0, float("inf")]])}
    save_scatter(tmp_path / "s.png", pts, title="two", bounds=(-3, 3, -3, 3), marker_size=30)
    px = _pixels(tmp_path / "s.png")
    assert px.shape == (640, 800, 3)
    assert _count(px, COLORS[0], alpha=0.8) > 1000 and _count(px, COLORS[1], alpha=0.8) > 20
    ax = figures[0].axes[0]
    assert len(ax.collections[1].get_offsets()) == 1  # the two non-finite rows are left out
    assert (ax.get_xlim(), ax.get_ylim()) == ((-3.0, 3.0), (-3.0, 3.0))
    assert _legend_clear_of_axes(figures[0])


@pytest.mark.parametrize(
    "points, kwargs, message",
    [
        (torch.randn(5, 2), {}, "non-empty mapping"),
        ({}, {}, "non-empty mapping"),
        ({"a": torch.randn(5, 3)}, {}, r"points 'a' must be a real \[N, 2\] tensor, got shape \(5, 3\)"),
        ({"a": [[0.0, 1.0]]}, {}, "got list"),
        ({"a": torch.full((3, 2), float("nan"))}, {}, "no finite points"),
        ({"a": torch.randn(5, 2)}, {"bounds": (1, -1, 0, 1)}, "xmin < xmax"),
        ({"a": torch.randn(5, 2)}, {"bounds": (0, 1, 0, float("nan"))}, "finite"),
        ({"a": torch.randn(5, 2)}, {"bounds": (0, 1)}, "four numbers"),
    ],
)
def test_scatter_bad_input_is_a_clear_error(tmp_path, points, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_scatter(tmp_path / "s.png", points, title="t", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_map_colours_the_field_hatches_the_region_and_keeps_the_legend_off_the_data(tmp_path, figures):
    y, x = torch.meshgrid(torch.linspace(-1, 1, 30), torch.linspace(-1, 1, 40), indexing="ij")
    values = torch.sigmoid(4 * x)  # low on the left, high on the right
    save_map(tmp_path / "m.png", values, extent=(-1, 1, -1, 1), title="field", colorbar_label="P(class 1)",
             vmin=0, vmax=1, region=x.abs() < 0.2, region_label="members disagree",
             points={"class 0": torch.tensor([[-0.5, 0.0]]), "class 1": torch.tensor([[0.5, 0.0]])},
             point_colors=["black", "yellow"])
    px = _pixels(tmp_path / "m.png")
    assert px.shape == (760, 800, 3)
    fig = figures[0]
    ax = fig.axes[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["members disagree", "class 0", "class 1"]
    assert _legend_clear_of_axes(fig)
    assert fig.axes[1].get_ylabel() == "P(class 1)"  # the colour bar
    # left half blue, right half red (RdBu_r), read off the rendered axes
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    row = int(px.shape[0] - (box.y0 + box.y1) / 2)
    left, right = px[row, int(box.x0) + 5], px[row, int(box.x1) - 5]
    assert left[2] > left[0] + 50 and right[0] > right[2] + 50


@pytest.mark.parametrize(
    "values, kwargs, message",
    [
        (torch.rand(5), {}, r"\[ny, nx\] tensor"),
        (torch.rand(1, 5), {}, "ny, nx >= 2"),
        (torch.full((3, 3), float("nan")), {}, "no finite number"),
        (torch.rand(3, 3), {"extent": (0, 0, 0, 1)}, "xmin < xmax"),
        (torch.rand(3, 3), {"region": torch.ones(2, 3, dtype=torch.bool)}, "region must be a boolean mask"),
        (torch.rand(3, 3), {"points": {"a": torch.rand(2, 2)}, "point_colors": ["red", "blue"]}, "1 matplotlib colours"),
        (torch.rand(3, 3), {"points": {"a": torch.rand(2, 2)}, "point_colors": ["not-a-colour"]}, "matplotlib colours"),
    ],
)
def test_map_bad_input_is_a_clear_error(tmp_path, values, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_map(tmp_path / "m.png", values, title="t", **{"extent": (0, 1, 0, 1), **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_no_figure_is_left_open_in_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for i in range(3):
        save_line_plot(tmp_path / f"p{i}.png", {"a": [1.0, 2.0]}, title="t")
    assert plt.get_fignums() == before
