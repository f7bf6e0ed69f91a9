"""Training data: the embedded shapes; folders of images read with Pillow (every format it reads, the
decompression-bomb limit, malformed PNGs refused by name or skipped, reduced-scale decoding); and the
resumable batch order. Every image file is written by Pillow; malformed ones are Pillow-written PNGs
with bytes changed."""

import io
import resource
import struct
import zlib

import pytest
import torch
from PIL import Image

from examples.diffusion.data import (
    SHAPES,
    BadImageError,
    BatchOrder,
    draw_shapes,
    image_extensions,
    load_image_folder,
    pixel_limit,
    read_image,
)


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


# ------------------------------------------------------------------------------ image folders, read with Pillow
def _save(path, pixels, mode="RGB", **kw):
    """Write ``pixels`` ([H, W, C] or [H, W] uint8) with Pillow, in the format of ``path``'s extension."""
    Image.fromarray(pixels.numpy(), mode=None).convert(mode).save(path, **kw)
    return path


def _pattern(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear")[0]
    return (smooth * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _png_bytes(image: "Image.Image") -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _chunks(blob: bytes):
    """``[(type, offset, length)]`` of a PNG's chunks."""
    out, i = [], 8
    while i < len(blob):
        (n,) = struct.unpack(">I", blob[i : i + 4])
        out.append((blob[i + 4 : i + 8], i, n))
        i += 12 + n
    return out


def _with_chunk(blob: bytes, kind: bytes, data: bytes) -> bytes:
    """``blob`` with chunk ``kind``'s data replaced by ``data`` (its CRC recomputed: only the content is wrong)."""
    out = blob[:8]
    for k, i, n in _chunks(blob):
        out += struct.pack(">I", len(data)) + k + data + struct.pack(">I", zlib.crc32(k + data)) if k == kind else blob[i : i + 12 + n]
    return out


def _palette_png() -> bytes:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
    im.putpixel((1, 1), 3)
    return _png_bytes(im)


def _malformed(kind: str) -> bytes:
    """A Pillow-written PNG with the damage ``kind``, made by changing its bytes."""
    good = _png_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))
    if kind == "short IHDR":
        _, i, n = _chunks(good)[0]
        return _with_chunk(good, b"IHDR", good[i + 8 : i + 8 + 9])
    if kind == "bad CRC":
        blob = bytearray(good)
        _, i, n = next(c for c in _chunks(good) if c[0] == b"IDAT")
        blob[i + 8 + n] ^= 0x01
        return bytes(blob)
    pal = _palette_png()
    _, i, n = next(c for c in _chunks(pal) if c[0] == b"PLTE")
    if kind == "short palette":
        return _with_chunk(pal, b"PLTE", pal[i + 8 : i + 8 + 5])
    if kind == "index past the palette":
        return _with_chunk(pal, b"PLTE", pal[i + 8 : i + 8 + 6])
    if kind == "truncated":
        return good[: len(good) - 20]
    if kind == "not an image":
        return b"GIF89a but not really"
    raise ValueError(kind)


def _huge_declared() -> bytes:
    """A real 1.6 MB PNG of 4000x400 pixels whose IHDR (CRC fixed) declares 40000x40000."""
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (400, 4000), dtype=torch.uint8, generator=rng)
    blob = bytearray(_png_bytes(Image.fromarray(noise.numpy(), mode="L")))
    _, i, n = _chunks(bytes(blob))[0]
    blob[i + 8 : i + 16] = struct.pack(">II", 40000, 40000)
    blob[i + 8 + n : i + 12 + n] = struct.pack(">I", zlib.crc32(bytes(blob[i + 4 : i + 8 + n])))
    return bytes(blob)


@pytest.mark.parametrize("ext, mode", [(".png", "RGB"), (".png", "L"), (".png", "RGBA"), (".png", "P"), (".bmp", "RGB"),
                                        (".gif", "P"), (".tiff", "RGB"), (".webp", "RGB"), (".jpg", "RGB")])
