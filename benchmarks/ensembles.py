"""Item 3: one SGD training step of N small spectrally-normalised MLPs.

Each member is ``Linear(in, hidden) - ReLU - Linear(hidden, hidden) - ReLU - Linear(hidden, 1)``
with torch's spectral norm on every weight (training mode: one power iteration per
call), its own batch ``(batch, in)`` and MSE loss, SGD with ``lr = 0.01``.

* ``pfunc vmap``: one ``torch.func.vmap(torch.func.grad_and_value(loss))`` over the
  stacked ``(params, state)`` of all members, then ``p - lr * g`` on the stacked tensors;
* ``pfunc vmap+backward``: ``torch.func.vmap(loss)`` forward, then one ``torch.autograd.grad``
  of the summed losses (what ``examples/ensemble.py`` does; no ``create_graph``), same update;
* ``pfunc ensemble.grad_and_value``: :func:`pfunc.ensemble.grad_and_value`, the same route as a
  library call (fresh leaves, ``torch.func``'s return structure), same update;
* ``pfunc vmap(pf.grad)``: ``torch.func.vmap(pf.grad_and_value(loss))``; inside ``vmap``
  :func:`pfunc.grad_and_value` is ``torch.func``'s, so this equals the solo runs (the loop) and
  costs what ``pfunc vmap`` costs;
* ``torch loop``: a Python loop of forward + ``backward()`` over N torch-parametrized
  modules, then ``torch.optim.SGD(..., foreach=True).step()`` on all of them.

Both start from the same numbers (pfunc's stacked trees are copies of the N torch
modules' tensors, by key) and are checked to give the same losses, new parameters and
new power-iteration vectors. torch's own vmap route is tried too and fails: see
:func:`torch_vmap_errors`.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pfunc as pf

from .comparison import Comparison, Variant
from .sizes import Sizes
from .timing import synchronizer
from .twins import FAMILIES, build_twins

__all__ = ["member", "ensemble", "comparisons", "torch_vmap_errors", "notes", "LR"]

FAMILY_NAME = "ensembles"
LR = 0.01
WEIGHTS = ("0.weight", "2.weight", "4.weight")


def member(sizes: Sizes) -> nn.Sequential:
    """One ensemble member, unparametrized."""
    h = sizes.ensemble_hidden
    return nn.Sequential(nn.Linear(sizes.ensemble_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))


def ensemble(sizes: Sizes, n: int, device: torch.device) -> tuple[list[nn.Module], pf.Parametrized, dict[str, Tensor], dict[str, Tensor]]:
    """``(torch modules, net, stacked params, stacked state)``: N members, member ``k``
    seeded ``k``, pfunc's stacked trees copied from the torch modules by key."""
    modules, params, states = [], [], []
    net = None
    for k in range(n):
        tw = build_twins(lambda: member(sizes), WEIGHTS, FAMILIES["SpectralNorm"], seed=k, device=device)
        modules.append(tw.torch_module.train())
        params.append(tw.params)
        states.append(tw.state)
        net = tw.net
    assert net is not None
    stacked = {k: v.detach().requires_grad_(True) for k, v in pf.tree.stack(params).items()}
    return modules, net, stacked, pf.tree.stack(states)


