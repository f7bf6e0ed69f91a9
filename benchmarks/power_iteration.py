"""Item 4: spectral normalisation of K matrices at once, ``W_k / sigma_k`` with ``sigma_k`` by
power iteration (torch's scheme: ``u <- W v / |W v|, v <- W^T u / |W^T u|``, ``sigma = u^T W v``).

* ``pfunc vmap``: :func:`pfunc.power.power_iteration` and :func:`pfunc.power.sigma`
  in one ``torch.func.vmap`` call over the ``(K, n, n)`` stack;
* ``pfunc loop``: the same functions in a Python loop over the K matrices;
* ``torch loop``: K ``Linear(n, n)`` layers under torch's ``spectral_norm`` (training
  mode, ``n_power_iterations`` set), their ``.weight`` read in a loop;
* ``floor``: the batched iteration written by hand with ``@`` on the stack (one-column
  products, ``W @ v[..., None]``: what ``vmap`` makes of ``torch.mv``);
* ``floor rows``: the same with one-row products (``v[:, None] @ W.mT``), the batched
  product pfunc's kernel choice picks on CPU for stacks that fit the caches;
* ``floor rows vmap``: the one-matrix row form written by hand (``v @ W.mT``, ``u @ W``) in
  one ``torch.func.vmap`` call: the best the same ``vmap`` runs without pfunc (its fixed cost,
  about 40 µs a call on CPU, and its op-by-op batching included).

Rows: ``power_count`` matrices of ``power_size`` square, and of each of ``power_extra_shapes``
(``h x w``). Inputs: ``W ~ N(0, 1/w)``, ``u, v`` random unit vectors; forward only, under
``torch.no_grad()``. ``python -m benchmarks.power_kernels`` sweeps the kernels alone over more sizes.
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

__all__ = ["comparisons", "normalize_one", "floor_batched", "floor_batched_rows", "floor_one_rows", "Problem", "problem"]

FAMILY_NAME = "power_iteration"
EPS = 1e-12


def normalize_one(W: Tensor, u: Tensor, v: Tensor, n_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(W / sigma, u, v)`` for one matrix, with pfunc's pure power iteration."""
    u, v = power.power_iteration(W, u, v, n_iterations, EPS)
    return W / power.sigma(W, u, v), u, v


def floor_batched(Ws: Tensor, us: Tensor, vs: Tensor, n_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """The hand-written batched version on ``(K, h, w)``, ``(K, h)``, ``(K, w)``: one-column products,
    the vectors kept as ``(K, n, 1)`` columns throughout."""
    u, v, Wt = us.unsqueeze(-1), vs.unsqueeze(-1), Ws.mT
    for _ in range(n_iterations):
        u = torch.bmm(Ws, v)
        u = u / u.norm(dim=-2, keepdim=True).clamp_min(EPS)
        v = torch.bmm(Wt, u)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(EPS)
    sigma = (u * torch.bmm(Ws, v)).sum(-2, keepdim=True)
    return Ws / sigma, u.squeeze(-1), v.squeeze(-1)


def floor_batched_rows(Ws: Tensor, us: Tensor, vs: Tensor, n_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`floor_batched` with one-row products (``v^T W^T``, ``u^T W``), the vectors kept as ``(K, 1, n)`` rows."""
    u, v, Wt = us.unsqueeze(-2), vs.unsqueeze(-2), Ws.mT
    for _ in range(n_iterations):
        u = torch.bmm(v, Wt)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(EPS)
        v = torch.bmm(u, Ws)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)
    sigma = (torch.bmm(v, Wt) * u).sum(-1, keepdim=True)
    return Ws / sigma, u.squeeze(-2), v.squeeze(-2)


def floor_one_rows(W: Tensor, u: Tensor, v: Tensor, n_iterations: int) -> tuple[Tensor, Tensor, Tensor]:
    """One matrix by hand in the row form (``v @ W.mT``, ``u @ W``): what ``vmap`` batches into
    :func:`floor_batched_rows`' products, op by op."""
    Wt = W.mT
    for _ in range(n_iterations):
        u = v @ Wt
        u = u / u.norm().clamp_min(EPS)
        v = u @ W
        v = v / v.norm().clamp_min(EPS)
    return W / torch.dot(u, v @ Wt), u, v


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
    """The stack ``Ws (K, h, w)``, start vectors ``us (K, h)``, ``vs (K, w)``, and K torch layers holding the same numbers."""

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


def problem(sizes: Sizes, n_iterations: int, device: torch.device, shape: tuple[int, int] | None = None) -> Problem:
    """``power_count`` matrices ``W ~ N(0, 1/w)`` of ``shape`` (default ``power_size`` square), random unit ``u, v``."""
    K = sizes.power_count
    h, w = shape or (sizes.power_size, sizes.power_size)
    g = torch.Generator().manual_seed(4)
    Ws = (torch.randn(K, h, w, generator=g) / w**0.5).to(device)
    us = torch.nn.functional.normalize(torch.randn(K, h, generator=g), dim=-1).to(device)
    vs = torch.nn.functional.normalize(torch.randn(K, w, generator=g), dim=-1).to(device)
    return Problem(Ws, us, vs, n_iterations, _torch_layers(Ws, us, vs, n_iterations))


def comparison(sizes: Sizes, n_iterations: int, device: torch.device, shape: tuple[int, int] | None = None) -> Comparison:
    """The row for ``n_iterations`` iterations per call on matrices of ``shape``."""
    pb = problem(sizes, n_iterations, device, shape)
    h, w = pb.Ws.shape[-2:]
    Ws, us, vs, K = pb.Ws, pb.us, pb.vs, sizes.power_count
    vmapped = torch.func.vmap(lambda W, u, v: normalize_one(W, u, v, n_iterations))
    vmapped_floor = torch.func.vmap(lambda W, u, v: floor_one_rows(W, u, v, n_iterations))

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
        labels={"K": str(K), "size": f"{h}x{w}", "iterations": str(n_iterations)},
        variants={
            "floor": Variant(no_grad(lambda: floor_batched(Ws, us, vs, n_iterations)), tuple),
            "floor rows": Variant(no_grad(lambda: floor_batched_rows(Ws, us, vs, n_iterations)), tuple),
            "torch loop": Variant(no_grad(pb.torch_weights), pb.torch_view),
            "pfunc loop": Variant(no_grad(pfunc_loop), tuple),
            "floor rows vmap": Variant(no_grad(lambda: vmapped_floor(Ws, us, vs)), tuple),
            "pfunc vmap": Variant(no_grad(lambda: vmapped(Ws, us, vs)), tuple),
        },
        reference="floor",
        ratios=(
            ("pfunc vmap", "pfunc loop"),
            ("pfunc vmap", "torch loop"),
            ("pfunc vmap", "floor"),
            ("pfunc vmap", "floor rows"),
            ("pfunc vmap", "floor rows vmap"),
        ),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """One row per shape and iteration count."""
    device = torch.device(device)
    for shape in ((sizes.power_size, sizes.power_size), *sizes.power_extra_shapes):
        for n_iterations in sizes.power_iterations:
            yield comparison(sizes, n_iterations, device, shape)
