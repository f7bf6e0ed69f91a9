"""The compared parametrizations, each in three forms: pfunc's, torch's, and a hand-written floor.

A :class:`Family` knows how to put one parametrization on a weight three ways:

* ``pfunc()``: the value for :func:`pfunc.parametrize`'s spec;
* ``register_torch(module, name)``: the same parametrization registered in place with
  ``torch.nn.utils.parametrize`` (torch's built-ins where torch has one, else the
  ``nn.Module`` a torch user writes, as in torch's parametrization tutorial);
* ``floor(tensors, prefix, training)``: the weight computed by hand, no framework,
  from the torch twin's ``state_dict`` tensors under ``prefix``
  (``"0.parametrizations.weight"``), returning ``(W, new state entries)``.

:func:`build_twins` makes the torch twin and the pfunc net of one module and copies
the twin's tensors into pfunc's ``(params, state)`` by key (pfunc's keys are exactly
the torch twin's ``state_dict`` keys), so all three start from the same numbers.

>>> import torch
>>> t = build_twins(lambda: torch.nn.Linear(4, 4), ["weight"], FAMILIES["Symmetric"])
>>> sorted(t.params)
['bias', 'parametrizations.weight.original']
>>> W, _ = FAMILIES["Symmetric"].floor(t.floor_tensors, "parametrizations.weight", True)
>>> bool(torch.equal(W, t.torch_module.weight))
True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize as torch_parametrize

import pfunc as pf
from pfunc.parametrizations import MatrixExp, Orthogonal, Skew, SpectralNorm, Symmetric, WeightNorm

__all__ = ["Family", "FAMILIES", "Twins", "build_twins", "perturb_originals"]

Floor = Callable[[Mapping[str, Tensor], str, bool], tuple[Tensor, dict[str, Tensor]]]


# ---------------------------------------------------------------- torch-style parametrization modules
class TorchSymmetric(nn.Module):
    """torch tutorial's ``Symmetric``: ``X.triu() + X.triu(1).mT``."""

    def forward(self, X: Tensor) -> Tensor:
        return X.triu() + X.triu(1).mT

    def right_inverse(self, A: Tensor) -> Tensor:
        return A.triu()


class TorchSkew(nn.Module):
    """torch tutorial's ``Skew``: ``A - A.mT`` with ``A = X.triu(1)``."""

    def forward(self, X: Tensor) -> Tensor:
        A = X.triu(1)
        return A - A.mT

    def right_inverse(self, A: Tensor) -> Tensor:
        return A.triu(1)


class TorchMatrixExp(nn.Module):
    """torch tutorial's ``MatrixExponential``."""

    def forward(self, X: Tensor) -> Tensor:
        return torch.linalg.matrix_exp(X)


# ---------------------------------------------------------------- hand-written floors
def _symmetric_floor(t: Mapping[str, Tensor], prefix: str, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
    X = t[f"{prefix}.original"]
    return X.triu() + X.triu(1).mT, {}


def _skew_exp_floor(t: Mapping[str, Tensor], prefix: str, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
    A = t[f"{prefix}.original"].triu(1)
    return torch.linalg.matrix_exp(A - A.mT), {}


def _orthogonal_floor(t: Mapping[str, Tensor], prefix: str, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
    # torch's default for a square real weight: matrix_exp of the skew part, times the base
    X = t[f"{prefix}.original"].tril()
    return t[f"{prefix}.0.base"] @ torch.linalg.matrix_exp(X - X.mT), {}


def _spectral_floor(t: Mapping[str, Tensor], prefix: str, training: bool, eps: float = 1e-12) -> tuple[Tensor, dict[str, Tensor]]:
    W = t[f"{prefix}.original"]
    u, v = t[f"{prefix}.0._u"], t[f"{prefix}.0._v"]
    if training:
        Wd = W.detach()
        u = Wd.mv(v)
        u = u / u.norm().clamp_min(eps)
        v = Wd.mT.mv(u)
        v = v / v.norm().clamp_min(eps)
        new = {f"{prefix}.0._u": u, f"{prefix}.0._v": v}
    else:
        new = {}
    return W / u.dot(W.mv(v)), new


def _weight_norm_floor(t: Mapping[str, Tensor], prefix: str, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
    g, v = t[f"{prefix}.original0"], t[f"{prefix}.original1"]
    return v * (g / torch.linalg.vector_norm(v, dim=tuple(range(1, v.ndim)), keepdim=True)), {}


# ---------------------------------------------------------------- the families
def _register_chain(*makers: Callable[[], nn.Module]) -> Callable[[nn.Module, str], None]:
    def register(module: nn.Module, name: str) -> None:
        for make in makers:
            torch_parametrize.register_parametrization(module, name, make())

    return register


def _register_builtin(fn: Callable[..., nn.Module]) -> Callable[[nn.Module, str], None]:
    def register(module: nn.Module, name: str) -> None:
        fn(module, name)

    return register


@dataclass(frozen=True)
class Family:
    """One parametrization in its pfunc, torch and hand-written forms (see the module docstring).

    ``stateful_in_training``: torch's and pfunc's state changes on a training-mode call
    (spectral norm's power iteration), so training and eval differ in cost.
    ``perturb``: add ``N(0, 1/(3n))`` noise to the registered originals (see
    :func:`perturb_originals`), so inputs look trained rather than freshly registered.
    ``inputs`` says in words what the timed inputs are (matrix_exp's cost depends on them).
    """

    name: str
    pfunc: Callable[[], Any]
    register_torch: Callable[[nn.Module, str], None]
    floor: Floor
    stateful_in_training: bool = False
    perturb: bool = False
    inputs: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "Symmetric",
            lambda: Symmetric(),
            _register_chain(TorchSymmetric),
            _symmetric_floor,
            inputs="original = triu(W) of the layer's default init",
        ),
        Family(
            "Skew+MatrixExp",
            lambda: [Skew(), MatrixExp()],
            _register_chain(TorchSkew, TorchMatrixExp),
            _skew_exp_floor,
            inputs="original = triu(W, 1) of the default init (entries ~U(-1/sqrt(n), 1/sqrt(n)))",
        ),
        Family(
            "Orthogonal",
            lambda: Orthogonal(),
            _register_builtin(torch_parametrizations.orthogonal),
            _orthogonal_floor,
            perturb=True,
            inputs="matrix_exp map with trivialization; original = -I (torch's registration) + N(0, 1/(3n))",
        ),
        Family(
            "SpectralNorm",
            lambda: SpectralNorm(),
            _register_builtin(torch_parametrizations.spectral_norm),
            _spectral_floor,
            stateful_in_training=True,
            inputs="1 power iteration per training call; u, v from torch's registration (15 warm-up iterations)",
        ),
        Family(
            "WeightNorm",
            lambda: WeightNorm(),
            _register_builtin(torch_parametrizations.weight_norm),
            _weight_norm_floor,
            inputs="dim=0; (g, v) = (||W||, W) of the default init",
        ),
    )
}


def perturb_originals(module: nn.Module, family: Family, generator: torch.Generator) -> None:
    """Add ``N(0, 1/(3n))`` noise (``n`` the last dim, the variance of torch's default
    Linear init) to every ``original`` of ``module`` when ``family.perturb``."""
    if not family.perturb:
        return
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".original") or name == "original":
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                p.add_(noise / (3 * p.shape[-1]) ** 0.5)


