"""Dry runs on a simulated CUDA device, in a process of their own (tests/fake_cuda.py installs CUDA's
device guard process-wide on a CPU-only wheel): ``python tests/fake_cuda_worker.py OUT.json NAME...``.

Each named dry run writes ``{"ok": True, "checked": n}`` (n tensors asserted on ``cuda`` with the
promised dtype) or ``{"ok": False, "error": "Type: message"}`` into OUT.json; the tests assert on it.
Gradient parts run only where torch is built with CUDA (``GRADIENTS``); elsewhere ``skipped`` says so.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pfunc as pf  # noqa: E402
from pfunc.parametrizations import (  # noqa: E402
    SPD, Bounded, Cayley, Mask, MatrixExp, Orthogonal, Positive, Skew, SpectralNorm, Symmetric, WeightNorm,
    WeightStandardization,
)
from tests.fake_cuda import CUDA, GRADIENTS, assert_on, fake_cuda, install_cuda_device_guard  # noqa: E402

# (name, spec, weight shape [out, in]): every built-in, spectral norm in torch's and BigGAN's schemes
BUILTINS = {
    "Symmetric": (Symmetric, (6, 6)),
    "Skew": (Skew, (6, 6)),
    "Cayley": (lambda: (Skew(), Cayley()), (6, 6)),
    "MatrixExp": (lambda: (Skew(), MatrixExp()), (6, 6)),
    "SPD": (SPD, (6, 6)),
    "Orthogonal": (Orthogonal, (6, 4)),
    "SpectralNorm": (SpectralNorm, (6, 4)),
    "SpectralNorm.biggan": (lambda: SpectralNorm.biggan(num_svs=2), (6, 4)),
    "WeightNorm": (WeightNorm, (6, 4)),
    "WeightStandardization": (WeightStandardization, (6, 4)),
    "Positive": (Positive, (6, 4)),
    "Bounded": (lambda: Bounded(-1.0, 1.0), (6, 4)),
    "Mask": (lambda: Mask(p_drop=0.5), (6, 4)),
}


def _loss(net):
    def loss(params, state, x):
        out, new_state = net(params, state, x, training=True)
        return out.square().mean(), new_state

    return loss


def builtin(name: str) -> int:
    """One built-in on cuda: init from a CUDA generator, calls in train and eval, materialize, gradients."""
    make, (h, w) = BUILTINS[name]
    n = 0
    with fake_cuda():
        net = pf.parametrize(nn.Linear(w, h), {"weight": make()})  # the module stays where it was built
        values = {k: v.detach().to(CUDA) for k, v in net.module.state_dict().items()}
        g = torch.Generator(device="cuda").manual_seed(0)
        params, state = net.init(generator=g, values=values)
        n += assert_on(params, what="params") + (assert_on(state, what="state") if state else 0)
        x = torch.randn(3, w, device=CUDA)
        for training in (True, False):
            out, new_state = net(params, state, x, training=training)
            n += assert_on(out, what="out") + (assert_on(new_state, what="new_state") if new_state else 0)
            materialized, _ = net.materialize(params, state, training=training)
            n += assert_on(materialized, what="materialize")
        if GRADIENTS:
            grads, (value, new_state) = pf.grad_and_value(_loss(net), has_aux=True)(params, state, x)
            n += assert_on(grads, what="pf.grad_and_value grads") + assert_on(value, what="value")
            n += assert_on(pf.grad(_loss(net), has_aux=True)(params, state, x)[0], what="pf.grad")
    return n


def ensembles() -> int:
    """``pf.ensemble`` of a module on the GPU: members from CUDA generators, a training-mode call (spectral norm
    in both schemes under vmap)."""
    n = 0
    with fake_cuda():
        module = nn.Sequential(nn.Linear(4, 8, device=CUDA), nn.Tanh(), nn.Linear(8, 1, device=CUDA))
        net = pf.parametrize(module, {"0.weight": SpectralNorm(), "2.weight": SpectralNorm.biggan()})
        gens = pf.ensemble.generators(seed=0, n=3, device="cuda")
        params, state = pf.ensemble.init(net, gens)  # each member re-initialised by pf.ensemble.fresh_values
        n += assert_on(params, what="params") + assert_on(state, what="state")
        x = torch.randn(5, 4, device=CUDA)
        out, new_state = pf.ensemble.call(net, params, state, x, training=True)
        n += assert_on(out, what="out") + assert_on(new_state, what="new_state")
        if GRADIENTS:
            grads, (value, new_state) = pf.ensemble.grad_and_value(_loss(net), has_aux=True)(params, state, x)
            n += assert_on(grads, what="grads") + assert_on(new_state, what="new_state")
    return n


def interop() -> int:
    """A module built on the GPU: ``init``, ``to_torch`` of its params and state, and ``from_torch`` back.

    (``to_torch`` copies into a copy of ``net.module``, so the twin lives where the module does.)"""
    n = 0
    with fake_cuda():
        net = pf.parametrize(nn.Linear(4, 6, device=CUDA), {"weight": SpectralNorm()})  # a module on the GPU
        params, state = net.init(generator=torch.Generator(device="cuda").manual_seed(0))
        n += assert_on(params, what="params") + assert_on(state, what="state")
        twin = pf.to_torch(net, params, state)
        n += assert_on(dict(twin.state_dict()), what="to_torch state_dict")
        back, p2, s2 = pf.from_torch(twin)
        n += assert_on(p2, what="from_torch params") + assert_on(s2, what="from_torch state")
        out, _ = back(p2, s2, torch.randn(2, 4, device=CUDA), training=True)
        n += assert_on(out, what="from_torch net's output")
    return n


def main(out: str, names: list[str]) -> int:
    try:
        how = install_cuda_device_guard()
    except (RuntimeError, OSError, ValueError, AttributeError) as e:  # an older torch: the tests skip, saying why
        Path(out).write_text(json.dumps({"_unavailable": f"no CUDA device guard for a fake mode on torch {torch.__version__}: {e}"}))
        return 0
    results: dict = {"_guard": how, "_gradients": GRADIENTS}
    runs = {f"builtin:{k}": (lambda k=k: builtin(k)) for k in BUILTINS}
    runs.update({"ensembles": ensembles, "interop": interop})
    try:
        from tests.examples.fake_cuda_diffusion import RUNS as diffusion_runs
    except ImportError:  # the examples' extra is not installed
        diffusion_runs = {}
    runs.update(diffusion_runs)
    for name in names:
        try:
            results[name] = {"ok": True, "checked": runs[name]()}
        except Exception as e:  # reported to the test, which names it
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "site-packages" not in f.filename), "?")
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (at {where})"}
        Path(out).write_text(json.dumps(results, indent=1))
    Path(out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
