"""Where a call's time goes on the sub-millisecond eager rows (items 1, 2): a profile, stage by stage.

Each row takes one of the rows the floor goal misses and times, interleaved (one thread, CPU
clock, medians), the pieces that add up to pfunc's call and to the floor's:

* ``floor``: the hand-written function (the row's ``floor`` variant);
* ``floor: parametrization``: its weight alone (``W / u.(W v)`` for spectral norm);
* ``floor: layer math``: its layer alone on that weight (``F.linear``, the RNN's loop of ``F.linear``);
* ``pfunc``: ``net(params, state, x, training=...)`` (the row's ``pfunc`` variant);
* ``pfunc: materialize``: ``net.materialize(params, state)``, the parametrized values;
* ``pfunc: checks``: of which ``net.check_keys`` (keys, types, shapes);
* ``pfunc: module on shadow``: the module run on a private shadow holding those values
  (the call's second half, ``ShadowPool.run``);
* ``module with its own tensors``: a plain copy of the module holding the same values, called.

The differences are the costs: ``materialize - parametrization`` is pfunc's per-call plumbing
and checks, ``module on shadow - module with its own tensors`` the shadow (private dicts, copy-on-write
hand-over), and ``module with its own tensors - layer math`` what ``nn.Module.__call__`` costs over
calling ``F.linear`` directly, which the floor does and a module's own code cannot.

Run ``python -m benchmarks.call_stages`` (about 30 s); ``--quick`` for a short look.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .caching import _inputs, floor_rnn, rnn_twins
from .layers import MODELS
from .sizes import Sizes
from .timing import measure
from .twins import FAMILIES, build_twins

__all__ = ["Stages", "rows", "profile", "main"]


@dataclass
class Stages:
    """One row: the thunks of every stage, by the names in this module's docstring."""

    name: str
    thunks: dict[str, Callable[[], Any]]


def _holding(module: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    """``module`` (plain, unparametrized) holding ``values``: every tensor by its plain name."""
    module.load_state_dict(values)
    return module


def _layer_row(family: str, training: bool, sizes: Sizes) -> Stages:
    model = MODELS[0]  # one Linear(width, width)
    fam = FAMILIES[family]
    tw = build_twins(lambda: model.make(sizes), model.names(sizes), fam, device=torch.device("cpu"))
    net, params, state, t = tw.net, tw.params, tw.state, tw.floor_tensors
    x = torch.randn(sizes.batch, sizes.width, generator=torch.Generator().manual_seed(1))
    values, _ = net.materialize(params, state, training=training)
    plain = _holding(model.make(sizes), values)
    W, b = values["weight"], values["bias"]
    return Stages(
        f"layer, {family}, {'train' if training else 'eval'}, fwd",
        {
            "floor": lambda: model.floor(t, x, fam, training, sizes),
            "floor: parametrization": lambda: fam.floor(t, "parametrizations.weight", training),
            "floor: layer math": lambda: F.linear(x, W, b),
            "pfunc": lambda: net(params, state, x, training=training),
            "pfunc: materialize": lambda: net.materialize(params, state, training=training),
            "pfunc: checks": lambda: net.check_keys(params, state),
            "pfunc: module on shadow": lambda: net._pool.run(values, (x,), {}, training=training, private=net._private_values),
            "module with its own tensors": lambda: plain(x),
        },
    )


def _rnn_row(sizes: Sizes) -> Stages:
    tw = rnn_twins(sizes, torch.device("cpu"))
    net, params, state, t = tw.net, tw.params, tw.state, tw.floor_tensors
    xs = _inputs(sizes, torch.device("cpu"))
    values, _ = net.materialize(params, state, training=True)
    plain = _holding(type(tw.torch_module)(sizes.rnn_width), values)
    W = values["cell.weight"]

    def layer_math() -> Tensor:
        h = xs.new_zeros(xs.shape[1:])
        for x in xs.unbind(0):
            h = torch.tanh(F.linear(h, W) + x)
        return h

    def pfunc_() -> Tensor:
        v, _ = net.materialize(params, state, training=True)
        return net.apply(v, xs)

    return Stages(
        f"RNN, Orthogonal {sizes.rnn_width}x{sizes.rnn_width}, {sizes.rnn_steps} steps, fwd",
        {
            "floor": lambda: floor_rnn(t, xs),
            "floor: parametrization": lambda: FAMILIES["Orthogonal"].floor(t, "cell.parametrizations.weight", False),
            "floor: layer math": layer_math,
            "pfunc": pfunc_,
            "pfunc: materialize": lambda: net.materialize(params, state, training=True),
            "pfunc: checks": lambda: net.check_keys(params, state),
            "pfunc: module on shadow": lambda: net._pool.run(values, (xs,), {}, private=net._private_values),
            "module with its own tensors": lambda: plain(xs),
        },
    )


def rows(sizes: Sizes) -> list[Stages]:
    """The profiled rows: item 1's one-layer spectral-norm forwards (eval, train) and item 2's cached RNN forward."""
    return [_layer_row("SpectralNorm", False, sizes), _layer_row("SpectralNorm", True, sizes), _rnn_row(sizes)]


def profile(stages: Stages, budget_s: float = 4.0, min_repeats: int = 15) -> dict[str, float]:
    """``{stage: median seconds}``, every stage timed interleaved, all under one ``torch.no_grad()``
    (the rows' forwards run under it; entering it per call would add ~1 µs to every stage)."""
    with torch.no_grad():
        timing = measure(stages.thunks, budget_s=budget_s, min_repeats=min_repeats, clock="cpu")
    return dict(timing.medians)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s per row instead of 4")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# load: {os.getloadavg()}; torch {torch.__version__}; 1 thread; process CPU time; medians")
    for stages in rows(Sizes()):
        med = profile(stages, budget_s=0.5 if args.quick else 4.0)
        us = {k: v * 1e6 for k, v in med.items()}
        print(f"\n**{stages.name}**\n\n| stage | µs |\n|---|---|")
        for k, v in us.items():
            print(f"| {k} | {v:.1f} |")
        gap = us["pfunc"] - us["floor"]
        parts = {
            "materialize - parametrization (plumbing, checks)": us["pfunc: materialize"] - us["floor: parametrization"],
            "module on shadow - module with its own tensors (the shadow)": us["pfunc: module on shadow"] - us["module with its own tensors"],
            "module with its own tensors - layer math (nn.Module calls)": us["module with its own tensors"] - us["floor: layer math"],
        }
        print(f"\npfunc - floor: **{gap:.1f} µs** ({us['pfunc'] / us['floor']:.2f}x); of it: "
              + "; ".join(f"{k} {v:.1f} µs" for k, v in parts.items()), flush=True)
    print(f"\n# load: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