def test_every_pillow_format_reads_centre_cropped_resized_and_in_range(tmp_path, ext, mode):
    pixels = _pattern(24, 36)
    path = _save(tmp_path / f"x{ext}", pixels, mode, **({"lossless": True} if ext == ".webp" else {}))
    x = read_image(path, 12, 3)
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    with Image.open(path) as im:   # what Pillow itself gives for the centre square, resized
        ref = im.convert("RGB").resize((12, 12), Image.Resampling.BICUBIC, box=(6, 0, 30, 24))
    expected = torch.frombuffer(bytearray(ref.tobytes()), dtype=torch.uint8).reshape(12, 12, 3).permute(2, 0, 1) / 255
    tolerance = 0.1 if ext == ".jpg" else 1.5 / 255      # JPEG: draft (DCT-scaled) decoding may differ a little
    torch.testing.assert_close(x, expected.float(), atol=tolerance, rtol=0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "white.png")
    Image.new("I;16", (4, 4), 32896).save(tmp_path / "mid.png")
    assert read_image(tmp_path / "white.png", 4, 1).eq(1).all()
    torch.testing.assert_close(read_image(tmp_path / "mid.png", 4, 1), torch.full((1, 4, 4), 128 / 255))


@pytest.mark.parametrize("kind, message", [
    ("short IHDR", "Truncated IHDR"),
    ("bad CRC", "bad header checksum"),
    ("short palette", "holds 5 bytes, not a whole number of RGB entries"),
    ("index past the palette", "palette index 3, past the end of its 2-entry palette"),
    ("truncated", "cannot be decoded"),
    ("not an image", "not an image Pillow can read"),
])
def test_malformed_png_files_are_refused_naming_the_file(tmp_path, kind, message):
    path = tmp_path / "bad.png"
    path.write_bytes(_malformed(kind))
    with pytest.raises(BadImageError) as e:
        read_image(path, 8, 3)
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_file_declaring_40000_by_40000_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_huge_declared())
    assert 1_000_000 < path.stat().st_size < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadImageError, match="refused before decoding, a possible decompression bomb") as e:
        read_image(path, 8, 3)
    assert str(path) in str(e.value) and "1600000000 pixels" in str(e.value)
    # decoding would need 1.6 GB; refusing from the header costs nothing
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_the_decompression_bomb_limit_stays_on_even_if_pillows_is_switched_off(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", torch.zeros(300, 400, dtype=torch.uint8), "L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)   # 120,000 pixels: over the limit, under twice it
    with pytest.raises(BadImageError, match="decompression bomb"):
        read_image(path, 8, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert pixel_limit() == 89_478_485
    read_image(path, 8, 1)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    path = _save(tmp_path / "big.jpg", _pattern(1600, 2400), "RGB", quality=90)
    seen = []
    real_load = Image.Image.load

    def load(self):
        out = real_load(self)
        seen.append(self.size)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "load", load)
        x = read_image(path, 16, 3)
    assert x.shape == (3, 16, 16)
    # decoded at 1/8 of 2400x1600 (DCT scaling), not at full size: memory follows the output size
    assert seen and max(w * h for w, h in seen) <= 300 * 200


def test_load_image_folder_refuses_a_bad_file_by_name_or_skips_it_when_asked(tmp_path):
    _save(tmp_path / "a.png", _pattern(10, 10), "RGB")
    _save(tmp_path / "b.jpg", _pattern(10, 10, seed=1), "RGB")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(_malformed("index past the palette"))
    (tmp_path / "notes.txt").write_text("not an image, and not named like one: ignored")
    with pytest.raises(BadImageError, match="c.png: a pixel uses palette index 3"):
        load_image_folder(tmp_path, 8, 3)
    images, skipped = load_image_folder(tmp_path, 8, 3, skip_bad=True)
    assert images.shape == (2, 3, 8, 8) and len(skipped) == 1 and "c.png" in skipped[0]
    (tmp_path / "a.png").write_bytes(_malformed("bad CRC"))
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 3 image files"):
        load_image_folder(tmp_path, 8, 3, skip_bad=True)


