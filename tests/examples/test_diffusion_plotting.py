"""examples/plotting.py: valid PNGs (checked by decoding them), grids placed pixel-exactly, plots
that draw their series, clear errors for bad input."""

import math

import pytest
import torch

from examples.diffusion.png import read_png
from examples.plotting import save_image_grid, save_line_plot, save_scatter, write_png


def test_write_png_round_trips_pixels(tmp_path):
    rgb = bytes(range(2 * 3 * 3))
    write_png(tmp_path / "x.png", rgb, 3, 2)
    back = (read_png(tmp_path / "x.png") * 255).round().to(torch.uint8)
    assert bytes(back.permute(1, 2, 0).flatten().tolist()) == rgb
    with pytest.raises(ValueError, match="expected"):
        write_png(tmp_path / "y.png", b"\x00" * 5, 3, 2)


def test_image_grid_places_each_image_with_padding_and_scale(tmp_path):
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0)])
    save_image_grid(tmp_path / "g.png", images, nrow=2, padding=1, scale=2, pad_value=0.25)
    g = read_png(tmp_path / "g.png")
    assert g.shape == (3, 2 * (4 + 1) + 1, 2 * (4 + 1) + 1)  # two rows, two columns
    assert g[0, 1:5, 1:5].eq(0).all() and g[0, 1:5, 6:10].sub(128 / 255).abs().max() < 1e-6
    assert g[0, 6:10, 1:5].eq(1).all()
    assert g[0, 0, 0].item() == pytest.approx(64 / 255)  # padding
    assert g[0, 6:10, 6:10].sub(64 / 255).abs().max() < 1e-6  # the empty fourth slot is padding


def test_image_grid_refuses_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        save_image_grid(tmp_path / "g.png", torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        save_image_grid(tmp_path / "g.png", torch.rand(2, 2, 8, 8))


def test_line_plot_draws_each_series_in_its_own_colour(tmp_path):
    series = {"loss": [math.exp(-i / 30) for i in range(200)], "smoothed": [0.5] * 200}
    save_line_plot(tmp_path / "p.png", series, title="loss", log_y=True)
    img = (read_png(tmp_path / "p.png") * 255).round()
    blue = ((img[0] == 0) & (img[1] == 114) & (img[2] == 178)).sum()
    orange = ((img[0] == 213) & (img[1] == 94) & (img[2] == 0)).sum()
    assert blue > 200 and orange > 200  # both curves (and legend swatches) drawn
    save_line_plot(tmp_path / "single.png", {"x": [1.0]}, title="one point")
    with pytest.raises(ValueError, match="positive"):
        save_line_plot(tmp_path / "bad.png", {"x": [0.0, -1.0]}, title="t", log_y=True)
    with pytest.raises(ValueError, match="non-empty"):
        save_line_plot(tmp_path / "bad.png", {}, title="t")


def test_scatter_accepts_one_set_or_labelled_sets_and_skips_non_finite(tmp_path):
    save_scatter(tmp_path / "a.png", torch.randn(50, 2), title="points")
    pts = {"real": torch.randn(100, 2), "fake": torch.tensor([[0.0, 0.0], [float("nan"), 1.0]])}
    save_scatter(tmp_path / "b.png", pts, title="two", bounds=(-3, 3, -3, 3))
    img = (read_png(tmp_path / "b.png") * 255).round()
    assert ((img[0] == 213) & (img[1] == 94) & (img[2] == 0)).sum() > 0
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        save_scatter(tmp_path / "c.png", torch.randn(5, 3))
