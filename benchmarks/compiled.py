"""Item 5: the items above under ``torch.compile``, pfunc's path and torch's path side by side.

Every row has the eager and the compiled version of each path, checked equal, timed
in steady state (after the first, compiling call), plus the compile time (wall time of
the first call, forward and backward) and the graph breaks that
``torch._dynamo.explain`` finds, counting separately those whose stack is in pfunc's
own code. Rows:

* ``MLP <parametrization>``: item 1's MLP, train mode, fwd+bwd. pfunc compiles
  ``net(params, state, x)`` + loss (gradients by ``autograd.grad``, so AOTAutograd
  compiles the backward: the compiled autograd route); ``pfunc func.grad`` compiles
  ``torch.func.grad`` of the same loss; ``pfunc pf.grad`` compiles :func:`pfunc.grad_and_value`
  of it (under ``torch.compile`` that is ``torch.func.grad_and_value`` called under ``no_grad``,
  so the graph computes the gradient and saves nothing for an outer backward); torch compiles
  the parametrized module.
* ``RNN``: item 2 (fwd+bwd); pfunc compiles materialise + apply; torch compiles the
  module called inside ``parametrize.cached()``.
* ``ensemble``: item 3's training step; pfunc compiles the vmapped grad step; torch
  compiles the loop of member forwards and losses as one graph (``backward`` and the
  optimizer step stay eager).
* ``power iteration``: item 4; pfunc compiles the vmapped call, torch the loop of
  spectral-norm layers.

Dynamo's caches are reset before each row and inductor's on-disk caches are off, so
each compile time is that row's alone, from scratch; the one-time start-up of
inductor (C++ toolchain, first compile) is measured apart.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

import pfunc

from . import caching, ensembles, power_iteration
from .comparison import Comparison, Variant
from .layers import MODELS, loss_of
from .sizes import Sizes
from .timing import synchronizer
from .twins import FAMILIES, Family, build_twins

__all__ = ["GraphBreaks", "graph_breaks", "compile_timed", "warm_up", "comparisons"]

FAMILY_NAME = "compiled"
PFUNC_DIR = os.path.dirname(os.path.abspath(pfunc.__file__))
RTOL, ATOL = 1e-3, 1e-4


@dataclass(frozen=True)
class GraphBreaks:
    """What ``torch._dynamo.explain`` says about one function: ``graphs`` compiled,
    ``breaks`` in all, ``in_pfunc`` of them with a frame in pfunc's package, and the reasons."""

    graphs: int
    breaks: int
    in_pfunc: int
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.breaks} ({self.in_pfunc} in pfunc)"


def graph_breaks(fn: Callable[..., Any], *args: Any) -> GraphBreaks:
    """Run ``torch._dynamo.explain(fn)(*args)`` and count the breaks (dynamo reset after)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    torch._dynamo.reset()
    in_pfunc = 0
    reasons = []
    for r in explained.break_reasons:
        files = [frame.filename for frame in r.user_stack]
        if any(os.path.abspath(f).startswith(PFUNC_DIR) for f in files):
            in_pfunc += 1
        where = f" at {files[-1]}:{r.user_stack[-1].lineno}" if files else ""
        reasons.append(r.reason.splitlines()[0] + where)
    return GraphBreaks(explained.graph_count, explained.graph_break_count, in_pfunc, tuple(reasons))


def compile_timed(
    fn: Callable[..., Any], first_call: Callable[[Callable[..., Any]], Any], sync: Callable[[], None], backend: str = "inductor"
) -> tuple[Callable[..., Any], float]:
    """``(torch.compile(fn, backend=backend), seconds)``: the seconds are the wall time of
    ``first_call(compiled)``, which should run forward and backward once (so both get compiled)."""
    compiled = torch.compile(fn, backend=backend)
    sync()
    t0 = time.perf_counter()
    first_call(compiled)
    sync()
    return compiled, time.perf_counter() - t0


def warm_up(device: torch.device | str) -> float:
    """Seconds of inductor's one-time start-up: compiling and running a one-op function."""
    torch._dynamo.reset()
    x = torch.randn(8, device=device)
    sync = synchronizer(device)
    with torch._inductor.config.patch(force_disable_caches=True):
        _, seconds = compile_timed(lambda t: t.sin() + 1, lambda f: f(x), sync)
    torch._dynamo.reset()
    return seconds


