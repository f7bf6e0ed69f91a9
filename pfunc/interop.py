"""Moving between pfunc and modules parametrized in place by ``torch.nn.utils.parametrize``.

pfunc's ``params``/``state`` keys are exactly the ``state_dict`` keys of the torch
twin, so conversion is a matter of rebuilding the chains; values move unchanged.

>>> import torch, pfunc as pf
>>> from torch.nn.utils import parametrizations as P
>>> torch_module = P.spectral_norm(torch.nn.Linear(4, 3))
>>> net, params, state = pf.from_torch(torch_module)
>>> twin = pf.to_torch(net, params, state)
>>> x = torch.randn(2, 4)
>>> bool(torch.allclose(twin.eval()(x), net(params, state, x, training=False)[0]))
True
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize as torch_parametrize

from .chain import Chain, Step, as_step
from .parametrizations import Orthogonal, SpectralNorm, WeightNorm
from .parametrize import Parametrized
from .tree import chain_prefix

__all__ = ["from_torch", "to_torch", "split_state_dict"]


def _parametrized_tensors(module: nn.Module):
    """``(full name, owner, leaf, ParametrizationList)`` for every parametrized tensor."""
    for prefix, m in module.named_modules():
        if torch_parametrize.is_parametrized(m):
            for leaf, plist in m.parametrizations.items():
                yield (f"{prefix}.{leaf}" if prefix else leaf), m, leaf, plist


def _from_torch_step(p: nn.Module) -> tuple[Step, tuple[str, ...], tuple[str, ...]]:
    """pfunc step for one torch parametrization, with its local param and state names."""
    if isinstance(p, torch_parametrizations._SpectralNorm):
        sn = SpectralNorm(getattr(p, "n_power_iterations", 1), p.eps, p.dim)
        return as_step(sn), (), tuple(n for n in ("_u", "_v") if n in p._buffers)
    if isinstance(p, torch_parametrizations._Orthogonal):
        trivial = "base" in p._buffers
        if trivial and p._buffers["base"] is None:
            raise ValueError("from_torch: an orthogonal parametrization has no base yet (it was never initialised)")
        orth = Orthogonal(p.orthogonal_map.name, use_trivialization=trivial, shape=p.shape)
        return as_step(orth), (), (("base",) if trivial else ())
    if isinstance(p, torch_parametrizations._WeightNorm):
        return as_step(WeightNorm(None if p.dim == -1 else p.dim)), (), ()
    twin = copy.deepcopy(p)
    return (
        Step(twin, "module"),
        tuple(n for n, _ in twin.named_parameters()),
        tuple(n for n, _ in twin.named_buffers()),
    )


def _unparametrized_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parametrized tensor replaced by its current
    value (computed in eval mode) and every class restored; ``module`` is not touched.

    (torch's ``remove_parametrizations`` would edit the injected class, which a deep
    copy shares with the original, so the copy is rebuilt by hand.) The state-dict hooks torch's
    parametrizations left on its modules are dropped with them.
    """
    plain = copy.deepcopy(module)
    found = list(_parametrized_tensors(plain))
    values = []
    with torch.no_grad():
        for _name, owner, leaf, plist in found:
            plist.eval()
            first = plist.original if plist.is_tensor else plist.original0
            values.append((owner, leaf, plist(), isinstance(first, nn.Parameter), first.requires_grad))
    for owner, leaf, value, is_param, requires_grad in values:
        if "parametrizations" in owner._modules:
            owner.__class__ = torch_parametrize.type_before_parametrizations(owner)
            del owner._modules["parametrizations"]
        if is_param:
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=requires_grad))
        else:
            owner.register_buffer(leaf, value.detach().clone())
    for m in plain.modules():  # the copy has no parametrization left for their hooks to serve
        _drop_parametrization_hooks(m)
    return plain


def _is_parametrization_hook(hook: Any) -> bool:
    """Whether ``hook`` belongs to torch's parametrization machinery (``torch.nn.utils.parametrizations``
    or ``parametrize``): e.g. ``weight_norm``'s local ``_weight_norm_compat_hook``, which renames old
    ``weight_g``/``weight_v`` checkpoint keys for the parametrization it was registered with."""
    fn = getattr(hook, "hook", hook)  # load-state-dict pre-hooks come wrapped in torch's _WrappedHook
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__module__", None) in (torch_parametrizations.__name__, torch_parametrize.__name__)


