"""Whether a PNG's image data holds exactly the bytes its header declares.

Pillow's PNG decoder treats the end of the compressed data as the end of the image: a file whose
IDAT chunks hold a complete zlib stream that ends early decodes without error, the missing rows
black, and neither ``Image.verify()`` (chunk CRCs) nor ``load()`` compares the data with the
header. :func:`png_data_problem` does: it walks the chunks, inflates the IDAT data in pieces of
at most 64 KiB that it counts and drops (memory stays bounded whatever the image's size), and
compares the count with what IHDR's width, height, bit depth, colour type and interlacing
declare (one filter byte per row of each pass, as the PNG specification lays the data out).

>>> import struct, zlib
>>> def chunk(kind, data):
...     return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
>>> ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)          # 4x4 8-bit gray: 4 rows of 1 + 4 bytes
>>> png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(15))) + chunk(b"IEND", b"")
>>> png_data_problem(png)
'its image data holds 15 bytes where its header (4x4, 8-bit, colour type 0) declares 20: the data ends early (rows missing)'
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Optional, Union

__all__ = ["png_data_problem", "expected_data_bytes"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PIECE = 64 * 1024
# Adam7: (first column, first row, column step, row step) of each of the 7 passes
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def expected_data_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlace: int) -> int:
    """The inflated size of a PNG's image data: per row a filter byte and the row's packed samples, over every
    Adam7 pass for an interlaced image."""
    bits = bit_depth * _CHANNELS[colour_type]

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if interlace == 0:
        return rows(width, height)
    return sum(rows(max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)) for x0, y0, dx, dy in _ADAM7)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def png_data_problem(source: Union[str, bytes, BinaryIO]) -> Optional[str]:
    """Why a PNG's image data does not match its header (fewer or more inflated bytes, a stream that does not end,
    data after the stream's end), or ``None`` when it matches. ``source``: a path, the file's bytes, or a binary file.
    Structural damage Pillow reports itself (a bad signature, a short chunk) is left to it: ``None``."""
    if isinstance(source, (bytes, bytearray)):
        import io

        return png_data_problem(io.BytesIO(source))
    if not hasattr(source, "read"):
        with open(source, "rb") as f:
            return png_data_problem(f)
    f = source
    try:
        if _read_exact(f, 8) != _SIGNATURE:
            return None
        header = None
        inflate = zlib.decompressobj()
        inflated = 0
        expected = None
        while True:
            length, kind = struct.unpack(">I4s", _read_exact(f, 8))
            if kind == b"IHDR":
                width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", _read_exact(f, 13))
                if colour not in _CHANNELS or interlace not in (0, 1):
                    return None  # Pillow refuses these itself
                header = f"{width}x{height}, {depth}-bit, colour type {colour}"
                expected = expected_data_bytes(width, height, depth, colour, interlace)
                f.seek(length - 13 + 4, 1)
                continue
            if kind == b"IDAT" and expected is not None:
                left = length
                while left:
                    piece = _read_exact(f, min(left, _PIECE))
                    left -= len(piece)
                    if inflate.eof:
                        if piece:
                            return f"its image data goes on after the end of its compressed stream ({header})"
                        continue
                    data = inflate.decompress(piece, _PIECE)
                    while True:
                        inflated += len(data)
                        if inflated > expected:
                            return (f"its image data holds more than the {expected} bytes its header ({header}) declares: "
                                    "the data runs long")
                        if not inflate.unconsumed_tail:
                            break
                        data = inflate.decompress(inflate.unconsumed_tail, _PIECE)
                f.seek(4, 1)  # the CRC (verify() checks it)
                continue
            if kind == b"IEND" or (kind != b"IDAT" and inflated and expected is not None):
                break  # the IDAT chunks are consecutive: the data ended
            f.seek(length + 4, 1)
    except (EOFError, struct.error, zlib.error, OSError, ValueError):
        return None  # damage Pillow names in its own words
    if expected is None:
        return None
    if not inflate.eof:
        return f"its compressed image data stops before its end ({header}): the file is truncated"
    if inflated < expected:
        return (f"its image data holds {inflated} bytes where its header ({header}) declares {expected}: "
                "the data ends early (rows missing)")
    return None
