"""Item 6: one diffusion training step of the classic DDPM Unet (``examples/diffusion/``),
weight standardisation on every ``Block`` conv, pfunc vs ``torch.nn.utils.parametrize``.

The loss is the example's ``GaussianDiffusion.training_loss`` (noise prediction, L2,
linear beta schedule, 1000 steps) on fixed clean images ``x0 (batch, channels, image, image)``,
timesteps ``t`` and noise; under ``unet_dtype`` (bf16 on GPU) the forward runs in
``torch.autocast`` and the loss in float32. Every variant ends with an AdamW step
(betas 0.9, 0.99, as the example's ``make_optimizer``).

* ``torch``: the same Unet with a torch ``nn.Module`` weight standardisation registered on
  each Block conv by ``register_parametrization``; ``loss.backward()``; AdamW on its parameters
  (the stateful step every functional route is measured against);
* ``pfunc``: the example's ``make_loss_fn`` (``net(params, state, x, t, x_self_cond, training=True)``
  on :func:`examples.diffusion.unet.parametrize_unet`); ``loss.backward()``; AdamW on ``params.values()``;
* ``pfunc func.grad``: ``torch.func.grad_and_value`` of the same loss over ``(params, state)``
  (the params detached on the way in, so torch.func records no outer graph), gradients handed to
  AdamW through ``.grad``;
* ``pfunc pf.grad``: :func:`pfunc.grad_and_value` of the same loss, same hand-over.

Reported: images/s (batch / median step time), the FLOPs of one step
(``torch.utils.flop_counter.FlopCounterMode``, counted once) over the step time, and the peak
memory of one step, two ways. ``peak MB``: CUDA, the allocator's peak; CPU, the peak of live
tensor bytes from ``torch.profiler`` memory events, every route's ``.grad`` cleared first so
all start from the same tensors. ``peak RSS MB`` (CPU): each route in its own fresh process
(``python -m benchmarks.unet --route NAME``) that builds all four routes, runs one warm-up
step of its own, then measures the OS's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over one more step, minus the resident set before it; glibc's
``malloc`` is told to map every block over 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``) so
freed memory leaves the resident set and the warm-up's high-water mark cannot hide the step's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize
from torch.utils.flop_counter import FlopCounterMode

import pfunc as pf

from .comparison import Comparison, Variant
from .sizes import Sizes
from .timing import Timing, synchronizer
from .twins import copy_into_pfunc

__all__ = ["available", "TorchWeightStandardization", "Steps", "steps", "comparisons", "peak_memory_bytes", "peak_rss_bytes", "step_flops"]

FAMILY_NAME = "unet"
LR = 1e-4


def available() -> bool:
    """Whether the diffusion example (Unet, diffusion, training step) can be imported (item 6 needs it)."""
    try:
        from examples.diffusion import gaussian_diffusion, training, unet  # noqa: F401
    except ImportError:
        return False
    return True


class TorchWeightStandardization(nn.Module):
    """The torch user's weight standardisation: ``(W - mean) / sqrt(var + eps)`` per output channel,
    ``eps`` 1e-5 in float32 and 1e-3 otherwise (the autocast dtype when autocast is on), as denoising-diffusion-pytorch."""

    def forward(self, W: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype(W.device.type) if torch.is_autocast_enabled(W.device.type) else W.dtype
        eps = 1e-5 if dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(W, dim=tuple(range(1, W.ndim)), keepdim=True, correction=0)
        return (W - mean) * (var + eps).rsqrt()


def _make_unet(sizes: Sizes) -> nn.Module:
    from examples.diffusion.unet import Unet

    heads, dim_head = sizes.unet_attn
    return Unet(dim=sizes.unet_dim, dim_mults=sizes.unet_dim_mults, channels=sizes.unet_channels, attn_heads=heads, attn_dim_head=dim_head)


def _diffusion_batch(sizes: Sizes, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed ``(x0 in [-1, 1], t, noise)`` for every step."""
    g = torch.Generator().manual_seed(6)
    shape = (sizes.unet_batch, sizes.unet_channels, sizes.unet_image, sizes.unet_image)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (sizes.unet_batch,), generator=g)
    return x0.to(device), t.to(device), noise.to(device)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors alive during ``fn()`` beyond those alive before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    deltas = []
    for e in prof.function_events:
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            deltas.append((e.time_range.start, delta))
    deltas.sort()
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def step_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@dataclasses.dataclass
class Steps:
    """The four routes' training steps on one Unet, from the same numbers: ``run[name]()`` takes
    one step and returns the loss; ``params[name]`` are the tensors whose ``.grad`` it leaves."""

    run: dict[str, Callable[[], Tensor]]
    params: dict[str, list[Tensor]]