def _drop_parametrization_hooks(owner: nn.Module) -> None:
    """Remove from ``owner`` (a plain copy) the state-dict hooks torch's parametrizations registered on it.

    They serve the parametrization the copy no longer has, and ``weight_norm``'s is a local function,
    which does not pickle; :func:`split_state_dict` does its key conversion instead."""
    for hooks_name in ("_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_hooks", "_state_dict_pre_hooks"):
        hooks = getattr(owner, hooks_name, None)
        if hooks:
            for key in [k for k, h in hooks.items() if _is_parametrization_hook(h)]:
                del hooks[key]


def from_torch(module: nn.Module) -> tuple[Parametrized, dict[str, Tensor], dict[str, Tensor]]:
    """``(net, params, state)`` equivalent to ``module``, parametrized in place by torch.

    ``module`` is not modified: ``net.module`` is a plain copy (parametrized tensors
    replaced by their current values), torch's spectral norm, orthogonal and weight
    norm become pfunc's built-ins, any other parametrization module is used as it is
    written (a copy). ``params``/``state`` are copies of ``module``'s tensors, same keys.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch: expected an nn.Module, got {type(module).__name__}")
    found = list(_parametrized_tensors(module))
    chains: dict[str, Chain] = {}
    layout = {}
    for name, _owner, _leaf, plist in found:
        steps, pnames, snames = [], [], []
        for p in plist:
            step, pn, sn = _from_torch_step(p)
            steps.append(step)
            pnames.append(pn)
            snames.append(sn)
        n_originals = None if plist.is_tensor else plist.ntensors
        first = plist.original if plist.is_tensor else plist.original0
        is_buffer = not isinstance(first, nn.Parameter)
        chains[name] = Chain(tuple(steps), n_originals, is_buffer, (bool(plist.unsafe),) * len(steps))
        layout[name] = (tuple(pnames), tuple(snames))
    plain = _unparametrized_copy(module)
    net = Parametrized(plain, chains, layout, shapes={k: v.shape for k, v in module.named_parameters()})
    params = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in module.named_parameters()}
    state = {k: v.detach().clone() for k, v in module.named_buffers()}
    net.check_keys(params, state)
    return net, params, state


class _PfuncParametrization(nn.Module):
    """A pfunc parametrization as a torch ``nn.Module`` parametrization (state as buffers)."""

    def __init__(self, step: Step, state: Mapping[str, Tensor]):
        super().__init__()
        self.step = step
        for k, v in state.items():
            self.register_buffer(k, v.detach().clone())
        if step.has_right_inverse:
            self.right_inverse = self._right_inverse  # torch looks the method up with hasattr

    def _state(self) -> dict[str, Tensor]:
        return {k: b for k, b in self._buffers.items() if b is not None}

    def forward(self, *X: Tensor) -> Tensor:
        Y, new = self.step.forward(X, {}, self._state(), self.training)
        if self.training:
            with torch.no_grad():
                for k, v in new.items():
                    self._buffers[k].copy_(v)
        return Y

    def _right_inverse(self, Y: Tensor) -> Any:
        X, new = self.step.right_inverse(Y, {}, self._state(), None)
        with torch.no_grad():
            for k, v in new.items():
                self._buffers[k].copy_(v)
        return X

    def extra_repr(self) -> str:
        return repr(self.step.fn)


def _register_torch(owner: nn.Module, leaf: str, step: Step, state: Mapping[str, Tensor], unsafe: bool) -> None:
    fn = step.fn
    if isinstance(fn, SpectralNorm) and fn.mode == "torch":
        torch_parametrizations.spectral_norm(owner, leaf, fn.n_power_iterations, fn.eps, fn.dim)
    elif isinstance(fn, Orthogonal):
        torch_parametrizations.orthogonal(owner, leaf, fn.orthogonal_map, use_trivialization=fn.use_trivialization)
        orth = owner.parametrizations[leaf][-1]
        if "base" in state and orth.base is None:  # torch sets base only when first in a chain
            orth.base = state["base"].detach().clone()
    elif isinstance(fn, WeightNorm):
        torch_parametrizations.weight_norm(owner, leaf, None if fn.dim == -1 else fn.dim)
    elif step.kind == "module":
        torch_parametrize.register_parametrization(owner, leaf, copy.deepcopy(fn), unsafe=unsafe)
    else:
        torch_parametrize.register_parametrization(owner, leaf, _PfuncParametrization(step, state), unsafe=unsafe)


def to_torch(net: Parametrized, params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``net.module`` parametrized in place by ``torch.nn.utils.parametrize``,
    loaded (``strict=True``) with ``params`` and ``state``.

    torch's own spectral norm, orthogonal and weight norm are used for pfunc's; any
    other pfunc parametrization is wrapped as an ``nn.Module`` whose state lives in
    buffers under the same keys.
    """
    net.check_keys(params, state)
    twin = copy.deepcopy(net.module)
    with torch.no_grad():
        for name, chain in net.chains.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = twin.get_submodule(owner_name) if owner_name else twin
            was_training = owner.training
            owner.eval()
            for i, (step, unsafe) in enumerate(zip(chain.steps, chain.unsafe)):
                prefix = f"{chain_prefix(name)}.{i}."
                local = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                _register_torch(owner, leaf, step, local, unsafe)
            owner.train(was_training)
    # Everything load_state_dict loads, rather than what state_dict() reports: a module may keep a
    # persistent buffer out of its state_dict (torch.ao.pruning's FakeSparsity does its mask) and
    # still expect it in a strict load.
    loadable = {k: v.detach() for k, v in {**params, **state}.items() if k not in net._non_persistent}
    twin.load_state_dict(loadable, strict=True)
    with torch.no_grad():  # non-persistent buffers: load_state_dict skips them, so set them here
        for k in net._non_persistent:
            owner_name, _, leaf = k.rpartition(".")
            owner = twin.get_submodule(owner_name) if owner_name else twin
            owner._buffers[leaf] = state[k].detach().clone()
    for k, p in twin.named_parameters():
        p.requires_grad_(params[k].requires_grad)
    return twin


