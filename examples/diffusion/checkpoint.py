"""Checkpoints that are written atomically, verified on load, and cannot run code.

File layout: ``b"PFUNCCKP"``, a format version (uint16), the payload length (uint64),
the payload's SHA-256, then the payload: a ``torch.save`` of a dict holding only
tensors, numbers, strings, ``None`` and lists/tuples/dicts of them, read back with
``torch.load(weights_only=True)`` (no pickled code). The length and digest turn a
truncated or bit-flipped file into a :class:`CheckpointError` instead of a silent
restart or garbage weights. Writes go to a temporary file in the same folder,
are fsynced, then ``os.replace``d over the target: a crash leaves the previous
checkpoint intact.

>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
>>> save_checkpoint(path, {"step": 3, "params": {"w": torch.ones(2)}})
>>> load_checkpoint(path)["step"]
3
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "MAGIC", "FORMAT_VERSION"]

MAGIC = b"PFUNCCKP"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHQ32s")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or not one of ours."""


def _check_plain(x: Any, where: str) -> None:
    if isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, str)):
        return
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"save_checkpoint: key {k!r} at {where} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"save_checkpoint: {where} is a {type(x).__name__}; only tensors, numbers, strings, None and containers")


def save_checkpoint(path: Union[str, os.PathLike], payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace`` + folder fsync)."""
    _check_plain(payload, "payload")
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(data), hashlib.sha256(data).digest())
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> dict:
    """The payload saved at ``path``; :class:`CheckpointError` saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    blob = path.read_bytes()
    if len(blob) < _HEADER.size:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated: {len(blob)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a pfunc diffusion checkpoint (bad magic bytes {magic!r})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version}; this code reads version {FORMAT_VERSION}")
    data = blob[_HEADER.size :]
    if len(data) != length:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or has trailing bytes: payload is {len(data)} bytes, the header says {length}"
        )
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its SHA-256 does not match the one written with it")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # a payload with a valid digest but content torch refuses
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read safely: {e}") from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, expected a dict")
    return payload
