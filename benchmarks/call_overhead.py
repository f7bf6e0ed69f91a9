"""Item 7: the cost of a call itself, on a deep model of tiny layers where it dominates.

``depth`` blocks of ``Linear(8, 8)`` (and ReLU, or BatchNorm1d for the buffers' copy-on-write),
batch 4, forward under ``torch.no_grad()``, nothing parametrized: what is left is the machinery.

* ``module``: the plain module called with its own tensors (the floor: no framework at all);
* ``functional_call``: ``torch.func.functional_call(module, values, x)``, which swaps the values
  into the module's own dicts for the call (borrowing it);
* ``pfunc``: ``net(params, state, x, training=...)``: checks, materialise, a private shadow,
  buffers as copy-on-write clones, the changed ones returned;
* ``pfunc apply``: ``net.apply(values, x)`` with values materialised once (the cached path).

``overhead`` is ``pfunc - module`` per call, and per tensor of the model.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

import torch
from torch import nn

import pfunc as pf

from .comparison import Comparison, Variant
from .report import fmt_seconds
from .sizes import Sizes
from .timing import Timing, synchronizer

__all__ = ["comparisons"]

FAMILY_NAME = "call_overhead"
WIDTH, BATCH = 8, 4


def _model(kind: str, depth: int) -> nn.Sequential:
    second = (lambda: nn.ReLU()) if kind == "Linear+ReLU" else (lambda: nn.BatchNorm1d(WIDTH))
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(WIDTH, WIDTH), second())])


def _comparison(kind: str, depth: int, training: bool, device: torch.device) -> Comparison:
    torch.manual_seed(0)
    model = _model(kind, depth).to(device).train(training)
    net = pf.parametrize(model, {})
    params, state = net.init()
    values, _ = net.materialize(params, state)
    floor_module = copy.deepcopy(model)  # its BatchNorm statistics move as the benchmark runs it
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1)).to(device)
    n_tensors = len(params) + len(state)

    def module_() -> Any:
        with torch.no_grad():
            return floor_module(x)

    def functional_call_() -> Any:
        with torch.no_grad():
            return torch.func.functional_call(model, values, (x,))

    def pfunc_() -> Any:
        with torch.no_grad():
            return net(params, state, x, training=training)[0]

    def pfunc_apply() -> Any:
        with torch.no_grad():
            return net.apply(values, x, training=training)

    def overhead(timing: Optional[Timing]) -> dict[str, str]:
        if timing is None:
            return {}
        per_call = timing.medians["pfunc"] - timing.medians["module"]
        return {"overhead": f"{fmt_seconds(per_call)} ({fmt_seconds(per_call / n_tensors)} per tensor)"}

    return Comparison(
        family=FAMILY_NAME,
        labels={"model": f"{depth} x {kind}", "tensors": str(n_tensors), "mode": "train" if training else "eval"},
        variants={
            "module": Variant(module_),
            "functional_call": Variant(functional_call_),
            "pfunc": Variant(pfunc_),
            "pfunc apply": Variant(pfunc_apply),
        },
        reference="functional_call",
        ratios=(("pfunc", "module"), ("pfunc apply", "module"), ("functional_call", "module"), ("pfunc", "functional_call")),
        rtol=1e-5,
        atol=1e-6,
        sync=synchronizer(device),
        after=overhead,
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """The item-7 rows: 20 x (Linear + ReLU) and 10 x (Linear + BatchNorm1d), eval and train."""
    device = torch.device(device)
    for kind, depth in (("Linear+ReLU", 20), ("Linear+BatchNorm1d", 10)):
        for training in (False, True):
            yield _comparison(kind, depth, training, device)