def test_load_image_folder_crops_resizes_and_converts_channels(tmp_path):
    _save(tmp_path / "a.png", torch.full((20, 30, 3), 255, dtype=torch.uint8), "RGB")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "b.png", torch.zeros(8, 8, dtype=torch.uint8), "L")
    (tmp_path / "notes.txt").write_text("ignored")
    x, skipped = load_image_folder(tmp_path, 16, 1)
    assert x.shape == (2, 1, 16, 16) and skipped == []
    torch.testing.assert_close(x[0], torch.ones(1, 16, 16))
    assert load_image_folder(tmp_path, 8, 3).images.shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_folder(tmp_path / "missing", 8, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", 8, 3)
    assert ".png" in image_extensions() and ".webp" in image_extensions() and ".txt" not in image_extensions()


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


# ------------------------------------------------------------------------------ image data shorter or longer than its header
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _inflated(blob: bytes) -> bytes:
    return zlib.decompress(b"".join(blob[i + 8 : i + 8 + n] for k, i, n in _chunks(blob) if k == b"IDAT"))


def _with_idat(blob: bytes, raw: bytes, pieces: int = 1) -> bytes:
    """``blob`` with its image data replaced by ``raw`` (one complete zlib stream, in ``pieces`` IDAT chunks)."""
    stream = zlib.compress(raw, 9)
    cut = [len(stream) * j // pieces for j in range(pieces + 1)]
    out = blob[:8]
    for k, i, n in _chunks(blob):
        if k == b"IDAT":
            out += b"".join(_chunk(b"IDAT", stream[a:b]) for a, b in zip(cut, cut[1:]))
        else:
            out += blob[i : i + 12 + n]
    return out


def _interlaced_gray(width: int, height: int, raw: bytes) -> bytes:
    """An Adam7-interlaced 8-bit grayscale PNG holding ``raw`` as its (filter 0) image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def test_png_data_shorter_or_longer_than_its_header_declares_is_refused_naming_the_file(tmp_path):
    good = _png_bytes(Image.fromarray(_pattern(8, 8).numpy()))
    raw = _inflated(good)
    assert len(raw) == 8 * (1 + 8 * 3)
    row = 1 + 8 * 3
    (tmp_path / "two_idat.png").write_bytes(_with_idat(good, raw, pieces=2))   # split data is still whole
    assert torch.equal(read_image(tmp_path / "two_idat.png", 8, 3), read_image(_write(tmp_path, "good.png", good), 8, 3))
    short = _write(tmp_path, "short.png", _with_idat(good, raw[: 6 * row]))   # a complete stream, two rows early
    with Image.open(short) as im:
        im.load()   # Pillow decodes it without a word (the missing rows black): the reason for the check
    with pytest.raises(BadImageError) as e:
        read_image(short, 8, 3)
    assert str(e.value) == (f"{short}: its image data holds {6 * row} bytes where its header (8x8, 8-bit, colour type 2) "
                            f"declares {8 * row}: the data ends early (rows missing)")
    long = _write(tmp_path, "long.png", _with_idat(good, raw + raw[:row]))
    with pytest.raises(BadImageError, match=f"^{long}: its image data holds more than the {8 * row} bytes its header"):
        read_image(long, 8, 3)
    images = tmp_path / "folder"
    images.mkdir()
    for name in ("good.png", "short.png"):
        (images / name).write_bytes((tmp_path / name).read_bytes())
    with pytest.raises(BadImageError, match="short.png: its image data holds"):
        load_image_folder(images, 8, 3)
    assert load_image_folder(images, 8, 3, skip_bad=True).images.shape[0] == 1


def _write(folder, name, blob):
    (folder / name).write_bytes(blob)
    return folder / name


def test_an_interlaced_png_is_measured_pass_by_pass(tmp_path):
    # Adam7 on 5x3, (columns x rows) of each pass: 1x1, 1x1, none (starts at row 4), 1x1, 3x1, 2x2, 5x1; each row
    # one filter byte more: 2 + 2 + 0 + 2 + 4 + 2*3 + 6 = 22 bytes
    whole = bytes(22)
    assert read_image(_write(tmp_path, "whole.png", _interlaced_gray(5, 3, whole)), 4, 1).shape == (1, 4, 4)
    with pytest.raises(BadImageError, match="holds 16 bytes where its header .5x3, 8-bit, colour type 0. declares 22"):
        read_image(_write(tmp_path, "short.png", _interlaced_gray(5, 3, whole[:-6])), 4, 1)


def test_a_png_whose_data_inflates_far_past_its_header_is_refused_in_bounded_memory(tmp_path):
    import tracemalloc

    good = _png_bytes(Image.fromarray(_pattern(8, 8).numpy()))
    bomb = _write(tmp_path, "bomb.png", _with_idat(good, bytes(256 << 20)))   # 256 MiB of data behind an 8x8 header
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(BadImageError, match="runs long"):
            read_image(bomb, 8, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"