ROUTES = ("torch", "pfunc", "pfunc func.grad", "pfunc pf.grad")


def steps(sizes: Sizes, device: torch.device) -> Steps:
    """Build the Unet, its torch twin and pfunc's trees, and the step of every route."""
    from examples.diffusion.gaussian_diffusion import GaussianDiffusion
    from examples.diffusion.schedules import linear_beta_schedule
    from examples.diffusion.training import make_loss_fn, make_optimizer
    from examples.diffusion.unet import parametrize_unet, weight_standardization_spec

    torch.manual_seed(0)
    plain = _make_unet(sizes).to(device)
    twin = copy.deepcopy(plain)
    for name in weight_standardization_spec(plain):
        owner, _, leaf = name.rpartition(".")
        torch_parametrize.register_parametrization(twin.get_submodule(owner), leaf, TorchWeightStandardization())
    net = parametrize_unet(plain)
    params, state = copy_into_pfunc(net, twin)
    keys = tuple(sorted(params))
    copies = {name: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()} for name in ROUTES[2:]}
    x0, t, noise = _diffusion_batch(sizes, device)
    diffusion = GaussianDiffusion(linear_beta_schedule(1000)).to(device)
    bf16 = sizes.unet_dtype == "bfloat16"
    if sizes.unet_dtype not in (None, "bfloat16"):
        raise ValueError(f"unet_dtype must be None or 'bfloat16' (the example's autocast), got {sizes.unet_dtype!r}")
    loss_fn = make_loss_fn(net, diffusion, bf16=bf16, device_type=device.type)
    torch_named = dict(twin.named_parameters())
    torch_params = [torch_named[k] for k in keys]
    opt_torch = make_optimizer(dict(zip(keys, torch_params)), LR, 0.0)  # the same AdamW, over the twin's parameters
    opt_pfunc = make_optimizer({k: params[k] for k in keys}, LR, 0.0)
    opts = {name: make_optimizer({k: copies[name][k] for k in keys}, LR, 0.0) for name in copies}
    func_grad = torch.func.grad_and_value(loss_fn, has_aux=True)
    pf_grad = pf.grad_and_value(loss_fn, has_aux=True)

    def torch_step() -> Tensor:
        opt_torch.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_loss(lambda x, time, sc: twin(x, time, sc), x0, t, noise)
        loss.backward()
        opt_torch.step()
        return loss.detach()

    def pfunc_step() -> Tensor:
        opt_pfunc.zero_grad(set_to_none=True)
        loss, _ = loss_fn(params, state, x0, t, noise, False)
        loss.backward()
        opt_pfunc.step()
        return loss.detach()

    def functional_step(name: str, grad_fn: Callable[..., Any], detach: bool) -> Callable[[], Tensor]:
        p, opt = copies[name], opts[name]

        def step() -> Tensor:
            opt.zero_grad(set_to_none=True)
            grads, (loss, _) = grad_fn({k: v.detach() for k, v in p.items()} if detach else p, state, x0, t, noise, False)
            for k, v in p.items():
                v.grad = grads[k]
            opt.step()
            return loss.detach()

        return step

    return Steps(
        run={
            "torch": torch_step,
            "pfunc": pfunc_step,
            "pfunc func.grad": functional_step("pfunc func.grad", func_grad, detach=True),
            "pfunc pf.grad": functional_step("pfunc pf.grad", pf_grad, detach=False),
        },
        params={
            "torch": torch_params,
            "pfunc": [params[k] for k in keys],
            **{name: [copies[name][k] for k in keys] for name in copies},
        },
    )


