"""Checkpoints that are written atomically, verified on load, and cannot run code.

File layout: ``b"PFUNCCKP"``, a format version (uint16), the payload length (uint64),
the payload's SHA-256, then the payload: a ``torch.save`` of a dict holding only
tensors, numbers, strings, ``None`` and lists/tuples/dicts of them, read back with
``torch.load(weights_only=True)`` (no pickled code). The length and digest turn a
truncated or bit-flipped file into a :class:`CheckpointError` instead of a silent
restart or garbage weights. Writes go to a temporary file in the same folder,
are fsynced, then ``os.replace``d over the target: a crash or a full disk leaves the
previous checkpoint intact, and a failed write removes its temp file (a killed one's is
removed by the next save).

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

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint", "stale_temp_files", "MAGIC", "FORMAT_VERSION"]

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


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def stale_temp_files(path: Union[str, os.PathLike]) -> list[Path]:
    """Temp files a killed save of ``path`` left behind (``.<name>.tmp*`` beside it)."""
    path = Path(path)
    try:
        return sorted(p for p in path.parent.glob(f".{path.name}.tmp*") if p.is_file())
    except OSError:
        return []


def save_checkpoint(path: Union[str, os.PathLike], payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace`` + folder fsync).

    Temp files of earlier saves that were killed (``.<name>.tmp*``) are removed first. If the
    write fails (a full disk, a read-only folder, an interrupt) the temp file is removed, the
    previous checkpoint at ``path`` is left as it was, and (for an ``OSError``) a
    :class:`CheckpointError` says what happened. ``TypeError`` for a payload that would need
    pickled code.
    """
    _check_plain(payload, "payload")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: a folder is in the way")
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(data), hashlib.sha256(data).digest())
    for stale in stale_temp_files(path):
        _remove_quietly(stale)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    keep = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        reason = e.strerror or str(e)
        raise CheckpointError(f"could not write checkpoint {str(path)!r}: {reason} (errno {e.errno}); {keep}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the file itself is on disk
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> dict:
    """The payload saved at ``path``; :class:`CheckpointError` saying what is wrong otherwise."""
    return read_checkpoint(path, map_location)[0]


def read_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> tuple[dict, str]:
    """``(payload, sha256)``: :func:`load_checkpoint`'s payload and the hex SHA-256 of the whole file
    as read (what ``sha256sum`` prints), to record which checkpoint made something."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {e.strerror or e}") from None
    if len(blob) < _HEADER.size:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated: {len(blob)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a pfunc diffusion checkpoint (bad magic bytes {magic!r})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version}; this code reads version {FORMAT_VERSION}")
    data = memoryview(blob)[_HEADER.size :]
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
    return payload, hashlib.sha256(blob).hexdigest()
