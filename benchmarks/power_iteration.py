"""Item 4: spectral normalisation of K matrices at once, ``W_k / sigma_k`` with ``sigma_k`` by
power iteration (torch's scheme: ``u <- W v / |W v|, v <- W^T u / |W^T u|``, ``sigma = u^T W v``).

* ``pfunc vmap``: :func:`pfunc.power.power_iteration` and :func:`pfunc.power.sigma`
  in one ``torch.func.vmap`` call over the ``(K, n, n)`` stack;
* ``pfunc loop``: the same functions in a Python loop over the K matrices;
* ``torch loop``: K ``Linear(n, n)`` layers under torch's ``spectral_norm`` (training
  mode, ``n_power_iterations`` set), their ``.weight`` read in a loop;
* ``floor``: the batched iteration written by hand with ``@`` on the stack.

Inputs: ``W ~ N(0, 1/n)``, ``u, v`` random unit vectors; forward only, under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations as torch_parametrizations

from pfunc import power

from .comparison import Comparison, Variant
from .sizes import Sizes
from .timing import synchronizer

__all__ = ["comparisons", "normalize_one", "floor_batched", "Problem", "problem"]

FAMILY_NAME = "power_iteration"
EPS = 1e-12


def normalize_one(W: Tensor, u: Tensor, v: Tensor, n_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(W / sigma, u, v)`` for one matrix, with pfunc's pure power iteration."""
    u, v = power.power_iteration(W, u, v, n_iterations, EPS)
    return W / power.sigma(W, u, v), u, v


def floor_batched(Ws: Tensor, us: Tensor, vs: Tensor, n_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """The hand-written batched version on ``(K, n, n)``, ``(K, n)``, ``(K, n)``."""
    u, v = us, vs
    for _ in range(n_iterations):
        u = (Ws @ v.unsqueeze(-1)).squeeze(-1)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(EPS)
        v = (Ws.mT @ u.unsqueeze(-1)).squeeze(-1)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)
    sigma = (u.unsqueeze(-2) @ Ws @ v.unsqueeze(-1)).squeeze(-1)
    return Ws / sigma.unsqueeze(-1), u, v


def _torch_layers(Ws: Tensor, us: Tensor, vs: Tensor, n_iterations: int) -> list[nn.Module]:
    layers = []
    for W, u, v in zip(Ws, us, vs):
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False).to(W.device)
        torch_parametrizations.spectral_norm(layer, n_power_iterations=n_iterations, eps=EPS)
        with torch.no_grad():
            layer.parametrizations.weight.original.copy_(W)
            layer.parametrizations.weight[0]._u.copy_(u)
            layer.parametrizations.weight[0]._v.copy_(v)
        layers.append(layer.train())
    return layers


@dataclass
class Problem:
    """The stack ``Ws (K, n, n)``, start vectors ``us, vs (K, n)``, and K torch layers holding the same numbers."""

    Ws: Tensor
    us: Tensor
    vs: Tensor
    n_iterations: int
    layers: list[nn.Module]

    def torch_weights(self) -> Tensor:
        """torch's loop: every layer's spectrally normalised ``.weight``, stacked."""
        return torch.stack([layer.weight for layer in self.layers])

    def torch_view(self, Wn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """torch's result as ``(W / sigma, u, v)``, the vectors read from the layers' buffers."""
        return (
            Wn,
            torch.stack([layer.parametrizations.weight[0]._u for layer in self.layers]),
            torch.stack([layer.parametrizations.weight[0]._v for layer in self.layers]),
        )


def problem(sizes: Sizes, n_iterations: int, device: torch.device) -> Problem:
    """``power_count`` matrices ``W ~ N(0, 1/n)`` of size ``power_size``, random unit ``u, v``."""
    K, n = sizes.power_count, sizes.power_size
    g = torch.Generator().manual_seed(4)
    Ws = (torch.randn(K, n, n, generator=g) / n**0.5).to(device)
    us = torch.nn.functional.normalize(torch.randn(K, n, generator=g), dim=-1).to(device)
    vs = torch.nn.functional.normalize(torch.randn(K, n, generator=g), dim=-1).to(device)
    return Problem(Ws, us, vs, n_iterations, _torch_layers(Ws, us, vs, n_iterations))


def comparison(sizes: Sizes, n_iterations: int, device: torch.device) -> Comparison:
    """The row for ``n_iterations`` iterations per call."""
    pb = problem(sizes, n_iterations, device)
    Ws, us, vs, K = pb.Ws, pb.us, pb.vs, sizes.power_count
    vmapped = torch.func.vmap(lambda W, u, v: normalize_one(W, u, v, n_iterations))

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    def pfunc_loop():
        outs = [normalize_one(Ws[k], us[k], vs[k], n_iterations) for k in range(K)]
        return tuple(torch.stack(x) for x in zip(*outs))

    return Comparison(
        family=FAMILY_NAME,
        labels={"K": str(K), "size": f"{sizes.power_size}x{sizes.power_size}", "iterations": str(n_iterations)},
        variants={
            "floor": Variant(no_grad(lambda: floor_batched(Ws, us, vs, n_iterations)), tuple),
            "torch loop": Variant(no_grad(pb.torch_weights), pb.torch_view),
            "pfunc loop": Variant(no_grad(pfunc_loop), tuple),
            "pfunc vmap": Variant(no_grad(lambda: vmapped(Ws, us, vs)), tuple),
        },
        reference="floor",
        ratios=(("pfunc vmap", "pfunc loop"), ("pfunc vmap", "torch loop"), ("pfunc vmap", "floor")),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """One row per iteration count."""
    device = torch.device(device)
    for n_iterations in sizes.power_iterations:
        yield comparison(sizes, n_iterations, device)
