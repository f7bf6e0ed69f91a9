"""Item 9: one SGD step of N low-rank adapters (LoRA) on one frozen MLP.

The base is ``Linear(in, hidden) - Tanh - Linear(hidden, hidden) - Tanh - Linear(hidden, out)``,
frozen; every weight carries a rank-``r`` adapter ``W0 + B @ A`` (Hu et al.'s LoRA, peft's
initialisation: ``A`` kaiming-uniform, ``B`` zero; here ``B`` is set to small random values so the
gradients of ``A`` are not zero). Each member has its own ``A``, ``B``, batch ``(batch, in)`` and MSE
target; SGD with ``lr = 0.01`` on the adapters only.

* ``pfunc ensemble``: :func:`pfunc.ensemble.grad_and_value` over params whose base entries are
  shared (``in_dims`` ``None``: one copy, read by every member) and whose adapters are stacked: one
  vmapped forward, one backward, gradients for the adapters only;
* ``pfunc loop``: a Python loop of :func:`pfunc.grad_and_value` over the N single-adapter nets;
* ``torch loop``: N copies of the base, each with a torch ``nn.Module`` LoRA registered by
  ``torch.nn.utils.parametrize.register_parametrization`` (three originals, the base one frozen),
  forward + ``backward()`` each, then one ``torch.optim.SGD(..., foreach=True).step()``.

All start from the same numbers and are checked to give the same losses and new adapters.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

import pfunc as pf
from pfunc.parametrizations import LowRankAdapter

from .comparison import Comparison, Variant
from .ensembles import torch_loop_step
from .sizes import Sizes
from .timing import synchronizer

__all__ = ["comparisons", "TorchLowRank", "LR", "RANK"]

FAMILY_NAME = "adapters"
LR = 0.01
RANK = 4
WIDTHS = (32, 128, 32)  # in, hidden, out
WEIGHTS = ("0.weight", "2.weight", "4.weight")


class TorchLowRank(nn.Module):
    """The same adapter as a torch parametrization: ``(W0, A, B) -> W0 + B @ A``."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def forward(self, W0: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return W0 + B @ A

    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return W, W.new_zeros(self.rank, W.shape[1]), W.new_zeros(W.shape[0], self.rank)


def _base() -> nn.Sequential:
    i, h, o = WIDTHS
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, o))


def comparison(sizes: Sizes, n: int, device: torch.device) -> Comparison:
    """The row for ``n`` adapters."""
    base = _base().to(device)
    net = pf.parametrize(base, {w: LowRankAdapter(rank=RANK) for w in WEIGHTS})
    adapter = tuple(sorted(k for k in net.param_keys if k.endswith(("original1", "original2"))))
    shared = {k: None for k in net.param_keys if k not in adapter}
    params, _ = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=n, device="cpu"), reinit=None, in_dims=(shared, 0))
    g = torch.Generator().manual_seed(1)
    for k in adapter:  # B = 0 would give A no gradient: start every adapter off zero
        if k.endswith("original2"):
            params[k] = (0.01 * torch.randn(params[k].shape, generator=g)).to(device).requires_grad_()
    frozen = {k: params[k].detach().requires_grad_(False) for k in shared}
    stacked = {k: params[k].detach().requires_grad_() for k in adapter}
    xs = torch.randn(n, sizes.ensemble_batch, WIDTHS[0], generator=g).to(device)
    ys = torch.randn(n, sizes.ensemble_batch, WIDTHS[2], generator=g).to(device)

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(net(p, {}, x)[0], y)

    members_step = pf.ensemble.grad_and_value(loss, in_dims=({k: None for k in frozen}, 0, 0))

    def pfunc_ensemble() -> tuple[dict[str, Tensor], Tensor]:
        grads, losses = members_step({**frozen, **stacked}, xs, ys)
        with torch.no_grad():
            return {k: stacked[k] - LR * grads[k] for k in adapter}, losses

    solo_step = pf.grad_and_value(lambda a, x, y: loss({**frozen, **a}, x, y))

    def pfunc_loop() -> tuple[dict[str, Tensor], Tensor]:
        news, losses = [], []
        for m in range(n):
            grads, value = solo_step({k: stacked[k][m] for k in adapter}, xs[m], ys[m])
            with torch.no_grad():
                news.append({k: stacked[k][m] - LR * grads[k] for k in adapter})
            losses.append(value)
        return pf.tree.stack(news), torch.stack(losses)

    modules = []
    for m in range(n):
        module = copy.deepcopy(base)
        for w in WEIGHTS:
            owner, _, leaf = w.rpartition(".")
            torch_parametrize.register_parametrization(module.get_submodule(owner), leaf, TorchLowRank(RANK))
        module.load_state_dict({**frozen, **{k: stacked[k][m].detach() for k in adapter}})
        for name, p in module.named_parameters():
            p.requires_grad_(name in adapter)
        modules.append(module)
    optimizer = torch.optim.SGD([p for module in modules for p in module.parameters() if p.requires_grad], lr=LR, foreach=True)

    torch_loop = torch_loop_step(modules, xs, ys, optimizer)

    def torch_view(losses: Tensor) -> dict[str, Any]:
        named = [dict(module.named_parameters()) for module in modules]
        return {"loss": losses, "adapters": {k: torch.stack([d[k] for d in named]) for k in adapter}}

    view = lambda r: {"loss": r[1], "adapters": r[0]}  # noqa: E731
    return Comparison(
        family=FAMILY_NAME,
        labels={"N": str(n), "base": "-".join(map(str, WIDTHS)), "rank": str(RANK), "batch": str(sizes.ensemble_batch)},
        variants={
            "torch loop": Variant(torch_loop, torch_view),
            "pfunc loop": Variant(pfunc_loop, view),
            "pfunc ensemble": Variant(pfunc_ensemble, view),
        },
        reference="torch loop",
        ratios=(("pfunc ensemble", "torch loop"), ("pfunc ensemble", "pfunc loop"), ("pfunc loop", "torch loop")),
        rtol=1e-4,
        atol=1e-6,
        sync=synchronizer(device),
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """One row per number of adapters (the ensemble sizes of item 3)."""
    device = torch.device(device)
    for n in sizes.ensemble_sizes:
        yield comparison(sizes, n, device)
