"""Noise schedules and DDIM's time grid, as host numbers: what a ``GaussianDiffusion`` is built from.

Schedules are plain Python floats (float64), computed and checked without torch, so a diffusion
process is built the same way on any machine and under a fake tensor mode, and its device tables
are made where they are used (``GaussianDiffusion(..., device=...)``, ``.to(device)``). DDIM's
visited times and step coefficients are host numbers too, so sampling reads no tensor back from
the device.

>>> ddim_time_pairs(1000, 2)
[(999, 499), (499, -1)]
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "linear_beta_values",
    "cosine_beta_values",
    "beta_values",
    "linear_beta_schedule",
    "cosine_beta_schedule",
    "beta_schedule",
    "ddim_time_pairs",
    "ddim_coefficients",
]

SCHEDULES = ("linear", "cosine")


def linear_beta_values(timesteps: int) -> list[float]:
    """DDPM's betas, linear from 1e-4 to 0.02, rescaled by ``1000 / timesteps`` so that any length
    spans the same noise. Needs ``timesteps > 20`` (else the last beta reaches 1)."""
    if timesteps <= 20:
        raise ValueError(f"linear_beta_schedule: timesteps must be above 20 (the rescaled last beta 20/timesteps reaches 1), got {timesteps}")
    scale = 1000 / timesteps
    start, end = scale * 0.0001, scale * 0.02
    step = (end - start) / (timesteps - 1)
    # torch.linspace's arithmetic: from the start for the first half, from the end for the second
    half = timesteps // 2
    return [start + i * step if i < half else end - (timesteps - 1 - i) * step for i in range(timesteps)]


def cosine_beta_values(timesteps: int, s: float = 0.008) -> list[float]:
    """Improved DDPM's betas: ``alphas_cumprod`` follows ``cos^2`` (betas clipped to 0.999)."""
    if timesteps < 1:
        raise ValueError(f"cosine_beta_schedule: timesteps must be positive, got {timesteps}")
    ac = [math.cos(((i / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2 for i in range(timesteps + 1)]
    ac = [a / ac[0] for a in ac]
    return [min(max(1 - ac[i + 1] / ac[i], 0.0), 0.999) for i in range(timesteps)]


def beta_values(name: str, timesteps: int) -> list[float]:
    """The betas of schedule ``name`` (``"linear"`` or ``"cosine"``) as Python floats."""
    if name == "linear":
        return linear_beta_values(timesteps)
    if name == "cosine":
        return cosine_beta_values(timesteps)
    raise ValueError(f"beta_schedule: unknown schedule {name!r}; expected one of {SCHEDULES}")


def linear_beta_schedule(timesteps: int) -> Tensor:
    """:func:`linear_beta_values` as a float64 CPU tensor."""
    return torch.tensor(linear_beta_values(timesteps), dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> Tensor:
    """:func:`cosine_beta_values` as a float64 CPU tensor."""
    return torch.tensor(cosine_beta_values(timesteps, s), dtype=torch.float64)


def beta_schedule(name: str, timesteps: int) -> Tensor:
    """The betas of schedule ``name`` (``"linear"`` or ``"cosine"``) as a float64 CPU tensor."""
    return torch.tensor(beta_values(name, timesteps), dtype=torch.float64)


def ddim_time_pairs(num_timesteps: int, sampling_timesteps: int) -> list[tuple[int, int]]:
    """The ``(t, t_next)`` pairs DDIM visits: ``sampling_timesteps`` evenly spaced steps from ``T - 1`` down,
    the last one to ``-1`` (meaning: return the ``x_0`` estimate).

    >>> ddim_time_pairs(1000, 4)
    [(999, 749), (749, 499), (499, 249), (249, -1)]
    """
    if not 1 <= sampling_timesteps <= num_timesteps:
        raise ValueError(f"ddim_time_pairs: sampling_timesteps must be in [1, {num_timesteps}], got {sampling_timesteps}")
    times = _linspace_float32_int(-1.0, float(num_timesteps - 1), sampling_timesteps + 1)
    return list(zip(reversed(times[1:]), reversed(times[:-1])))


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _linspace_float32_int(start: float, end: float, steps: int) -> list[int]:
    """``torch.linspace(start, end, steps).int().tolist()`` (float32, CPU) on the host, without torch, so
    that sampling reads no tensor: torch's kernel rounds ``step`` to float32 and computes
    ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the rest with one
    rounding (a fused multiply-add); checked equal to torch in tests/examples/test_diffusion_ddim.py."""
    step = _float32(_float32(end - start) / _float32(steps - 1)) if steps > 1 else 0.0
    half = steps // 2
    return [int(_float32(start + step * i)) if i < half else int(_float32(end - step * (steps - 1 - i))) for i in range(steps)]


def ddim_coefficients(alpha: float, alpha_next: float, eta: float) -> tuple[float, float]:
    """``(c, sigma)`` of one DDIM step from ``abar_t = alpha`` to ``abar_next = alpha_next > alpha``:
    ``x_next = sqrt(abar_next) x0_hat + c eps_hat + sigma z``, with ``c^2 + sigma^2 = 1 - abar_next``.

    ``sigma^2 = eta^2 (1 - abar_next) / (1 - abar_t) (1 - abar_t / abar_next)`` (Song et al.). The
    textbook ``c = sqrt(1 - abar_next - sigma^2)`` subtracts two nearly equal numbers when ``abar_t``
    is tiny (the cosine schedule's last step has ``abar ~ 2.4e-9``, its beta clipped at 0.999): at
    ``eta = 1`` the true ``c^2 = abar_t (1 - abar_next)^2 / (abar_next (1 - abar_t))`` is ~1e-9,
    far below float32's rounding error of ``1 - abar_next`` (6e-8), so the difference came out
    ``+-6e-8`` by chance, and ``sqrt`` of the negative one made every image NaN. Here ``c^2`` is
    written as a sum of non-negative terms, without that cancellation, and computed in float64:

    ``c^2 = (1 - abar_next) [(1 - eta^2) abar_next (1 - abar_t) + eta^2 abar_t (1 - abar_next)] / (abar_next (1 - abar_t))``

    >>> c, s = ddim_coefficients(2.4e-9, 0.25, 1.0)
    >>> c > 0 and abs(c * c + s * s - 0.75) < 1e-12
    True
    """
    if not 0 < alpha < alpha_next <= 1:
        raise ValueError(f"ddim_coefficients: need 0 < alpha < alpha_next <= 1, got {alpha!r} and {alpha_next!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"ddim_coefficients: eta must be in [0, 1], got {eta!r}")
    e2 = eta * eta
    denominator = alpha_next * (1.0 - alpha)
    sigma2 = e2 * (1.0 - alpha_next) * (alpha_next - alpha) / denominator
    c2 = (1.0 - alpha_next) * ((1.0 - e2) * alpha_next * (1.0 - alpha) + e2 * alpha * (1.0 - alpha_next)) / denominator
    return math.sqrt(c2), math.sqrt(sigma2)