class _Snapshot:
    """Copies of modules' tensors, to undo what a compiling call changed in place."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.pairs = [(t, t.detach().clone()) for m in modules for t in m.state_dict().values()]

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.pairs:
                t.copy_(saved)


def _extras(compile_s: dict[str, float], breaks: dict[str, GraphBreaks]) -> dict[str, str]:
    out = {f"compile s ({k})": f"{v:.1f}" for k, v in compile_s.items()}
    out.update({f"graph breaks ({k})": str(b) for k, b in breaks.items()})
    return out


def mlp_row(family: Family, sizes: Sizes, device: torch.device, backend: str = "inductor") -> Comparison:
    """Item 1's MLP with ``family``, train mode, fwd+bwd: eager vs compiled, pfunc vs torch."""
    model = MODELS[1]
    sync = synchronizer(device)
    make = lambda: build_twins(lambda: model.make(sizes), model.names(sizes), family, device=device)  # noqa: E731
    tw, tw_compiled = make(), make()
    x = torch.randn(sizes.batch, sizes.width, generator=torch.Generator().manual_seed(1)).to(device)
    net, params, state = tw.net, tw.params, tw.state
    plist = tw.pfunc_params()
    keys = tuple(sorted(state)) if family.stateful_in_training else ()

    def forward(p: dict[str, Tensor], s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        out, new_state = net(p, s, x, training=True)
        return loss_of(out), (out, new_state)

    grad_fn = torch.func.grad(forward, has_aux=True)
    pf_grad_fn = pfunc.grad_and_value(forward, has_aux=True)
    breaks = {
        "pfunc": graph_breaks(forward, params, state, x),
        "pfunc func.grad": graph_breaks(grad_fn, params, state, x),
        "pfunc pf.grad": graph_breaks(pf_grad_fn, params, state, x),
    }
    twin, twin_c = tw.torch_module.train(), tw_compiled.torch_module.train()
    snapshot = _Snapshot([twin_c])
    breaks["torch"] = graph_breaks(twin_c, x)
    forward_c, t_pfunc = compile_timed(forward, lambda f: torch.autograd.grad(f(params, state, x)[0], plist), sync, backend)
    grad_c, t_grad = compile_timed(grad_fn, lambda f: f(params, state, x), sync, backend)
    pf_grad_c, t_pf_grad = compile_timed(pf_grad_fn, lambda f: f(params, state, x), sync, backend)
    tlist, tlist_c = tw.torch_params(), tw_compiled.torch_params()
    twin_compiled, t_torch = compile_timed(twin_c, lambda f: torch.autograd.grad(loss_of(f(x)), tlist_c), sync, backend)
    snapshot.restore()

    def pfunc_with(fwd: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            loss, (out, new_state) = fwd(params, state, x)
            return out, torch.autograd.grad(loss, plist), new_state

        return run

    def torch_with(module: Callable[[Tensor], Tensor], tensors: list[Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            out = module(x)
            return out, torch.autograd.grad(loss_of(out), tensors)

        return run

    pkeys = tw.param_keys
    pview = lambda r: {"out": r[0], "grads": list(r[1]), "state": {k: r[2][k] for k in keys}}  # noqa: E731
    gview = lambda r: {"out": r[1][0], "grads": [r[0][k] for k in pkeys], "state": {k: r[1][1][k] for k in keys}}  # noqa: E731
    pfview = lambda r: {"out": r[1][1][0], "grads": [r[0][k] for k in pkeys], "state": {k: r[1][1][1][k] for k in keys}}  # noqa: E731

    def tview(module: nn.Module) -> Callable[[Any], Any]:
        buffers = dict(module.named_buffers())
        return lambda r: {"out": r[0], "grads": list(r[1]), "state": {k: buffers[k] for k in keys}}

    return Comparison(
        family=FAMILY_NAME,
        labels={"item": f"MLP {family.name}", "pass": "train fwd+bwd"},
        variants={
            "pfunc eager": Variant(pfunc_with(forward), pview),
            "pfunc compiled": Variant(pfunc_with(forward_c), pview),
            "pfunc func.grad compiled": Variant(lambda: grad_c(params, state, x), gview),
            "pfunc pf.grad compiled": Variant(lambda: pf_grad_c(params, state, x), pfview),
            "torch eager": Variant(torch_with(twin, tlist), tview(twin)),
            "torch compiled": Variant(torch_with(twin_compiled, tlist_c), tview(twin_c)),
        },
        reference="pfunc eager",
        ratios=(
            ("pfunc compiled", "pfunc eager"),
            ("pfunc compiled", "torch compiled"),
            ("torch compiled", "torch eager"),
            ("pfunc func.grad compiled", "pfunc compiled"),
            ("pfunc pf.grad compiled", "pfunc compiled"),
        ),
        rtol=RTOL,
        atol=ATOL,
        facts={"breaks": breaks},
        extras=_extras({"pfunc": t_pfunc, "pfunc func.grad": t_grad, "pfunc pf.grad": t_pf_grad, "torch": t_torch}, breaks),
        sync=sync,
    )


def rnn_row(sizes: Sizes, device: torch.device, backend: str = "inductor") -> Comparison:
    """Item 2's RNN, fwd+bwd: pfunc materialise-once vs torch ``cached()``, eager and compiled."""
    sync = synchronizer(device)
    tw = caching.rnn_twins(sizes, device)
    xs = caching._inputs(sizes, device)
    net, params, state, twin = tw.net, tw.params, tw.state, tw.torch_module
    plist, tlist = tw.pfunc_params(), tw.torch_params()

    def pfunc_forward(p: dict[str, Tensor], s: dict[str, Tensor], xs: Tensor) -> Tensor:
        values, _ = net.materialize(p, s, training=True)
        return net.apply(values, xs)

    def torch_forward(xs: Tensor) -> Tensor:
        with torch_parametrize.cached():
            return twin(xs)

    breaks = {"pfunc": graph_breaks(pfunc_forward, params, state, xs), "torch": graph_breaks(torch_forward, xs)}
    pfunc_c, t_pfunc = compile_timed(pfunc_forward, lambda f: torch.autograd.grad(loss_of(f(params, state, xs)), plist), sync, backend)
    torch_c, t_torch = compile_timed(torch_forward, lambda f: torch.autograd.grad(loss_of(f(xs)), tlist), sync, backend)

    def run(fwd: Callable[[], Tensor], tensors: list[Tensor]) -> Variant:
        def go() -> Any:
            h = fwd()
            return h, torch.autograd.grad(loss_of(h), tensors)

        return Variant(go, lambda r: {"out": r[0], "grads": list(r[1])})

    return Comparison(
        family=FAMILY_NAME,
        labels={"item": f"RNN Orthogonal {sizes.rnn_width}, T={sizes.rnn_steps}", "pass": "fwd+bwd"},
        variants={
            "pfunc eager": run(lambda: pfunc_forward(params, state, xs), plist),
            "pfunc compiled": run(lambda: pfunc_c(params, state, xs), plist),
            "torch eager": run(lambda: torch_forward(xs), tlist),
            "torch compiled": run(lambda: torch_c(xs), tlist),
        },
        reference="pfunc eager",
        ratios=(("pfunc compiled", "pfunc eager"), ("pfunc compiled", "torch compiled"), ("torch compiled", "torch eager")),
        rtol=RTOL,
        atol=ATOL,
        facts={"breaks": breaks},
        extras=_extras({"pfunc": t_pfunc, "torch": t_torch}, breaks),
        sync=sync,
    )


def ensemble_row(sizes: Sizes, device: torch.device, backend: str = "inductor") -> Comparison:
    """Item 3's training step for ``compile_ensemble_size`` members, eager and compiled."""
    sync = synchronizer(device)
    n = sizes.compile_ensemble_size
    modules, net, params, state = ensembles.ensemble(sizes, n, device)
    modules_c, _, _, _ = ensembles.ensemble(sizes, n, device)
    xs, ys = ensembles._data(sizes, n, device)
    lr = ensembles.LR

    def loss_fn(p: dict[str, Tensor], s: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        out, new_state = net(p, s, x, training=True)
        return F.mse_loss(out, y), new_state

    grads_of = torch.func.vmap(torch.func.grad_and_value(loss_fn, has_aux=True))

    def pfunc_step(p: dict[str, Tensor], s: dict[str, Tensor], xs: Tensor, ys: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        grads, (loss, new_state) = grads_of(p, s, xs, ys)
        return {k: v.detach() - lr * grads[k] for k, v in p.items()}, new_state, loss

    def torch_losses_of(mods: Sequence[nn.Module]) -> Callable[[Tensor, Tensor], Tensor]:
        def losses(xs: Tensor, ys: Tensor) -> Tensor:
            return torch.stack([F.mse_loss(m(x), y) for m, x, y in zip(mods, xs, ys)])

        return losses

    torch_losses, torch_losses_c = torch_losses_of(modules), torch_losses_of(modules_c)
    snapshot = _Snapshot(modules_c)
    breaks = {"pfunc": graph_breaks(pfunc_step, params, state, xs, ys), "torch": graph_breaks(torch_losses_c, xs, ys)}
    pfunc_c, t_pfunc = compile_timed(pfunc_step, lambda f: f(params, state, xs, ys), sync, backend)
    torch_c, t_torch = compile_timed(torch_losses_c, lambda f: f(xs, ys).sum().backward(), sync, backend)
    snapshot.restore()
    for m in modules_c:
        m.zero_grad(set_to_none=True)

    def torch_step(losses_of: Callable[[Tensor, Tensor], Tensor], mods: Sequence[nn.Module]) -> Variant:
        optimizer = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=lr, foreach=True)
        keys, skeys = tuple(sorted(params)), tuple(sorted(state))

        def step() -> Tensor:
            losses = losses_of(xs, ys)
            losses.sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return losses.detach()

        def view(losses: Tensor) -> dict[str, Any]:
            named = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in mods]
            return {
                "loss": losses,
                "params": {k: torch.stack([d[k] for d in named]) for k in keys},
                "state": {k: torch.stack([d[k] for d in named]) for k in skeys},
            }

        return Variant(step, view)

    pview = lambda r: {"loss": r[2], "params": r[0], "state": r[1]}  # noqa: E731
    return Comparison(
        family=FAMILY_NAME,
        labels={"item": f"ensemble N={n}", "pass": "SGD step"},
        variants={
            "pfunc eager": Variant(lambda: pfunc_step(params, state, xs, ys), pview),
            "pfunc compiled": Variant(lambda: pfunc_c(params, state, xs, ys), pview),
            "torch eager": torch_step(torch_losses, modules),
            "torch compiled": torch_step(torch_c, modules_c),
        },
        reference="torch eager",
        ratios=(("pfunc compiled", "pfunc eager"), ("pfunc compiled", "torch compiled"), ("torch compiled", "torch eager")),
        rtol=RTOL,
        atol=ATOL,
        facts={"breaks": breaks},
        extras=_extras({"pfunc": t_pfunc, "torch": t_torch}, breaks),
        sync=sync,
    )


def power_row(sizes: Sizes, device: torch.device, backend: str = "inductor") -> Comparison:
    """Item 4 with one iteration: pfunc's vmapped call vs torch's loop, eager and compiled."""
    sync = synchronizer(device)
    pb, pb_c = power_iteration.problem(sizes, 1, device), power_iteration.problem(sizes, 1, device)
    Ws, us, vs = pb.Ws, pb.us, pb.vs
    vmapped = torch.func.vmap(lambda W, u, v: power_iteration.normalize_one(W, u, v, 1))
    snapshot = _Snapshot(pb_c.layers)

    def torch_loop(_: Tensor) -> Tensor:
        return pb_c.torch_weights()

    with torch.no_grad():
        breaks = {"pfunc": graph_breaks(vmapped, Ws, us, vs), "torch": graph_breaks(torch_loop, Ws)}
        pfunc_c, t_pfunc = compile_timed(vmapped, lambda f: f(Ws, us, vs), sync, backend)
        torch_c, t_torch = compile_timed(torch_loop, lambda f: f(Ws), sync, backend)
    snapshot.restore()

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn()

        return run

    return Comparison(
        family=FAMILY_NAME,
        labels={"item": f"power iteration K={sizes.power_count} {sizes.power_size}x{sizes.power_size}", "pass": "1 iteration"},
        variants={
            "pfunc eager": Variant(no_grad(lambda: vmapped(Ws, us, vs)), tuple),
            "pfunc compiled": Variant(no_grad(lambda: pfunc_c(Ws, us, vs)), tuple),
            "torch eager": Variant(no_grad(pb.torch_weights), pb.torch_view),
            "torch compiled": Variant(no_grad(lambda: torch_c(Ws)), pb_c.torch_view),
        },
        reference="pfunc eager",
        ratios=(("pfunc compiled", "pfunc eager"), ("pfunc compiled", "torch compiled"), ("torch compiled", "torch eager")),
        rtol=RTOL,
        atol=ATOL,
        facts={"breaks": breaks},
        extras=_extras({"pfunc": t_pfunc, "torch": t_torch}, breaks),
        sync=sync,
    )


def comparisons(
    sizes: Sizes, device: torch.device | str = "cpu", *, quick: bool = False, backend: str = "inductor"
) -> Iterator[Comparison]:
    """The compiled rows (``quick``: only the spectral-norm MLP and the ensemble). ``backend``
    is ``torch.compile``'s (the smoke test uses ``"aot_eager"``: same capture, no code generation)."""
    device = torch.device(device)
    families = [FAMILIES["SpectralNorm"]] if quick else list(FAMILIES.values())
    # inductor's on-disk caches would turn a second run's compile times into cache look-ups
    with torch._inductor.config.patch(force_disable_caches=True):
        for family in families:
            yield mlp_row(family, sizes, device, backend)
        if not quick:
            yield rnn_row(sizes, device, backend)
        yield ensemble_row(sizes, device, backend)
        if not quick:
            yield power_row(sizes, device, backend)
    torch._dynamo.reset()
