"""One rank of the ``pfunc.distributed`` tests: ``python tests/distributed_worker.py RANK WORLD STORE OUT TIMEOUT_S SCENARIO...``.

``tests/test_distributed.py`` starts WORLD of these (a gloo group over a file store) and checks
what each rank saved: ``OUT/<scenario>.<rank>.pt``, a dict of tensors and messages. The
scenarios run in order in one process group; each catches the errors it expects, so one
launch serves many tests. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import pfunc as pf
from pfunc.parametrizations import SpectralNorm, Symmetric

RANK, WORLD = int(sys.argv[1]), int(sys.argv[2])
STORE, OUT, TIMEOUT_S = sys.argv[3], sys.argv[4], float(sys.argv[5])
SCENARIOS = sys.argv[6:]


def save(name: str, result: dict) -> None:
    torch.save(result, os.path.join(OUT, f"{name}.{RANK}.pt"))


def error_of(fn) -> str:
    """The ``type: message`` of what ``fn()`` raises, or ``"no error"``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and the text
        return f"{type(e).__name__}: {e}"
    return "no error"


def mixed_tree(seed: int) -> dict:
    """Many small tensors of mixed dtypes, shapes and layouts (values depend on ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    tree = {}
    for i in range(40):
        tree[f"f32.{i}"] = torch.randn(1 + i % 7, 3 + i % 5, generator=g)
    for i in range(6):
        tree[f"f64.{i}"] = torch.randn(5, 2 + i, generator=g, dtype=torch.float64)
    for i in range(4):
        tree[f"bf16.{i}"] = torch.randn(8, 3, generator=g).to(torch.bfloat16)
        tree[f"f16.{i}"] = torch.randn(6, generator=g).to(torch.float16)
    tree["scalar"] = torch.randn((), generator=g)
    tree["empty"] = torch.zeros(0, 4)
    tree["transposed"] = torch.randn(4, 6, generator=g).t()  # not contiguous
    tree["complex"] = torch.randn(3, generator=g, dtype=torch.complex64)
    tree["unused"] = None  # a leaf-less node: passes through
    return tree


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))


# ---------------------------------------------------------------------- scenarios
def scenario_mean(name: str) -> None:
    tree = mixed_tree(seed=100 + RANK)
    before = {k: v.clone() for k, v in tree.items() if v is not None}
    plan = pf.distributed.bucket_plan(tree, bucket_cap_mb=0.0005)  # ~512 bytes: several buckets per dtype
    out = pf.distributed.all_reduce(tree, bucket_cap_mb=0.0005)
    pending = pf.distributed.all_reduce(tree, bucket_cap_mb=0.0005, async_op=True)
    unchanged = all(torch.equal(tree[k], before[k]) for k in before)
    ints = {"counts": torch.arange(5, dtype=torch.int64) * (RANK + 1), "small": torch.tensor([RANK + 1], dtype=torch.int32)}
    save(name, {
        "input": before, "mean": out, "sum_ints": pf.distributed.all_reduce(ints, op="sum"), "ints": ints,
        "inputs_unchanged": unchanged, "plan": plan, "buckets": pending.buckets, "none_kept": out["unused"] is None,
        "storage_shared_with_input": any(
            out[k].untyped_storage().data_ptr() == tree[k].untyped_storage().data_ptr() for k in before if tree[k].numel()
        ),
    })
    pending.wait()


def scenario_async(name: str) -> None:
    tree = mixed_tree(seed=200 + RANK)
    sync = pf.distributed.all_reduce(tree, bucket_cap_mb=0.001)
    pending = pf.distributed.all_reduce(tree, bucket_cap_mb=0.001, async_op=True)
    launched_at_return = pending.launched
    busy = torch.randn(64, 64)
    for _ in range(20):  # other work while the buckets travel
        busy = torch.tanh(busy @ busy)
    first, second = pending.wait(), pending.wait()
    save(name, {
        "sync": sync, "async": first, "same_tree_twice": first is second,
        "launched_at_return": launched_at_return, "buckets": pending.buckets,
    })


def scenario_backward(name: str) -> None:
    module = mlp()
    net = pf.parametrize(module, {"2.weight": Symmetric(), "4.weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(300 + RANK)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    params["unused"] = torch.zeros(3, requires_grad=True)  # the loss does not depend on it

    def loss_of(leaves):
        p = {k: v for k, v in leaves.items() if k != "unused"}
        out, _ = net(p, state, x, training=True)
        return (out - y).pow(2).mean()

    # the reference: autograd, then the synchronous bucketed all-reduce
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    local = dict(zip(leaves, torch.autograd.grad(loss_of(leaves), list(leaves.values()), allow_unused=True)))
    local["unused"] = torch.zeros(3)
    reference = pf.distributed.all_reduce(local, bucket_cap_mb=0.002)

    # pf.grad (the functional gradient), then the bucketed all-reduce
    via_pf_grad = pf.distributed.all_reduce(pf.grad(loss_of)(params), bucket_cap_mb=0.002)

    # the overlapped route, one call
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    overlapped = pf.distributed.all_reduce_grad(loss_of(leaves), leaves, bucket_cap_mb=0.002)
    hooks_left = any(t._backward_hooks for t in leaves.values())

    # the context manager around .backward(); a probe hook on the last-arriving input records
    # how many buckets were already on the wire before its gradient arrived
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    seen = {}
    loss = loss_of(leaves)
    last = "2.parametrizations.weight.original"  # materialised first in the forward: its gradient comes last
    leaves[last].register_hook(lambda grad: seen.update(launched=pending.launched))  # fires before pfunc's hook
    with pf.distributed.all_reduce_in_backward(loss, leaves, bucket_cap_mb=0.002) as pending:
        loss.backward()
    in_context = pending.wait()
    plan = pending.bucket_keys

    # a graph that differs across ranks (rank 1 skips layer 2): every rank falls back to
    # launching after the backward, and the result is still the mean
    def branchy(leaves):
        values, _ = net.materialize({k: v for k, v in leaves.items() if k != "unused"}, state, training=False)
        h = x
        for i in range(0, 7, 2):
            if i == 2 and RANK == 1:
                continue  # rank 1 skips layer 2: its weight and bias get no gradient there
            h = torch.nn.functional.linear(h, values[f"{i}.weight"], values[f"{i}.bias"])
            h = torch.tanh(h) if i < 6 else h
        return (h - y).pow(2).mean()
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(branchy(leaves), list(leaves.values()), allow_unused=True)
    branch_local = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    branch_reference = pf.distributed.all_reduce(branch_local, bucket_cap_mb=0.002)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = branchy(leaves)
    with pf.distributed.all_reduce_in_backward(loss, leaves, bucket_cap_mb=0.002) as branch_pending:
        loss.backward()
        branch_launched_in_backward = branch_pending.launched
    branch = branch_pending.wait()

    # two backwards in one block: a clear error, raised from the hook
    leaves = {k: v.detach().requires_grad_() for k, v in params.items() if k != "unused"}
    def twice():
        loss = loss_of(leaves)
        with pf.distributed.all_reduce_in_backward(loss, leaves, bucket_cap_mb=0.002, check=False) as p2:
            loss.backward(retain_graph=True)
            loss.backward()
        p2.wait()
    twice_error = error_of(twice)
    save(name, {
        "local": local, "reference": reference, "overlapped": overlapped, "in_context": in_context, "via_pf_grad": via_pf_grad,
        "hooks_left": hooks_left, "launched_before_last_grad": seen["launched"], "buckets": pending.buckets,
        "plan": plan, "branch_reference": branch_reference, "branch": branch,
        "branch_launched_in_backward": branch_launched_in_backward, "twice_error": twice_error,
    })


def scenario_broadcast(name: str) -> None:
    g = torch.Generator().manual_seed(400 + RANK)
    tree = {
        "w": torch.randn(5, 3, generator=g).requires_grad_(),
        "half": torch.randn(7, generator=g).half(),
        "mask": torch.rand(9, generator=g) > 0.5,
        "steps": torch.randint(0, 100, (3,), generator=g),
        "scalar": torch.randn((), generator=g, dtype=torch.float64),
        "complex": torch.randn(2, 2, generator=g, dtype=torch.complex64),
        "bytes": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "nested": {"t": torch.randn(3, 4, generator=g).t(), "empty": torch.zeros(0)},
    }
    before = {k: v.detach().clone() for k, v in pf.tree.tree_map(lambda t: t, tree).items() if k != "nested"}
    from_0 = pf.distributed.broadcast(tree, bucket_cap_mb=0.0001)  # ~100 bytes: many buckets
    from_1 = pf.distributed.broadcast(tree, src=1)
    flat_in = {k: v for k, v in tree.items() if k != "nested"}
    save(name, {
        "input": pf.tree.tree_map(lambda t: t.detach(), tree), "from_0": pf.tree.tree_map(lambda t: t.detach(), from_0),
        "from_1": pf.tree.tree_map(lambda t: t.detach(), from_1),
        "requires_grad": {k: v.requires_grad for k, v in from_0.items() if k != "nested"},
        "is_leaf": from_0["w"].is_leaf,
        "inputs_unchanged": all(torch.equal(flat_in[k].detach(), before[k]) for k in before),
        "own_storage": len({v.untyped_storage().data_ptr() for k, v in from_0.items() if k != "nested" and v.numel()}) == 7,
    })


def scenario_identical(name: str) -> None:
    same = {f"layer.{i}.weight": torch.randn(4, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    ok = error_of(lambda: pf.distributed.check_identical(same, what="params"))
    differs = dict(same)
    if RANK == 1:
        w = same["layer.3.weight"].clone()
        w[2, 1] = torch.nextafter(w[2, 1], torch.tensor(float("inf")))  # one element, one ulp
        differs["layer.3.weight"] = w
        differs["layer.5.weight"] = same["layer.5.weight"] + 1
    one_ulp = error_of(lambda: pf.distributed.check_identical(differs, what="params"))
    signed_zero = {"z": torch.zeros(3) if RANK == 0 else -torch.zeros(3)}
    zero = error_of(lambda: pf.distributed.check_identical(signed_zero))
    swapped = {"w": torch.tensor([1.0, 2.0]) if RANK == 0 else torch.tensor([2.0, 1.0])}  # same sum, other order
    order = error_of(lambda: pf.distributed.check_identical(swapped))
    # after broadcast from rank 0 the check passes
    fixed = error_of(lambda: pf.distributed.check_identical(pf.distributed.broadcast(differs), what="params"))
    save(name, {"ok": ok, "one_ulp": one_ulp, "signed_zero": zero, "order": order, "fixed": fixed})


def scenario_structure(name: str) -> None:
    base = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    extra = dict(base, **({"c": torch.ones(1)} if RANK == 1 else {}))
    shape = dict(base, b=torch.ones(2, 3) if RANK == 1 else torch.ones(2, 2))
    dtype = dict(base, a=torch.ones(3, dtype=torch.float64) if RANK == 1 else torch.ones(3))
    results = {
        "extra_key": error_of(lambda: pf.distributed.all_reduce(extra)),
        "shape": error_of(lambda: pf.distributed.all_reduce(shape)),
        "dtype": error_of(lambda: pf.distributed.broadcast(dtype)),
        "check_same_structure": error_of(lambda: pf.distributed.check_same_structure(extra)),
        "same": error_of(lambda: pf.distributed.check_same_structure(base)),
    }
    # every rank raised, so the group is still in step: a last collective agrees
    results["after"] = pf.distributed.all_reduce({"x": torch.tensor([float(RANK)])})["x"]
    save(name, results)


def scenario_bad_input(name: str) -> None:
    """Errors raised before any collective, identically on every rank."""
    t = {"w": torch.ones(2)}
    results = {
        "non_tensor": error_of(lambda: pf.distributed.all_reduce({"w": torch.ones(2), "lr": 0.1})),
        "mean_of_ints": error_of(lambda: pf.distributed.all_reduce({"n": torch.ones(2, dtype=torch.int64)})),
        "bool": error_of(lambda: pf.distributed.all_reduce({"m": torch.ones(2, dtype=torch.bool)}, op="sum")),
        "op": error_of(lambda: pf.distributed.all_reduce(t, op="max")),
        "cap": error_of(lambda: pf.distributed.all_reduce(t, bucket_cap_mb=0)),
        "cap_nan": error_of(lambda: pf.distributed.all_reduce(t, bucket_cap_mb=float("nan"))),
        "src": error_of(lambda: pf.distributed.broadcast(t, src=2)),
        "meta": error_of(lambda: pf.distributed.all_reduce({"w": torch.ones(2, device="meta")})),
        "sparse": error_of(lambda: pf.distributed.all_reduce({"s": torch.eye(2).to_sparse()})),
        "group": error_of(lambda: pf.distributed.all_reduce(t, group="world")),
        "no_grad": error_of(lambda: pf.distributed.all_reduce_grad(torch.ones(()), t)),
        "input_no_grad": error_of(lambda: pf.distributed.all_reduce_in_backward(torch.ones((), requires_grad=True), t).__enter__()),
        "output_not_scalar": error_of(lambda: pf.distributed.all_reduce_grad(torch.ones(2, requires_grad=True), t)),
    }
    # a group whose backend moves CUDA tensors only (gloo registered for cuda): CPU tensors are refused
    cuda_only = dist.new_group(backend="cuda:gloo")
    results["device"] = error_of(lambda: pf.distributed.all_reduce(t, group=cuda_only))
    results["device_broadcast"] = error_of(lambda: pf.distributed.broadcast(t, group=cuda_only))
    results["after"] = pf.distributed.all_reduce({"x": torch.tensor([float(RANK)])})["x"]
    save(name, results)


def scenario_stall(name: str) -> None:
    """Rank 1 stops taking part (alive, silent); rank 0's all-reduce must fail by the timeout."""
    pf.distributed.all_reduce({"w": torch.ones(4)})
    if RANK == 1:  # silent but alive (its sockets open) until rank 0 has reported
        deadline = time.monotonic() + TIMEOUT_S + 30
        while not os.path.exists(os.path.join(OUT, f"{name}.0.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    start = time.monotonic()
    message = error_of(lambda: pf.distributed.all_reduce({"w": torch.ones(1000)}))
    save(name, {"error": message, "seconds": time.monotonic() - start})
    os._exit(0)  # the group is broken: skip the teardown


def scenario_killed(name: str) -> None:
    """Rank 1 is SIGKILLed with its bucket all-reduces on the wire; rank 0 must fail, not hang."""
    tree = {f"w{i}": torch.randn(20_000) for i in range(8)}  # 8 buckets of 80 kB at bucket_cap_mb=0.08
    pf.distributed.all_reduce({"w": torch.ones(4)})
    if RANK == 1:
        pending = pf.distributed.all_reduce(tree, bucket_cap_mb=0.08, async_op=True, check=False)
        assert pending.buckets == 8
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    message = error_of(lambda: [pf.distributed.all_reduce(tree, bucket_cap_mb=0.08, check=False) for _ in range(50)])
    save(name, {"error": message, "seconds": time.monotonic() - start})
    os._exit(0)


def main() -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{STORE}", rank=RANK, world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    for name in SCENARIOS:
        globals()[f"scenario_{name}"](name)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