def _resident_kib() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process (KiB), from ``/proc/self/status``."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def peak_rss_bytes(route: str, sizes: Sizes, device: torch.device) -> Optional[int]:
    """Peak resident-set growth of one ``route`` step, measured in a fresh process (see the module
    docstring); ``None`` where ``/proc/self/clear_refs`` is not available (not Linux) or on CUDA."""
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.unet", "--route", route, "--threads", str(torch.get_num_threads()),
           "--sizes", json.dumps(dataclasses.asdict(sizes))]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"peak_rss_bytes({route!r}) failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _measure_rss(route: str, sizes: Sizes, device: torch.device) -> int:
    """In this process: build every route, one warm-up step of ``route``, then its step's peak RSS growth."""
    built = steps(sizes, device)
    step = built.run[route]
    step()
    for p in built.params[route]:
        p.grad = None
    before = _resident_kib()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    step()
    return (_resident_kib()["VmHWM"] - before) * 1024


def comparison(sizes: Sizes, device: torch.device, peak_tflops: Optional[float] = None, rss: bool = True) -> Comparison:
    """The item-6 row, with images/s, peak memory and TFLOP/s measured after the timing
    (``rss``: also each route's peak RSS in its own process, CPU only)."""
    built = steps(sizes, device)

    def view(tensors: list[Tensor]) -> Callable[[Tensor], dict[str, Any]]:
        return lambda loss: {"loss": loss, "grads": [p.grad for p in tensors]}

    sync = synchronizer(device)

    def after(timing: Optional[Timing]) -> dict[str, str]:
        flops = step_flops(built.run["pfunc"])
        extras = {"GFLOP/step": f"{flops / 1e9:.2f}"}
        for name, fn in built.run.items():
            for p in built.params[name]:
                p.grad = None  # every route starts from the same live tensors
            extras[f"peak MB ({name})"] = f"{peak_memory_bytes(fn, device) / 2**20:.0f}"
        if rss:
            for name in built.run:
                peak = peak_rss_bytes(name, sizes, device)
                if peak is not None:
                    extras[f"peak RSS MB ({name})"] = f"{peak / 2**20:.0f}"
        if timing is not None:
            for name in built.run:
                seconds = timing.medians[name]
                extras[f"images/s ({name})"] = f"{sizes.unet_batch / seconds:.1f}"
                extras[f"TFLOP/s ({name})"] = f"{flops / seconds / 1e12:.3g}"
                if peak_tflops:
                    extras[f"% of peak ({name})"] = f"{100 * flops / seconds / 1e12 / peak_tflops:.1f}"
        return extras

    lo = sizes.unet_dtype is not None
    return Comparison(
        family=FAMILY_NAME,
        labels={
            "Unet": f"dim {sizes.unet_dim}, mults {sizes.unet_dim_mults}",
            "batch": f"{sizes.unet_batch}x{sizes.unet_channels}x{sizes.unet_image}x{sizes.unet_image}",
            "dtype": sizes.unet_dtype or "float32",
        },
        variants={name: Variant(fn, view(built.params[name])) for name, fn in built.run.items()},
        reference="torch",
        ratios=(("pfunc", "torch"), ("pfunc func.grad", "torch"), ("pfunc pf.grad", "torch")),
        rtol=5e-2 if lo else 1e-3,
        atol=5e-3 if lo else 1e-5,
        sync=sync,
        after=after,
    )


def comparisons(sizes: Sizes, device: torch.device | str = "cpu", *, peak_tflops: Optional[float] = None) -> Iterator[Comparison]:
    """The item-6 row, if the diffusion example is present."""
    if available():
        yield comparison(sizes, torch.device(device), peak_tflops)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.unet --route NAME --sizes JSON``: one route's peak RSS, as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.unet", description=main.__doc__)
    parser.add_argument("--route", required=True, choices=ROUTES)
    parser.add_argument("--sizes", required=True, help="the Sizes as JSON (dataclasses.asdict)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    fields = json.loads(args.sizes)
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    torch.set_num_threads(args.threads)
    print(json.dumps({"route": args.route, "peak_rss_bytes": _measure_rss(args.route, sizes, torch.device("cpu"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
