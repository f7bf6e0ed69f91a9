"""examples/images.py: grids read back with Pillow are pixel-exact; bad input is a clear error and writes nothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from examples.images import save_image_grid


def _read(path) -> torch.Tensor:
    """``[H, W, C]`` uint8 as Pillow decodes the file."""
    with Image.open(path) as im:
        im.load()
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        return data.reshape(im.height, im.width, -1)


def test_grayscale_grid_places_each_image_with_padding_and_scale(tmp_path):
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0)])
    save_image_grid(tmp_path / "g.png", images, nrow=2, padding=1, scale=2, pad_value=0.25)
    with Image.open(tmp_path / "g.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (2 * (4 + 1) + 1, 2 * (4 + 1) + 1))
    g = _read(tmp_path / "g.png")[..., 0]
    assert g[1:5, 1:5].eq(0).all() and g[1:5, 6:10].eq(128).all() and g[6:10, 1:5].eq(255).all()
    assert g[0].eq(64).all() and g[:, 5].eq(64).all()  # padding around and between
    assert g[6:10, 6:10].eq(64).all()  # the empty fourth slot is padding


def test_rgb_grid_round_trips_every_pixel(tmp_path):
    images = torch.rand(5, 3, 4, 3, generator=torch.Generator().manual_seed(0))
    save_image_grid(tmp_path / "g.png", images, nrow=5, padding=0)
    g = _read(tmp_path / "g.png")
    assert g.shape == (4, 15, 3)
    expected = (images * 255).round().to(torch.uint8).permute(2, 0, 3, 1).reshape(4, 15, 3)
    assert torch.equal(g, expected)


def test_values_outside_the_unit_interval_are_clamped(tmp_path):
    save_image_grid(tmp_path / "g.png", torch.tensor([-3.0, 0.5, 7.0]).reshape(1, 1, 1, 3), nrow=1, padding=0)
    assert _read(tmp_path / "g.png").flatten().tolist() == [0, 128, 255]


def test_the_extension_picks_the_format(tmp_path):
    save_image_grid(tmp_path / "g.jpg", torch.rand(2, 3, 8, 8), nrow=2)
    with Image.open(tmp_path / "g.jpg") as im:
        assert im.format == "JPEG"
    with pytest.raises(ValueError, match="'g.nope'"):
        save_image_grid(tmp_path / "g.nope", torch.rand(2, 3, 8, 8), nrow=2)
    with pytest.raises(ValueError, match="'grid'"):
        save_image_grid(tmp_path / "grid", torch.rand(2, 3, 8, 8), nrow=2)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.rand(3, 8, 8), {}, r"\[N, C, H, W\] tensor, got shape \(3, 8, 8\)"),
        ([[0.0]], {}, r"\[N, C, H, W\] tensor, got list"),
        (torch.rand(2, 2, 8, 8), {}, "1 or 3 channels"),
        (torch.rand(0, 3, 8, 8), {}, "no pixels"),
        (torch.rand(1, 3, 0, 8), {}, "no pixels"),
        (torch.ones(1, 1, 2, 2, dtype=torch.bool), {}, "real numbers"),
        (torch.rand(1, 1, 2, 2), {"nrow": 0}, "nrow must be an integer >= 1"),
        (torch.rand(1, 1, 2, 2), {"nrow": 2.5}, "nrow must be an integer"),
        (torch.rand(1, 1, 2, 2), {"scale": 0}, "scale must be an integer >= 1"),
        (torch.rand(1, 1, 2, 2), {"scale": True}, "scale must be an integer"),
        (torch.rand(1, 1, 2, 2), {"padding": -1}, "padding must be an integer >= 0"),
        (torch.rand(1, 1, 2, 2), {"pad_value": float("nan")}, "pad_value"),
        (torch.rand(1, 1, 2, 2), {"pad_value": 2}, "pad_value"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_image_grid(tmp_path / "g.png", images, **{"nrow": 2, **kwargs})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_images_are_refused_and_a_previous_grid_is_kept(tmp_path, bad):
    save_image_grid(tmp_path / "g.png", torch.zeros(1, 1, 2, 2), nrow=1)
    before = (tmp_path / "g.png").read_bytes()
    images = torch.rand(2, 3, 4, 4)
    images[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        save_image_grid(tmp_path / "g.png", images, nrow=2)
    assert (tmp_path / "g.png").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_a_grid_over_pillows_pixel_limit_is_refused_before_it_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"over Pillow's limit of 1000 pixels"):
        save_image_grid(tmp_path / "g.png", torch.rand(4, 1, 8, 8), nrow=2, scale=4)
    save_image_grid(tmp_path / "ok.png", torch.rand(4, 1, 8, 8), nrow=2)  # 22 x 22 = 484 pixels


def test_a_missing_folder_or_a_folder_in_the_way_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_image_grid: .*folder .*missing does not exist"):
        save_image_grid(tmp_path / "missing" / "g.png", torch.rand(1, 1, 2, 2), nrow=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        save_image_grid(tmp_path / "file" / "g.png", torch.rand(1, 1, 2, 2), nrow=1)
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(IsADirectoryError, match="taken.png: it is a folder"):
        save_image_grid(tmp_path / "taken.png", torch.rand(1, 1, 2, 2), nrow=1)
