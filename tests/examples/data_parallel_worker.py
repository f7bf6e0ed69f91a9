"""One rank of ``tests/examples/test_diffusion_data_parallel.py``'s process-group test, started by torchrun:
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/examples/data_parallel_worker.py OUT``.

It drives :class:`examples.diffusion.data_parallel.DataParallel` on a small net with a BatchNorm (a
module buffer the forward changes) and a training-mode spectral norm (parametrization state), each
rank on its own data, and saves what the test checks to ``OUT/rank<R>.pt``. Not collected by pytest.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import pfunc as pf
from examples.diffusion.data_parallel import start_data_parallel
from examples.torchrun import launch_from_env
from pfunc.parametrizations import SpectralNorm

OUT = sys.argv[1]


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads the type and text
        return f"{type(e).__name__}: {e}"
    return "no error"


def main() -> None:
    launch = launch_from_env()
    dp = start_data_parallel(launch, torch.device("cpu"), "gloo", timeout_s=30.0, zero=False, bucket_cap_mb=0.001)
    rank = dp.rank
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    net = pf.parametrize(module, {"0.weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    if rank == 1:  # a rank that starts different is made rank 0's
        with torch.no_grad():
            params["3.bias"].add_(1.0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own data
    out: dict = {}
    streams = {"order": torch.arange(5)}
    state = dp.start_identical(params, state, streams)
    out["start_bias"] = params["3.bias"].detach().clone()
    out["streams_differ"] = error_of(lambda: dp.start_identical(params, state, {"order": torch.arange(5) + rank}))

    def loss_fn(p, s, xb):
        y, s = net(p, s, xb, training=True)
        return (y**2).mean(), s

    overlapped, average = dp.overlapped_grad_fn(loss_fn), dp.averager()
    for step in range(3):
        local, (loss, local_state) = pf.grad_and_value(loss_fn, has_aux=True)(params, state, x)
        grads, (loss2, new_state) = overlapped(params, state, x)
        out[f"local_grads_{step}"] = local
        out[f"overlapped_{step}"] = grads
        out[f"after_{step}"] = average(local)
        out[f"local_bn_{step}"] = new_state["1.running_mean"].clone()
        synced = dp.sync_buffers(state, new_state)
        out[f"synced_bn_{step}"] = synced["1.running_mean"].clone()
        out[f"synced_u_is_local_{step}"] = synced["0.parametrizations.weight.0._u"] is new_state["0.parametrizations.weight.0._u"]
        state = synced
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(0.1 * grads[k])
    # identical weights -> identical spectral-norm state without sending it; identical buffers after the sync
    out["params_identical"] = error_of(lambda: pf.distributed.check_identical(params, what="params"))
    out["state_identical"] = error_of(lambda: pf.distributed.check_identical(state, what="state"))
    out["param_state"] = {k: v for k, v in state.items() if ".parametrizations." in k}
    # nothing changed: nothing is sent (only rank 0 calls it: a collective would wait for rank 1 and time out)
    out["unchanged_is_same"] = dp.sync_buffers(state, state) is state if rank == 0 else True
    out["agree"] = dp.agree(0.5 + rank, stop=(rank == 1))
    out["agree_none"] = dp.agree(1.0, stop=False)
    torch.save(out, os.path.join(OUT, f"rank{rank}.pt"))
    dp.close(together=True)


if __name__ == "__main__":
    main()
