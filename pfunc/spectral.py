"""Spectral norm on a whole model: one spec for every weight of chosen layer types, and its logged singular values.

The whole-model counterpart of Haiku's ``SNParamsTree``: :func:`spectral_norm_spec`
walks a module and returns the ``{tensor name: SpectralNorm}`` spec to give to
:func:`pfunc.parametrize`; :func:`singular_values` reads back what BigGAN-mode
spectral norm logged in ``state`` (BigGAN's ``sv`` buffers, "for logging").

>>> import torch, pfunc as pf
>>> from torch import nn
>>> from pfunc.parametrizations import SpectralNorm
>>> D = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
>>> spec = spectral_norm_spec(D, SpectralNorm.biggan(num_svs=2))
>>> sorted(spec)                                   # biases (1-D) are left alone
['0.weight', '2.weight']
>>> net = pf.parametrize(D, spec)
>>> params, state = net.init(generator=torch.Generator().manual_seed(0))
>>> out, state = net(params, state, torch.randn(8, 2), training=True)
>>> {name: tuple(sv.shape) for name, sv in singular_values(net, state).items()}
{'0.weight': (2,), '2.weight': (2,)}
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from torch import Tensor, nn

from .parametrizations.norm import SpectralNorm
from .parametrize import Parametrized
from .tree import step_key

__all__ = ["spectral_norm_spec", "singular_values", "SPECTRAL_NORM_LAYERS", "is_weight_matrix"]

SPECTRAL_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)
"""The layer types :func:`spectral_norm_spec` looks at by default (all of BigGAN's SN layers and more)."""

Include = Callable[[str, nn.Module, Tensor], bool]


def is_weight_matrix(name: str, layer: nn.Module, tensor: Tensor) -> bool:
    """The default filter: tensors with at least 2 dims (weights, kernels, embedding tables; not biases)."""
    return tensor.ndim >= 2


def spectral_norm_spec(
    module: nn.Module,
    spectral_norm: Optional[SpectralNorm] = None,
    *,
    layer_types: tuple[type[nn.Module], ...] = SPECTRAL_NORM_LAYERS,
    include: Include = is_weight_matrix,
) -> dict[str, SpectralNorm]:
    """``{name: spectral_norm}`` for every parameter of every ``layer_types`` layer in ``module``
    that ``include(name, layer, tensor)`` accepts: the spec to pass to :func:`pfunc.parametrize`.

    ``spectral_norm`` is the parametrization put on each tensor (default ``SpectralNorm()``,
    torch's scheme; ``SpectralNorm.biggan(num_svs, num_itrs, eps=...)`` for BigGAN's); it is
    bound per tensor at registration, so one instance serves every layer. The default
    ``include`` keeps tensors of 2 or more dims, so biases are skipped; to skip
    embeddings too, leave ``nn.Embedding`` out of ``layer_types`` or filter on ``layer``.
    A tensor shared by several layers (tied weights) appears once, under its first name.

    Raises ``ValueError`` when no tensor matches (an empty spec would silently do nothing).

    >>> from torch import nn
    >>> m = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3), "embed": nn.Embedding(10, 8), "fc": nn.Linear(8, 1)})
    >>> sorted(spectral_norm_spec(m))
    ['conv.weight', 'embed.weight', 'fc.weight']
    >>> sorted(spectral_norm_spec(m, include=lambda name, layer, t: t.ndim >= 2 and not isinstance(layer, nn.Embedding)))
    ['conv.weight', 'fc.weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm_spec: module must be an nn.Module, got {type(module).__name__}")
    if spectral_norm is None:
        spectral_norm = SpectralNorm()
    if not isinstance(spectral_norm, SpectralNorm):
        raise TypeError(
            f"spectral_norm_spec: spectral_norm must be a SpectralNorm (e.g. SpectralNorm.biggan(...)), "
            f"got {type(spectral_norm).__name__}"
        )
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if not isinstance(layer_types, tuple) or not layer_types or not all(
        isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types
    ):
        raise TypeError(f"spectral_norm_spec: layer_types must be a non-empty tuple of nn.Module subclasses, got {layer_types!r}")
    if not callable(include):
        raise TypeError(f"spectral_norm_spec: include must be callable (name, layer, tensor) -> bool, got {include!r}")
    spec: dict[str, SpectralNorm] = {}
    seen: set[int] = set()
    for prefix, layer in module.named_modules():
        if not isinstance(layer, layer_types):
            continue
        for leaf, tensor in layer.named_parameters(recurse=False):
            name = f"{prefix}.{leaf}" if prefix else leaf
            if id(tensor) in seen:
                continue
            if include(name, layer, tensor):
                seen.add(id(tensor))
                spec[name] = spectral_norm
    if not spec:
        kinds = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(
            f"spectral_norm_spec: no parameter of {type(module).__name__} matched (layer_types: {kinds}; "
            f"include: {getattr(include, '__name__', include)!r})"
        )
    return spec


def singular_values(net: Parametrized, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{tensor name: sv}``: the singular value estimates that BigGAN-mode spectral norm logged
    in ``state`` at its last training-mode call (``sv`` of shape ``(num_svs,)``, largest first;
    ``(N, num_svs)`` for an ensemble's stacked state). Detached; nothing is computed.

    Only ``SpectralNorm.biggan`` logs them; raises ``ValueError`` when ``net`` has none.
    """
    if not isinstance(net, Parametrized):
        raise TypeError(f"singular_values: net must be a Parametrized (from pfunc.parametrize), got {type(net).__name__}")
    out: dict[str, Tensor] = {}
    for name, chain in net.chains.items():
        for index, step in enumerate(chain.steps):
            fn = step.fn
            if isinstance(fn, SpectralNorm) and fn.mode == "biggan":
                key = step_key(name, index, "sv")
                if key not in net.state_keys:
                    continue  # a 1-D tensor: divided by its norm, no state, nothing logged
                if key not in state:
                    raise KeyError(f"singular_values: state has no '{key}' (build state with net.init())")
                if name in out:
                    raise ValueError(f"singular_values: '{name}' has more than one BigGAN spectral norm in its chain")
                out[name] = state[key].detach()
    if not out:
        raise ValueError(
            "singular_values: no tensor of this net logs singular values; only SpectralNorm.biggan(...) keeps "
            "them in state (torch's scheme keeps only the vectors _u, _v)"
        )
    return out
