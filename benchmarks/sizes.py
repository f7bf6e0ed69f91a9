"""Problem sizes and timing budgets for each kind of run: CPU or GPU, full or quick, and the CI smoke sizes.

>>> sizes_for("cpu", quick=False).ensemble_sizes
(8, 32, 128)
>>> max(sizes_for("cuda", quick=False).ensemble_sizes)
1024
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

__all__ = ["Sizes", "sizes_for", "SMOKE"]


@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses, and how long to time each row.

    Layers (item 1): ``width`` x ``width`` Linear layers, ``depth`` of them in the MLP,
    inputs ``(batch, width)``. Caching (item 2): an RNN cell ``rnn_width`` square,
    ``rnn_steps`` steps, batch ``rnn_batch``. Ensembles (item 3): members
    ``ensemble_in -> ensemble_hidden -> ensemble_hidden -> 1``, ``ensemble_batch`` rows each,
    for every N in ``ensemble_sizes``. Power iteration (item 4): ``power_count`` matrices
    ``power_size`` square (and ``power_extra_shapes``), ``power_iterations`` per call. Unet (item 6): ``unet_dim`` base
    channels, ``unet_image`` pixels square, batch ``unet_batch``, autocast to ``unet_dtype``
    (``None``: float32). Timing: about ``budget_s`` per row, at least ``min_repeats`` rounds.
    """

    width: int = 256
    depth: int = 4
    batch: int = 64
    rnn_width: int = 64
    rnn_steps: int = 50
    rnn_batch: int = 32
    ensemble_sizes: tuple[int, ...] = (8, 32, 128)
    ensemble_in: int = 16
    ensemble_hidden: int = 64
    ensemble_batch: int = 32
    compile_ensemble_size: int = 32
    power_count: int = 16
    power_size: int = 256
    power_iterations: tuple[int, ...] = (1, 15)
    power_extra_shapes: tuple[tuple[int, int], ...] = ((64, 64), (1024, 256))
    unet_dim: int = 16
    unet_dim_mults: tuple[int, ...] = (1, 2, 4)
    unet_image: int = 32
    unet_channels: int = 3
    unet_batch: int = 16
    unet_dtype: Optional[str] = None
    unet_attn: tuple[int, int] = (4, 32)
    budget_s: float = 2.0
    min_repeats: int = 10
    max_repeats: int = 400


CPU_FULL = Sizes()
CPU_QUICK = replace(
    CPU_FULL, ensemble_sizes=(8, 32), power_iterations=(1,), power_extra_shapes=(), budget_s=0.3, min_repeats=5
)
CUDA_FULL = replace(
    CPU_FULL,
    width=1024,
    batch=512,
    rnn_width=256,
    rnn_batch=256,
    ensemble_sizes=(8, 32, 128, 512, 1024),
    ensemble_hidden=128,
    ensemble_batch=128,
    compile_ensemble_size=32,  # torch's compiled loop over N modules takes minutes to compile beyond that
    power_count=64,
    power_size=1024,
    power_extra_shapes=((256, 256), (4096, 1024)),
    unet_dim=64,
    unet_dim_mults=(1, 2, 4, 8),
    unet_image=64,
    unet_batch=64,
    unet_dtype="bfloat16",
    budget_s=1.0,
    min_repeats=25,
)
CUDA_QUICK = replace(
    CUDA_FULL, ensemble_sizes=(32, 1024), power_iterations=(1,), power_extra_shapes=(), budget_s=0.3, min_repeats=5
)
SMOKE = Sizes(
    width=8,
    depth=2,
    batch=4,
    rnn_width=6,
    rnn_steps=3,
    rnn_batch=2,
    ensemble_sizes=(3,),
    ensemble_in=4,
    ensemble_hidden=5,
    ensemble_batch=2,
    compile_ensemble_size=3,
    power_count=3,
    power_size=6,
    power_iterations=(1,),
    power_extra_shapes=(),
    unet_dim=8,
    unet_dim_mults=(1, 2),
    unet_image=8,
    unet_batch=2,
    unet_attn=(2, 8),
    budget_s=0.0,
    min_repeats=1,
)


def sizes_for(device: str, *, quick: bool) -> Sizes:
    """The sizes for a run on ``device`` (``"cpu"`` or ``"cuda"``), ``quick`` or full."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if kind == "cuda":
        return CUDA_QUICK if quick else CUDA_FULL
    return CPU_QUICK if quick else CPU_FULL
