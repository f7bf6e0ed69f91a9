"""A stdlib PNG decoder (``zlib`` + ``struct``), so a folder of PNGs trains without pillow.

Reads non-interlaced PNGs of bit depth 8 or 16 (16 keeps the high byte) and every
colour type: grayscale, RGB, palette, grayscale+alpha, RGBA. The writer lives in
:mod:`examples.plotting`.

>>> import torch, tempfile, os
>>> from examples.plotting import save_image_grid
>>> path = os.path.join(tempfile.mkdtemp(), "x.png")
>>> save_image_grid(path, torch.ones(1, 3, 2, 2), nrow=1, padding=0)
>>> read_png(path).shape
torch.Size([3, 2, 2])
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Union

import torch
from torch import Tensor

__all__ = ["read_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> bytearray:
    """Undo the per-scanline filters (PNG spec section 9)."""
    out = bytearray(height * stride)
    prev = bytearray(stride)
    pos = 0
    for y in range(height):
        ftype = raw[pos]
        line = bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                up_left = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        elif ftype != 0:
            raise ValueError(f"PNG scanline {y} has unknown filter type {ftype}")
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return out


def read_png(path: Union[str, os.PathLike]) -> Tensor:
    """The image at ``path`` as ``[C, H, W]`` float32 in ``[0, 1]``.

    ``C`` is 1 (gray), 2 (gray+alpha), 3 (RGB, also for palette images) or 4 (RGBA).
    Raises ``ValueError`` for a file that is not a PNG, is truncated, or uses
    interlacing or a bit depth below 8.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    pos = len(_SIGNATURE)
    header = None
    palette = None
    idat = []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ValueError("truncated PNG chunk")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("PNG without IHDR or IDAT")
    width, height, depth, color_type, _, _, interlace = header
    if interlace:
        raise ValueError("interlaced PNGs are not supported")
    if depth not in (8, 16) or color_type not in _CHANNELS:
        raise ValueError(f"unsupported PNG bit depth {depth} / colour type {color_type}")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"corrupt PNG data: {e}") from None
    channels = _CHANNELS[color_type]
    bpp = channels * depth // 8
    stride = width * bpp
    if len(raw) < height * (stride + 1):
        raise ValueError("truncated PNG image data")
    pixels = torch.frombuffer(_unfilter(raw, height, stride, bpp), dtype=torch.uint8)
    if depth == 16:
        pixels = pixels[0::2]  # big-endian: the high byte
    img = pixels.reshape(height, width, channels)
    if color_type == 3:
        if palette is None:
            raise ValueError("palette PNG without PLTE chunk")
        table = torch.frombuffer(bytearray(palette), dtype=torch.uint8).reshape(-1, 3)
        img = table[img[..., 0].long()]
    return img.permute(2, 0, 1).float() / 255.0
