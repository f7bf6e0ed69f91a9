"""The process group a collective runs on, and what a failed collective raises.

:func:`resolve_group` turns the ``group`` argument of every :mod:`pfunc.distributed` function into
a :class:`Group` (rank, size, the device types its backend moves), with a clear error when no
process group is initialised; :func:`run_collective` calls a ``torch.distributed`` collective and
turns a backend failure (a dead or stalled peer) into a :class:`CollectiveError` naming the
operation and this rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "Group", "resolve_group", "backend_device_types", "run_collective", "KNOWN_BACKEND_DEVICES"]

# Device types each backend moves tensors on, for torch builds without
# ``get_backend_config`` / ``Backend.backend_capability``.
KNOWN_BACKEND_DEVICES = {"gloo": {"cpu", "cuda"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"}, "ucc": {"cpu", "cuda"}}


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died, or stalled past the process group's timeout."""


@dataclass(frozen=True)
class Group:
    """The process group a call runs on: its ``ProcessGroup`` (``None`` for the world), this rank, the size, the device types its backend moves."""

    pg: Any  # ProcessGroup, or None for the default group (what torch.distributed's functions take)
    rank: int
    size: int
    device_types: Optional[frozenset[str]]  # None: a backend we know nothing about (no device check)

    def gather_device(self, where: str) -> torch.device:
        """Where small bookkeeping tensors (hashes, fingerprints) go for an all-gather."""
        if self.device_types is None or "cpu" in self.device_types or "cuda" not in self.device_types:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError(f"{where}: the process group's backend moves CUDA tensors only, and CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())


def resolve_group(group: Any, where: str) -> Group:
    """The :class:`Group` of a ``group`` argument; ``RuntimeError``/``TypeError``/``ValueError`` naming ``where`` when there is no usable group."""
    if not dist.is_available():
        raise RuntimeError(f"{where}: this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{where}: no process group is initialised; call torch.distributed.init_process_group(...) "
            "first (under torchrun: init_process_group('gloo') on CPU, 'nccl' on CUDA)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{where}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: group does not contain this process (global rank {dist.get_rank()})")
    return Group(group, rank, dist.get_world_size(group), backend_device_types(group))


def backend_device_types(group: Any) -> Optional[frozenset[str]]:
    """The device types (``{"cpu", "cuda"}``) the group's backend moves tensors on; ``None`` for a backend this module does not know."""
    get_config = getattr(dist, "get_backend_config", None)
    if get_config is not None:
        config = str(get_config(group))  # "cpu:gloo,cuda:gloo", "cuda:nccl", "cpu:gloo,cuda:nccl"
        if ":" in config:
            return frozenset(part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part)
    backend = str(dist.get_backend(group))
    capability = getattr(dist.Backend, "backend_capability", {})
    if backend in capability:
        return frozenset(capability[backend])
    known = KNOWN_BACKEND_DEVICES.get(backend)
    return frozenset(known) if known is not None else None


def run_collective(where: str, what: str, g: Group, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a collective (or ``Work.wait``), turning a backend failure into a CollectiveError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError):
        raise
    except RuntimeError as e:  # DistBackendError, gloo's "Connection reset by peer", "Timed out ..."
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveError(
            f"{where}: {what} failed on rank {g.rank} of {g.size}: {first} -- a peer rank probably "
            "died, or stalled past the process group's timeout (init_process_group(timeout=...))"
        ) from e