# ---------------------------------------------------------------- twins
@dataclass
class Twins:
    """The same parametrized model three ways, holding equal numbers.

    ``torch_module`` is parametrized in place by torch; ``net`` with ``params``/``state``
    is pfunc's; ``floor_tensors`` are plain copies of the twin's ``state_dict`` (param
    keys require grad) for the hand-written function. ``param_keys`` is the common order
    in which gradients are reported.
    """

    torch_module: nn.Module
    net: pf.Parametrized
    params: dict[str, Tensor]
    state: dict[str, Tensor]
    floor_tensors: dict[str, Tensor]
    param_keys: tuple[str, ...]

    def torch_params(self) -> list[Tensor]:
        named = dict(self.torch_module.named_parameters())
        return [named[k] for k in self.param_keys]

    def pfunc_params(self) -> list[Tensor]:
        return [self.params[k] for k in self.param_keys]

    def floor_params(self) -> list[Tensor]:
        return [self.floor_tensors[k] for k in self.param_keys]


def copy_into_pfunc(
    net: pf.Parametrized, torch_module: nn.Module
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """pfunc ``(params, state)`` holding copies of ``torch_module``'s tensors, by ``state_dict`` key.

    Raises ``KeyError`` if the keys differ (pfunc's layout promise broken).
    """
    named_params = dict(torch_module.named_parameters())
    named_buffers = dict(torch_module.named_buffers())
    if set(named_params) != set(net.param_keys) or set(named_buffers) != set(net.state_keys):
        raise KeyError(
            "pfunc keys differ from the torch twin's: "
            f"params {sorted(set(net.param_keys) ^ set(named_params))}, "
            f"state {sorted(set(net.state_keys) ^ set(named_buffers))}"
        )
    params = {k: p.detach().clone().requires_grad_(p.requires_grad) for k, p in named_params.items()}
    state = {k: b.detach().clone() for k, b in named_buffers.items()}
    return params, state


def build_twins(
    make_module: Callable[[], nn.Module],
    names: Sequence[str],
    family: Family,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Twins:
    """Build the model (``make_module()`` under ``torch.manual_seed(seed)``) with ``family``
    on every tensor in ``names``: torch twin, pfunc net, floor tensors, all equal."""
    torch.manual_seed(seed)
    plain = make_module().to(device)
    twin = copy.deepcopy(plain)
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = twin.get_submodule(owner_name) if owner_name else twin
        family.register_torch(owner, leaf)
    perturb_originals(twin, family, torch.Generator().manual_seed(seed + 1))
    net = pf.parametrize(plain, {name: family.pfunc() for name in names})
    params, state = copy_into_pfunc(net, twin)
    floor = {k: v.detach().clone().requires_grad_(k in params and params[k].requires_grad) for k, v in twin.state_dict().items()}
    return Twins(twin, net, params, state, floor, tuple(sorted(params)))

