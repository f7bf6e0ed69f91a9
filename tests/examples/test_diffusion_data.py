"""Training data: the embedded shapes, the stdlib PNG decoder (against pillow-written files and our
own writer), folders of images, and the resumable batch order."""

import struct
import zlib

import pytest
import torch

from examples.diffusion.data import SHAPES, BatchOrder, draw_shapes, load_image_folder
from examples.diffusion.png import read_png
from examples.plotting import save_image_grid


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_are_deterministic_in_range_and_cover_every_class(channels):
    x, y = draw_shapes(500, 16, channels, torch.Generator().manual_seed(0))
    x2, y2 = draw_shapes(500, 16, channels, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (500, channels, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert set(y.tolist()) == set(range(len(SHAPES)))
    # black background at the corners' far side, a shape of a few dozen pixels in each image
    covered = (x.amax(dim=1) > 0.05).flatten(1).sum(1)
    assert covered.min() >= 6 and covered.max() < 16 * 16 * 0.8


def test_shape_classes_differ_in_area_as_their_geometry_says():
    x, y = draw_shapes(2000, 32, 1, torch.Generator().manual_seed(1))
    area = (x[:, 0] > 0).flatten(1).float().sum(1)
    color = x[:, 0].flatten(1).amax(1)
    norm_area = {k: (area[y == k] / (color[y == k] > 0)).mean().item() for k in range(5)}
    # a disk covers more than the ring cut out of it; a square (side 1.6 r) less than the disk (pi r^2 ~ 3.14 r^2 vs 2.56 r^2)
    assert norm_area[0] > norm_area[4] and norm_area[0] > norm_area[1] > norm_area[2]


def test_bad_shape_arguments_are_refused():
    with pytest.raises(ValueError, match="channels"):
        draw_shapes(2, 16, 2, torch.Generator())
    with pytest.raises(ValueError, match="image_size"):
        draw_shapes(2, 2, 1, torch.Generator())


def _png_bytes(width, height, color_type, rows, depth=8, palette=None, filters=None):
    raw = b"".join(bytes([filters[i] if filters else 0]) + r for i, r in enumerate(rows))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
    if palette:
        out += chunk(b"PLTE", palette)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_png_reader_handles_gray_palette_alpha_and_16_bit(tmp_path):
    p = tmp_path / "g.png"
    p.write_bytes(_png_bytes(2, 1, 0, [bytes([0, 255])]))
    assert read_png(p).tolist() == [[[0.0, 1.0]]]
    p.write_bytes(_png_bytes(2, 1, 3, [bytes([1, 0])], palette=bytes([10, 20, 30, 255, 0, 0])))
    assert (read_png(p) * 255).round().tolist() == [[[255, 10]], [[0, 20]], [[0, 30]]]
    p.write_bytes(_png_bytes(1, 1, 6, [bytes([255, 0, 0, 128])]))
    assert read_png(p).shape == (4, 1, 1)
    p.write_bytes(_png_bytes(1, 1, 0, [bytes([0x80, 0x01])], depth=16))
    assert read_png(p).item() == pytest.approx(128 / 255)


def test_png_reader_undoes_every_filter_type(tmp_path):
    # the same 3x4 RGB image encoded with each filter on each row, decoded by hand-written encoders
    torch.manual_seed(0)
    img = torch.randint(0, 256, (4, 3 * 3), dtype=torch.int64)
    bpp = 3
    rows, prev = [], torch.zeros(9, dtype=torch.int64)
    for y, ftype in enumerate([1, 2, 3, 4]):
        line = img[y]
        left = torch.cat([torch.zeros(bpp, dtype=torch.int64), line[:-bpp]])
        up_left = torch.cat([torch.zeros(bpp, dtype=torch.int64), prev[:-bpp]])
        if ftype == 1:
            pred = left
        elif ftype == 2:
            pred = prev
        elif ftype == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - up_left
            pa, pb, pc = (p - left).abs(), (p - prev).abs(), (p - up_left).abs()
            pred = torch.where((pa <= pb) & (pa <= pc), left, torch.where(pb <= pc, prev, up_left))
        rows.append(bytes(((line - pred) % 256).tolist()))
        prev = line
    path = tmp_path / "f.png"
    path.write_bytes(_png_bytes(3, 4, 2, rows, filters=[1, 2, 3, 4]))
    got = (read_png(path) * 255).round().long()  # [3, 4, 3]
    assert torch.equal(got.permute(1, 2, 0).reshape(4, 9), img)


def test_png_reader_round_trips_our_writer_and_refuses_garbage(tmp_path):
    images = torch.rand(4, 3, 5, 7)
    save_image_grid(tmp_path / "g.png", images, nrow=2, padding=0)
    back = read_png(tmp_path / "g.png")
    torch.testing.assert_close(back[:, :5, :7], images[0], atol=0.5 / 255 + 1e-6, rtol=0)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(tmp_path / "bad.png")
    blob = (tmp_path / "g.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        read_png(tmp_path / "cut.png")


def test_png_reader_matches_pillow_on_its_filtered_files(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(23, 31), mode="bilinear")[0]
    arr = (smooth * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    im = Image.frombytes("RGB", (31, 23), bytes(arr.flatten().tolist()))
    for mode in ("RGB", "L", "RGBA", "P"):
        im.convert(mode).save(tmp_path / f"{mode}.png", optimize=True)
        ours = read_png(tmp_path / f"{mode}.png")
        ref = Image.open(tmp_path / f"{mode}.png").convert("RGBA" if mode == "RGBA" else ("L" if mode == "L" else "RGB"))
        ref_t = torch.tensor(list(ref.tobytes()), dtype=torch.float32).reshape(23, 31, -1).permute(2, 0, 1) / 255
        assert torch.equal(ours, ref_t), mode


def test_load_image_folder_crops_resizes_and_converts_channels(tmp_path):
    save_image_grid(tmp_path / "a.png", torch.ones(1, 3, 20, 30), nrow=1, padding=0)
    (tmp_path / "sub").mkdir()
    save_image_grid(tmp_path / "sub" / "b.png", torch.zeros(1, 1, 8, 8), nrow=1, padding=0)
    (tmp_path / "notes.txt").write_text("ignored")
    x = load_image_folder(tmp_path, 16, 1)
    assert x.shape == (2, 1, 16, 16)
    torch.testing.assert_close(x[0], torch.ones(1, 16, 16))
    assert load_image_folder(tmp_path, 8, 3).shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_folder(tmp_path / "missing", 8, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", 8, 3)


def test_batch_order_covers_each_epoch_once_and_resumes_exactly():
    order = BatchOrder(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([order.next() for _ in range(order.batches_per_epoch)])
    assert len(set(epoch.tolist())) == 9  # one remainder image dropped per epoch
    saved = order.state_dict()
    ahead = [order.next() for _ in range(5)]
    other = BatchOrder(10, 3, torch.Generator().manual_seed(123))
    other.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [other.next() for _ in range(5)]))
    with pytest.raises(ValueError, match="larger than the data set"):
        BatchOrder(2, 3, torch.Generator())
