"""Item 1: a parametrized layer and an MLP, forward and forward+backward, train and eval.

Each row runs the same model three (four) ways on the same input ``x (batch, width)``:

* ``floor``: a hand-written pure function of the same math (``F.linear(x, sym(W), b)``...);
* ``torch``: the module parametrized in place by ``torch.nn.utils.parametrize``, called;
* ``pfunc``: ``net(params, state, x, training=...)`` (materialise + ``functional_call``);
* ``pfunc func.grad`` (fwd+bwd only): the same through ``torch.func.grad`` instead of autograd;
* ``pfunc pf.grad`` (fwd+bwd only): the same through :func:`pfunc.grad` (``torch.func.grad``'s
  signature and results, computed by ``torch.autograd.grad`` on fresh leaves).

``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` computes ``mean(out**2)`` and its
gradients with ``torch.autograd.grad`` (nothing accumulates in ``.grad``). The
models: ``layer`` is one ``Linear(width, width)``; ``MLP`` is ``depth`` of them with
ReLU between, every weight parametrized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pfunc as pf

from .comparison import Comparison, Variant
from .sizes import Sizes
from .timing import synchronizer
from .twins import FAMILIES, Family, build_twins

__all__ = ["MODELS", "Model", "comparisons", "loss_of"]

FAMILY_NAME = "layers"


def loss_of(out: Tensor) -> Tensor:
    """The scalar every fwd+bwd row differentiates: ``mean(out**2)``."""
    return out.square().mean()


@dataclass(frozen=True)
class Model:
    """A model to parametrize: how to build it, which weights get the parametrization,
    and the hand-written forward of the same math."""

    name: str
    make: Callable[[Sizes], nn.Module]
    names: Callable[[Sizes], list[str]]
    floor: Callable[[Mapping[str, Tensor], Tensor, Family, bool, Sizes], tuple[Tensor, dict[str, Tensor]]]


def _mlp(sizes: Sizes) -> nn.Sequential:
    layers: list[nn.Module] = []
    for j in range(sizes.depth):
        layers.append(nn.Linear(sizes.width, sizes.width))
        if j < sizes.depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _layer_floor(t: Mapping[str, Tensor], x: Tensor, family: Family, training: bool, sizes: Sizes) -> tuple[Tensor, dict[str, Tensor]]:
    W, new = family.floor(t, "parametrizations.weight", training)
    return F.linear(x, W, t["bias"]), new


def _mlp_floor(t: Mapping[str, Tensor], x: Tensor, family: Family, training: bool, sizes: Sizes) -> tuple[Tensor, dict[str, Tensor]]:
    new_state: dict[str, Tensor] = {}
    for j in range(sizes.depth):
        W, new = family.floor(t, f"{2 * j}.parametrizations.weight", training)
        new_state.update(new)
        x = F.linear(x, W, t[f"{2 * j}.bias"])
        if j < sizes.depth - 1:
            x = torch.relu(x)
    return x, new_state


MODELS = (
    Model("layer", lambda s: nn.Linear(s.width, s.width), lambda s: ["weight"], _layer_floor),
    Model("MLP", _mlp, lambda s: [f"{2 * j}.weight" for j in range(s.depth)], _mlp_floor),
)


def _state_view(keys: tuple[str, ...], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: state[k] for k in keys}


def forward_comparison(model: Model, family: Family, training: bool, sizes: Sizes, device: torch.device) -> Comparison:
    """``fwd`` row: the three forwards under ``torch.no_grad()``."""
    tw = build_twins(lambda: model.make(sizes), model.names(sizes), family, device=device)
    tw.torch_module.train(training)
    x = torch.randn(sizes.batch, sizes.width, generator=torch.Generator().manual_seed(1)).to(device)
    keys = tuple(sorted(tw.state)) if (family.stateful_in_training and training) else ()
    twin, net, params, state, t = tw.torch_module, tw.net, tw.params, tw.state, tw.floor_tensors

    def floor() -> Any:
        with torch.no_grad():
            return model.floor(t, x, family, training, sizes)

    def torch_() -> Any:
        with torch.no_grad():
            return twin(x)

    def pfunc_() -> Any:
        with torch.no_grad():
            return net(params, state, x, training=training)

    buffers = dict(twin.named_buffers())
    return Comparison(
        family=FAMILY_NAME,
        labels=_labels(model, family, training, "fwd"),
        variants={
            "floor": Variant(floor, lambda r: {"out": r[0], "state": _state_view(keys, r[1])}),
            "torch": Variant(torch_, lambda r: {"out": r, "state": _state_view(keys, buffers)}),
            "pfunc": Variant(pfunc_, lambda r: {"out": r[0], "state": _state_view(keys, r[1])}),
        },
        reference="floor",
        ratios=(("pfunc", "floor"), ("pfunc", "torch"), ("torch", "floor")),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
    )


def backward_comparison(model: Model, family: Family, training: bool, sizes: Sizes, device: torch.device) -> Comparison:
    """``fwd+bwd`` row: forward, ``mean(out**2)``, gradients of every parameter."""
    tw = build_twins(lambda: model.make(sizes), model.names(sizes), family, device=device)
    tw.torch_module.train(training)
    x = torch.randn(sizes.batch, sizes.width, generator=torch.Generator().manual_seed(1)).to(device)
    keys = tuple(sorted(tw.state)) if (family.stateful_in_training and training) else ()
    twin, net, params, state, t = tw.torch_module, tw.net, tw.params, tw.state, tw.floor_tensors
    floor_params, torch_params, pfunc_params = tw.floor_params(), tw.torch_params(), tw.pfunc_params()

    def floor() -> Any:
        out, new = model.floor(t, x, family, training, sizes)
        return out, torch.autograd.grad(loss_of(out), floor_params), new

    def torch_() -> Any:
        out = twin(x)
        return out, torch.autograd.grad(loss_of(out), torch_params)

    def pfunc_() -> Any:
        out, new = net(params, state, x, training=training)
        return out, torch.autograd.grad(loss_of(out), pfunc_params), new

    def loss_fn(p: dict[str, Tensor], s: dict[str, Tensor]) -> tuple[Tensor, Any]:
        out, new = net(p, s, x, training=training)
        return loss_of(out), (out, new)

    grad_fn = torch.func.grad(loss_fn, has_aux=True)
    pf_grad_fn = pf.grad(loss_fn, has_aux=True)

    def pfunc_func_grad() -> Any:
        return grad_fn(params, state)

    def pfunc_pf_grad() -> Any:
        return pf_grad_fn(params, state)

    buffers = dict(twin.named_buffers())
    pkeys = tw.param_keys

    def grad_view(r: Any) -> dict[str, Any]:
        return {"out": r[1][0], "grads": [r[0][k] for k in pkeys], "state": _state_view(keys, r[1][1])}

    return Comparison(
        family=FAMILY_NAME,
        labels=_labels(model, family, training, "fwd+bwd"),
        variants={
            "floor": Variant(floor, lambda r: {"out": r[0], "grads": list(r[1]), "state": _state_view(keys, r[2])}),
            "torch": Variant(torch_, lambda r: {"out": r[0], "grads": list(r[1]), "state": _state_view(keys, buffers)}),
            "pfunc": Variant(pfunc_, lambda r: {"out": r[0], "grads": list(r[1]), "state": _state_view(keys, r[2])}),
            "pfunc func.grad": Variant(pfunc_func_grad, grad_view),
            "pfunc pf.grad": Variant(pfunc_pf_grad, grad_view),
        },
        reference="floor",
        ratios=(
            ("pfunc", "floor"),
            ("pfunc", "torch"),
            ("torch", "floor"),
            ("pfunc func.grad", "floor"),
            ("pfunc pf.grad", "floor"),
            ("pfunc pf.grad", "pfunc"),
        ),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
    )


def _labels(model: Model, family: Family, training: bool, pass_: str) -> dict[str, str]:
    return {"model": model.name, "parametrization": family.name, "mode": "train" if training else "eval", "pass": pass_}


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """Every item-1 row: model x parametrization x (train, eval) x (fwd, fwd+bwd)."""
    device = torch.device(device)
    for model in MODELS:
        for family in FAMILIES.values():
            for training in (True, False):
                yield forward_comparison(model, family, training, sizes, device)
                yield backward_comparison(model, family, training, sizes, device)
