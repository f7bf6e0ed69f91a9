"""Item 2: explicit caching. An RNN reuses one orthogonal ``rnn_width`` square kernel for
``rnn_steps`` steps: ``h <- tanh(W h + x_t)``.

* ``floor``: ``W = base @ matrix_exp(A)`` computed once by hand, then the loop;
* ``pfunc``: ``values = net.materialize(...)`` once, then ``net.apply(values, xs)`` (the
  whole loop runs with the materialised kernel);
* ``torch cached``: the torch-parametrized module called inside ``parametrize.cached()``;
* ``torch``: the same module called plainly, so every step recomputes the kernel
  (what a torch user gets without ``cached()``).

``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` differentiates ``mean(h_T**2)``
through all steps.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

from .comparison import Comparison, Variant
from .layers import loss_of
from .sizes import Sizes
from .timing import synchronizer
from .twins import FAMILIES, Twins, build_twins

__all__ = ["OrthogonalRNN", "comparisons", "rnn_twins"]

FAMILY_NAME = "caching"


class OrthogonalRNN(nn.Module):
    """``h_T`` of ``h_t = tanh(cell(h_{t-1}) + x_t)``, ``h_0 = 0``; ``xs`` is ``(steps, batch, width)``."""

    def __init__(self, width: int):
        super().__init__()
        self.cell = nn.Linear(width, width, bias=False)

    def forward(self, xs: Tensor) -> Tensor:
        h = xs.new_zeros(xs.shape[1:])
        for x in xs.unbind(0):
            h = torch.tanh(self.cell(h) + x)
        return h


def floor_rnn(t: dict[str, Tensor], xs: Tensor) -> Tensor:
    """The hand-written RNN: the orthogonal kernel once, then the loop."""
    W, _ = FAMILIES["Orthogonal"].floor(t, "cell.parametrizations.weight", False)
    h = xs.new_zeros(xs.shape[1:])
    for x in xs.unbind(0):
        h = torch.tanh(F.linear(h, W) + x)
    return h


def rnn_twins(sizes: Sizes, device: torch.device) -> Twins:
    """The RNN with an orthogonal cell kernel: torch twin, pfunc net, floor tensors."""
    return build_twins(lambda: OrthogonalRNN(sizes.rnn_width), ["cell.weight"], FAMILIES["Orthogonal"], device=device)


def _inputs(sizes: Sizes, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(sizes.rnn_steps, sizes.rnn_batch, sizes.rnn_width, generator=g).to(device)


def comparison(sizes: Sizes, device: torch.device, backward: bool) -> Comparison:
    """One row: ``fwd`` (no grad) or ``fwd+bwd`` of the RNN, four ways."""
    tw = rnn_twins(sizes, device)
    xs = _inputs(sizes, device)
    twin, net, params, state, t = tw.torch_module, tw.net, tw.params, tw.state, tw.floor_tensors
    lists = {"floor": tw.floor_params(), "torch": tw.torch_params(), "torch cached": tw.torch_params(), "pfunc": tw.pfunc_params()}

    def pfunc_() -> Tensor:
        values, _ = net.materialize(params, state, training=True)
        return net.apply(values, xs)

    def torch_cached() -> Tensor:
        with torch_parametrize.cached():
            return twin(xs)

    forwards = {"floor": lambda: floor_rnn(t, xs), "pfunc": pfunc_, "torch cached": torch_cached, "torch": lambda: twin(xs)}

    def timed(name: str):
        fwd = forwards[name]
        if backward:
            plist = lists[name]

            def run() -> Any:
                h = fwd()
                return h, torch.autograd.grad(loss_of(h), plist)

            return Variant(run, lambda r: {"out": r[0], "grads": list(r[1])})

        def run_no_grad() -> Any:
            with torch.no_grad():
                return fwd()

        return Variant(run_no_grad)

    return Comparison(
        family=FAMILY_NAME,
        labels={"kernel": f"Orthogonal {sizes.rnn_width}x{sizes.rnn_width}", "steps": str(sizes.rnn_steps), "pass": "fwd+bwd" if backward else "fwd"},
        variants={name: timed(name) for name in forwards},
        reference="floor",
        ratios=(("pfunc", "floor"), ("pfunc", "torch cached"), ("pfunc", "torch")),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """The item-2 rows: forward and forward+backward."""
    device = torch.device(device)
    for backward in (False, True):
        yield comparison(sizes, device, backward)