def _data(sizes: Sizes, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(n, sizes.ensemble_batch, sizes.ensemble_in, generator=g)
    ys = torch.randn(n, sizes.ensemble_batch, 1, generator=g)
    return xs.to(device), ys.to(device)


def torch_vmap_errors(sizes: Sizes, device: torch.device | str = "cpu") -> dict[str, str]:
    """What happens when a torch user tries to vmap torch-parametrized members in training
    mode: ``{route: error message}`` (empty if torch has learnt to do it)."""
    device = torch.device(device)
    modules, _, _, _ = ensemble(sizes, 2, device)
    xs, _ = _data(sizes, 2, device)
    errors = {}
    try:
        torch.func.stack_module_state(modules)
    except Exception as e:  # noqa: BLE001 - reporting whatever torch raises
        errors["torch.func.stack_module_state(models)"] = f"{type(e).__name__}: {e}"
    stacked = pf.tree.stack([{k: v.detach() for k, v in m.state_dict().items()} for m in modules])
    try:
        torch.func.vmap(lambda p, x: torch.func.functional_call(modules[0], p, (x,)))(stacked, xs)
    except Exception as e:  # noqa: BLE001
        errors["vmap(functional_call(model, stacked state_dict)) in training mode"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return errors


def notes(sizes: Sizes, device: torch.device | str = "cpu") -> list[str]:
    """The section's notes: torch's vmap routes and how they fail."""
    errors = torch_vmap_errors(sizes, device)
    if not errors:
        return ["torch's own vmap route over torch-parametrized members ran without error on this torch version."]
    return [f"torch's own vmap route fails: `{route}` raises `{msg}`" for route, msg in errors.items()]


def torch_loop_step(modules: list[nn.Module], xs: Tensor, ys: Tensor, optimizer: torch.optim.Optimizer):
    """One optimizer step of a Python loop over torch modules, member ``k`` on ``(xs[k], ys[k])`` with the MSE
    loss: the alternative an ensemble replaces. Returns the step, which returns the members' losses ``(N,)``."""

    def step() -> Tensor:
        losses = []
        for module, x, y in zip(modules, xs, ys):
            loss = F.mse_loss(module(x), y)
            loss.backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses)

    return step


def comparison(sizes: Sizes, n: int, device: torch.device) -> Comparison:
    """The row for ``n`` members."""
    modules, net, params, state = ensemble(sizes, n, device)
    xs, ys = _data(sizes, n, device)
    keys = tuple(sorted(params))
    skeys = tuple(sorted(state))
    optimizer = torch.optim.SGD([p for m in modules for p in m.parameters()], lr=LR, foreach=True)

    torch_loop = torch_loop_step(modules, xs, ys, optimizer)

    def torch_view(losses: Tensor) -> dict[str, Any]:
        named = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in modules]
        return {
            "loss": losses,
            "params": {k: torch.stack([d[k] for d in named]) for k in keys},
            "state": {k: torch.stack([d[k] for d in named]) for k in skeys},
        }

    def loss_fn(p: dict[str, Tensor], s: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out, new_state = net(p, s, x, training=True)
        return F.mse_loss(out, y), new_state

    step_grads = torch.func.vmap(torch.func.grad_and_value(loss_fn, has_aux=True))

    def pfunc_vmap() -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        grads, (loss, new_state) = step_grads(params, state, xs, ys)
        with torch.no_grad():
            new_params = {k: p - LR * grads[k] for k, p in params.items()}
        return new_params, new_state, loss

    step_losses = torch.func.vmap(loss_fn)

    def pfunc_vmap_backward() -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        # vmapped forward, one autograd backward of the summed losses: member k's gradient is
        # d loss_k / d params_k, without torch.func.grad's create_graph=True
        losses, new_state = step_losses(params, state, xs, ys)
        grads = torch.autograd.grad(losses.sum(), [params[k] for k in keys])
        with torch.no_grad():
            new_params = {k: params[k] - LR * g for k, g in zip(keys, grads)}
        return new_params, new_state, losses.detach()

    members_step = pf.ensemble.grad_and_value(loss_fn, has_aux=True)

    def pfunc_ensemble_grad() -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        grads, (losses, new_state) = members_step(params, state, xs, ys)
        with torch.no_grad():
            new_params = {k: p - LR * grads[k] for k, p in params.items()}
        return new_params, new_state, losses

    step_pf_grads = torch.func.vmap(pf.grad_and_value(loss_fn, has_aux=True))

    def pfunc_vmap_pf_grad() -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        grads, (loss, new_state) = step_pf_grads(params, state, xs, ys)
        with torch.no_grad():
            new_params = {k: p - LR * grads[k] for k, p in params.items()}
        return new_params, new_state, loss

    view = lambda r: {"loss": r[2], "params": r[0], "state": r[1]}  # noqa: E731
    return Comparison(
        family=FAMILY_NAME,
        labels={"N": str(n), "member": f"{sizes.ensemble_in}-{sizes.ensemble_hidden}-{sizes.ensemble_hidden}-1", "batch": str(sizes.ensemble_batch)},
        variants={
            "torch loop": Variant(torch_loop, torch_view),
            "pfunc vmap": Variant(pfunc_vmap, view),
            "pfunc vmap+backward": Variant(pfunc_vmap_backward, view),
            "pfunc ensemble.grad_and_value": Variant(pfunc_ensemble_grad, view),
            "pfunc vmap(pf.grad)": Variant(pfunc_vmap_pf_grad, view),
        },
        reference="torch loop",
        ratios=(
            ("pfunc vmap", "torch loop"),
            ("pfunc vmap+backward", "torch loop"),
            ("pfunc ensemble.grad_and_value", "torch loop"),
            ("pfunc vmap(pf.grad)", "torch loop"),
        ),
        rtol=1e-4,
        atol=1e-5,
        sync=synchronizer(device),
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu") -> Iterator[Comparison]:
    """One row per ensemble size."""
    device = torch.device(device)
    for n in sizes.ensemble_sizes:
        yield comparison(sizes, n, device)