def split_state_dict(net: Parametrized, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, state)``, copied, from a ``state_dict`` of the torch twin (e.g. a checkpoint).

    Non-persistent buffers missing from ``state_dict`` are taken from ``net.module``. A checkpoint
    written with the deprecated ``torch.nn.utils.weight_norm`` is read as torch's
    ``parametrizations.weight_norm`` reads it: ``<owner>.<name>_g`` and ``<owner>.<name>_v`` become
    ``<owner>.parametrizations.<name>.original0``/``original1`` of a chain that starts with
    :class:`~pfunc.parametrizations.WeightNorm`. Raises ``KeyError`` naming missing or unexpected keys.
    """
    state_dict = _renamed_weight_norm_keys(net, state_dict)
    # copies: a state_dict aliases the live buffers of the module it came from
    params = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in state_dict.items() if k in net.param_keys}
    state = {k: v.detach().clone() for k, v in state_dict.items() if k in net.state_keys}
    unexpected = sorted(set(state_dict) - net.param_keys - net.state_keys)
    if unexpected:
        raise KeyError(f"split_state_dict: unexpected keys {unexpected}")
    for k, b in net.module.named_buffers():
        if k in net.state_keys and k not in state:
            state[k] = b.detach().clone()
    net.check_keys(params, state)
    return params, state


def _renamed_weight_norm_keys(net: Parametrized, state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``state_dict`` with old ``weight_norm`` keys (``weight_g``, ``weight_v``) renamed to the
    originals of the chain they feed, as torch's ``_weight_norm_compat_hook`` does at load."""
    renames = {}
    for name, chain in net.chains.items():
        if chain.n_originals == 2 and isinstance(chain.steps[0].fn, WeightNorm):
            g_key, v_key = f"{name}_g", f"{name}_v"
            if g_key in state_dict and v_key in state_dict:
                renames[g_key] = f"{chain_prefix(name)}.original0"
                renames[v_key] = f"{chain_prefix(name)}.original1"
    if not renames:
        return state_dict
    return {renames.get(k, k): v for k, v in state_dict.items()}
