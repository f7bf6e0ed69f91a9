"""What a command needs to know when torchrun started it: which process it is, and how to join the others.

``torchrun --nproc_per_node=N -m examples.<command> ...`` starts N copies of a command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
set. :func:`launch_from_env` reads them (``None``: a plain process, which runs as it always did);
:func:`join_process_group` calls ``torch.distributed.init_process_group`` with a timeout that
bounds every later collective; :func:`silenced` keeps the ranks other than 0 quiet where they
would only repeat rank 0's words (argparse's errors for the same command line);
:func:`backend_reason` gives a failed collective's cause in a few words.

>>> launch_from_env({}) is None                # not under torchrun: one process
True
>>> launch_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
...                  "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"})
Launch(rank=1, world_size=2, local_rank=1, local_world_size=2)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch.distributed as dist

__all__ = ["Launch", "LaunchError", "launch_from_env", "join_process_group", "silenced", "let_the_reporting_rank_speak", "backend_reason"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ValueError):
    """torchrun's environment variables are incomplete or inconsistent, or the process group cannot be joined."""


@dataclass(frozen=True)
class Launch:
    """What the launcher says about this process: its rank, the world size, its place on this machine."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes and speaks for every rank."""
        return self.rank == 0


def launch_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """The :class:`Launch` torchrun's variables describe, or ``None`` for a plain process (no ``RANK``/``WORLD_SIZE``).

    :class:`LaunchError` when some of the variables are set but not all, or are not integers in range.
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [n for n in _ENV if n not in env]
    if missing:
        raise LaunchError(
            f"the environment sets {'RANK' if 'RANK' in env else 'WORLD_SIZE'} but not {', '.join(missing)}: launch "
            "several processes with torchrun, or unset RANK and WORLD_SIZE to run one"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        text = env.get(name, env["WORLD_SIZE"] if name == "LOCAL_WORLD_SIZE" else "")
        if not text.isdigit():
            raise LaunchError(f"the environment variable {name}={text!r} is not a non-negative integer")
        values[name] = int(text)
    rank, world, local_rank, local_world = (values[n] for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    if world < 1 or rank >= world or local_world < 1 or local_rank >= local_world or local_world > world:
        raise LaunchError(f"the environment's RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local_rank}, "
                          f"LOCAL_WORLD_SIZE {local_world} do not fit together")
    return Launch(rank, world, local_rank, local_world)


def backend_reason(e: BaseException) -> str:
    """A failed collective's cause in the backend's own words, short (gloo: ``Connection closed by peer [..]:port``)."""
    cause = e.__cause__ if e.__cause__ is not None else e
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if text.startswith("[") and "] " in text:  # gloo prefixes its source file: [/.../pair.cc:553]
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0].rstrip(".")


def join_process_group(launch: Launch, backend: str, timeout_s: float) -> None:
    """``init_process_group(backend, timeout=timeout_s)`` by torchrun's ``env://`` rendezvous. The timeout bounds
    every collective of the run: a peer that stalls longer makes the others fail. :class:`LaunchError` (one
    line) when the rendezvous fails."""
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), rank=launch.rank,
                                world_size=launch.world_size)
    except (RuntimeError, ValueError) as e:
        raise LaunchError(f"rank {launch.rank} of {launch.world_size}: joining the process group failed ({backend_reason(e)})") from e


@contextlib.contextmanager
def silenced(quiet: bool) -> Iterator[None]:
    """Within the block, standard output and error go nowhere when ``quiet`` (a rank that would repeat rank 0).

    A quiet rank that exits inside the block (a flag error, which every rank finds alike) first
    lets the reporting rank speak (:func:`let_the_reporting_rank_speak`).
    """
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        try:
            yield
        except SystemExit:
            let_the_reporting_rank_speak()
            raise


def let_the_reporting_rank_speak(wait_s: float = 30.0) -> None:
    """Before a quiet rank exits on an error every rank finds alike: wait up to ``wait_s``, while the
    reporting rank prints it and exits, and torchrun then stops this rank. Exiting at once lets
    torchrun stop the reporting rank before it said why (seen in 1 of 9 runs)."""
    time.sleep(wait_s)
