"""pfunc._vmap: vmap detection at any functorch level, and the power iteration as one operation with a batching rule."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pfunc import _power_kernels as kernels
from pfunc import power
from pfunc._vmap import HAS_OPS, is_vmapped

needs_ops = pytest.mark.skipif(not HAS_OPS, reason="torch.library.register_vmap needs torch >= 2.5")


def _seen(transform, x):
    seen = []

    def f(t):
        seen.append(is_vmapped(t))
        return t.sum()

    transform(f)(x)
    return seen[0]


def test_is_vmapped_sees_vmap_at_any_level_and_only_vmap():
    x = torch.randn(3, 4)
    assert _seen(lambda f: f, x) is False
    assert _seen(torch.func.grad, x) is False
    assert _seen(torch.func.vmap, x) is True
    assert _seen(lambda f: torch.func.vmap(torch.func.grad(f)), x) is True   # batched under a grad wrapper
    assert _seen(lambda f: torch.func.grad(lambda t: torch.func.vmap(f)(t).sum()), x) is True
    assert is_vmapped(torch.nn.Parameter(x)) is False


def _problem(B, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Ws = torch.randn(B, h, w, generator=g, dtype=dtype)
    us = power.normalize(torch.randn(B, h, generator=g, dtype=dtype), 1e-12)
    vs = power.normalize(torch.randn(B, w, generator=g, dtype=dtype), 1e-12)
    return Ws, us, vs


def _loop(Ws, us, vs, n):
    pairs = [kernels.iterate_mv(W, u, v, n, 1e-12) for W, u, v in zip(Ws, us, vs)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@given(
    kernel=st.sampled_from(kernels.KERNELS),
    B=st.integers(1, 5), h=st.integers(1, 7), w=st.integers(1, 7), n=st.integers(1, 4), seed=st.integers(0, 2**16),
)
def test_every_batched_kernel_equals_a_loop_of_torchs_iteration(kernel, B, h, w, n, seed):
    Ws, us, vs = _problem(B, h, w, seed)
    for got, expected in zip(kernels.iterate_batched(Ws, us, vs, n, 1e-12, kernel), _loop(Ws, us, vs, n)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_every_batched_kernel_keeps_the_conjugate_transpose_of_complex_matrices(kernel):
    Ws, us, vs = (x.to(torch.complex128) for x in _problem(3, 5, 4, 0))
    Ws = Ws + 1j * torch.randn(Ws.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for got, expected in zip(kernels.iterate_batched(Ws, us, vs, 3, 1e-12, kernel), _loop(Ws, us, vs, 3)):
        torch.testing.assert_close(got, expected)


@needs_ops
@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_the_vmapped_iteration_runs_the_chosen_kernel_and_equals_the_loop(kernel, monkeypatch):
    chosen = []

    def pick(device, dtype, B, h, w):
        chosen.append((device.type, dtype, B, h, w))
        return kernel

    monkeypatch.setattr(kernels, "batched_kernel", pick)
    Ws, us, vs = _problem(6, 5, 4, 3, dtype=torch.float32)
    batched = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, 4))(Ws, us, vs)
    assert chosen == [("cpu", torch.float32, 6, 5, 4)]   # one call for the whole stack
    for got, expected in zip(batched, _loop(Ws, us, vs, 4)):
        torch.testing.assert_close(got, expected)


# in_dims of (W, u, v); None: shared by every member
IN_DIMS = [(0, 0, 0), (None, 0, 0), (0, None, None), (1, 0, None), (None, None, 1)]


@needs_ops
@pytest.mark.parametrize("in_dims", IN_DIMS)
def test_the_batching_rule_equals_the_loop_for_batched_and_shared_inputs(in_dims):
    B, h, w = 4, 6, 5
    g = torch.Generator().manual_seed(0)
    full = {"W": torch.randn(B, h, w, generator=g, dtype=torch.float64),
            "u": torch.randn(B, h, generator=g, dtype=torch.float64),
            "v": torch.randn(B, w, generator=g, dtype=torch.float64)}
    args = []
    for (name, x), d in zip(full.items(), in_dims):
        args.append(x[0] if d is None else x.movedim(0, d))
    member = lambda i: [x[0] if d is None else x[i] for x, d in zip(full.values(), in_dims)]  # noqa: E731
    f = lambda W, u, v: power.power_iteration(W, u, v, 3)  # noqa: E731
    batched = torch.func.vmap(f, in_dims=in_dims)(*args)
    looped = [f(*member(i)) for i in range(B)]
    for k in range(2):
        torch.testing.assert_close(batched[k], torch.stack([r[k] for r in looped]))


@needs_ops
@pytest.mark.parametrize("inner", [(0, 0, 0), (None, 0, 0)])
@pytest.mark.parametrize("outer", [(0, 0, 0), (None, 0, 0)])
def test_nested_vmap_equals_the_double_loop(inner, outer):
    g = torch.Generator().manual_seed(1)
    Ws = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64)
    us, vs = torch.randn(3, 4, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    W_arg = Ws if outer[0] == 0 else Ws[0]
    W_arg = W_arg if inner[0] == 0 else W_arg.select(-3, 0)
    f = lambda W, u, v: power.power_iteration(W, u, v, 3)  # noqa: E731
    got = torch.func.vmap(torch.func.vmap(f, in_dims=inner), in_dims=outer)(W_arg, us, vs)
    for j in range(3):
        for i in range(4):
            W = Ws[j if outer[0] == 0 else 0, i if inner[0] == 0 else 0]
            expected = f(W, us[j, i], vs[j, i])
            torch.testing.assert_close(got[0][j, i], expected[0])
            torch.testing.assert_close(got[1][j, i], expected[1])


@needs_ops
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0)])
def test_every_iteration_count_under_vmap_runs_the_kernel_once_outside_vmaps_layer(n, in_dims, monkeypatch):
    Ws, us, vs = _problem(5, 6, 4, 11)
    W = Ws if in_dims[0] == 0 else Ws[0]
    layers = []
    for name in ("iterate_batched", "iterate_shared"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real: layers.append(
            torch._C._functorch.peek_interpreter_stack()) or real(*a))
    got = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, n), in_dims=in_dims)(W, us, vs)
    assert layers == [None]   # one kernel call for the whole stack, its ops not batched one by one
    expected = _loop(Ws if in_dims[0] == 0 else Ws[:1].expand(5, 6, 4), us, vs, n)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@needs_ops
@pytest.mark.parametrize("in_dims", IN_DIMS)
def test_entering_the_batching_rule_directly_is_bitwise_the_dispatchers_route(in_dims):
    Ws, us, vs = _problem(4, 6, 5, 2, dtype=torch.float32)
    args = [x[0] if d is None else x.movedim(0, d) for x, d in zip((Ws, us, vs), in_dims)]
    direct = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, 3), in_dims=in_dims)(*args)
    dispatched = torch.func.vmap(lambda W, u, v: torch.ops.pfunc.power_iteration(W, u, v, 3, 1e-12), in_dims=in_dims)(*args)
    for a, b in zip(direct, dispatched):
        assert torch.equal(a, b)
    us3 = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(3))
    direct = torch.func.vmap(power.biggan_power_iteration)(Ws, us3)[1:]
    dispatched = torch.func.vmap(lambda W, u: torch.ops.pfunc.biggan_power_iteration(W, u, 1e-12))(Ws, us3)
    for a, b in zip(direct, dispatched):
        assert torch.equal(a, b)


@needs_ops
def test_the_vmapped_iteration_of_tensors_that_require_grad_returns_detached_vectors():
    Ws, us, vs = (x.clone().requires_grad_() for x in _problem(3, 5, 4, 0))
    for n in (1, 3):
        u, v = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, n))(Ws, us, vs)
        assert not u.requires_grad and not v.requires_grad
        for a, b in zip((u, v), _loop(Ws.detach(), us.detach(), vs.detach(), n)):
            torch.testing.assert_close(a, b)
    assert Ws.grad is None and us.grad is None


def _spectral(n):
    def sn(W, u, v):
        u, v = power.power_iteration(W, u, v, n)
        return W / power.sigma(W, u, v)

    return sn


def _biggan(W, us):
    svs, _, _ = power.biggan_power_iteration(W, us)
    return W / svs[0]


# each composes vmap with another transform around or inside it; each must equal the member-by-member loop
COMPOSITIONS = {
    "jvp(vmap)": lambda f, Ws, T, rest: torch.func.jvp(lambda W: torch.func.vmap(f)(W, *rest), (Ws,), (T,))[1],
    "vmap(jvp)": lambda f, Ws, T, rest: torch.func.vmap(
        lambda W, t, *r: torch.func.jvp(lambda W: f(W, *r), (W,), (t,))[1])(Ws, T, *rest),
    "grad(vmap)": lambda f, Ws, T, rest: torch.func.grad(lambda W: (torch.func.vmap(f)(W, *rest) * T).sum())(Ws),
    "vmap(grad)": lambda f, Ws, T, rest: torch.func.vmap(
        lambda W, t, *r: torch.func.grad(lambda W: (f(W, *r) * t).sum())(W))(Ws, T, *rest),
    "vmap(grad(grad))": lambda f, Ws, T, rest: torch.func.vmap(
        lambda W, t, *r: torch.func.grad(lambda W: (torch.func.grad(lambda W: (f(W, *r) * t).sum())(W) * t).sum())(W))(Ws, T, *rest),
}
LOOPS = {
    "jvp(vmap)": lambda f, W, t, r: torch.func.jvp(lambda W: f(W, *r), (W,), (t,))[1],
    "grad(vmap)": lambda f, W, t, r: torch.func.grad(lambda W: (f(W, *r) * t).sum())(W),
    "vmap(grad(grad))": lambda f, W, t, r: torch.func.grad(lambda W: (torch.func.grad(lambda W: (f(W, *r) * t).sum())(W) * t).sum())(W),
}
LOOPS["vmap(jvp)"], LOOPS["vmap(grad)"] = LOOPS["jvp(vmap)"], LOOPS["grad(vmap)"]


@needs_ops
@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("which", ["torch n=1", "torch n=3", "biggan"])
def test_vmap_composed_with_jvp_or_grad_equals_the_member_by_member_loop(composition, which):
    Ws, us, vs = _problem(4, 6, 5, 8)
    T = torch.randn(Ws.shape, dtype=Ws.dtype, generator=torch.Generator().manual_seed(9))
    if which == "biggan":
        f, rest = _biggan, (torch.randn(4, 2, 6, dtype=Ws.dtype, generator=torch.Generator().manual_seed(10)),)
    else:
        f, rest = _spectral(int(which[-1])), (us, vs)
    got = COMPOSITIONS[composition](f, Ws, T, rest)
    expected = torch.stack([LOOPS[composition](f, Ws[i], T[i], tuple(r[i] for r in rest)) for i in range(4)])
    torch.testing.assert_close(got, expected)


@needs_ops
def test_an_interrupt_in_the_kernel_leaves_vmap_and_dynamo_as_they_were(monkeypatch):
    Ws, us, vs = _problem(3, 5, 4, 0)
    f = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, 3))
    expected = f(Ws, us, vs)
    callback = torch._C._dynamo.eval_frame.set_eval_frame(None)
    torch._C._dynamo.eval_frame.set_eval_frame(callback)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "iterate_batched", interrupted)
    with pytest.raises(KeyboardInterrupt):
        f(Ws, us, vs)
    assert torch._C._functorch.peek_interpreter_stack() is None
    assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0
    assert torch._C._dynamo.eval_frame.set_eval_frame(callback) is callback   # restored
    monkeypatch.undo()
    for a, b in zip(f(Ws, us, vs), expected):
        assert torch.equal(a, b)


@needs_ops
def test_two_threads_running_the_vmapped_iteration_at_once_each_get_their_own_results():
    import threading

    problems = [_problem(5, 7, 6, seed) for seed in (20, 21)]
    f = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, 4))
    expected = [f(*p) for p in problems]
    errors, barrier = [], threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            for _ in range(200):
                for a, b in zip(f(*problems[k]), expected[k]):
                    assert torch.equal(a, b)
                # each thread's functorch stack is its own, and left as it was found
                assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@needs_ops
def test_a_traced_vmap_records_the_operation_as_one_node():
    from torch.fx.experimental.proxy_tensor import make_fx

    Ws, us, vs = _problem(4, 6, 5, 0, dtype=torch.float32)
    f = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, 4))
    graph = make_fx(f)(Ws, us, vs)
    calls = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.pfunc.power_iteration.default in calls
    assert torch.ops.aten.bmm.default not in calls   # the kernel did not run while tracing
    for a, b in zip(graph(Ws, us, vs), f(Ws, us, vs)):
        torch.testing.assert_close(a, b)


@needs_ops
@pytest.mark.parametrize("shared", [False, True])
def test_vmapped_biggan_iteration_equals_the_loop(shared):
    Ws, _, _ = _problem(4, 7, 6, 2)
    us = torch.randn(4, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    in_dims = (None, 0) if shared else (0, 0)
    got = torch.func.vmap(power.biggan_power_iteration, in_dims=in_dims)(Ws[0] if shared else Ws, us)
    for i in range(4):
        expected = power.biggan_power_iteration(Ws[0] if shared else Ws[i], us[i])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a[i], b)


@needs_ops
def test_gradients_reach_w_only_through_sigma_and_equal_under_vmap_and_grad():
    Ws, us, vs = _problem(5, 6, 4, 7)

    def sn(W, u, v):
        u, v = power.power_iteration(W, u, v, 2)
        return power.sigma(W, u, v)

    per_member = torch.stack([torch.func.grad(sn)(Ws[i], us[i], vs[i]) for i in range(5)])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(sn))(Ws, us, vs), per_member)
    torch.testing.assert_close(torch.func.grad(lambda W: torch.func.vmap(sn)(W, us, vs).sum())(Ws), per_member)
    u, v = _loop(Ws, us, vs, 2)
    torch.testing.assert_close(per_member, u.unsqueeze(-1) * v.unsqueeze(-2))   # d sigma / dW = u v^T


@needs_ops
def test_the_operations_pass_torchs_custom_op_checks():
    Ws, us, vs = _problem(3, 5, 4, 0, dtype=torch.float32)
    for args in [(Ws[0], us[0], vs[0], 2, 1e-12), (Ws, us, vs, 1, 1e-12), (Ws[0], us, vs, 3, 1e-12)]:
        torch.library.opcheck(torch.ops.pfunc.power_iteration.default, args)
    for args in [(Ws[0], us[:2], 1e-12), (Ws, us.unsqueeze(1).expand(3, 2, 5).contiguous(), 1e-12)]:
        torch.library.opcheck(torch.ops.pfunc.biggan_power_iteration.default, args)


def test_cpu_rule_batches_small_stacks_and_loops_over_stacks_beyond_the_caches():
    cpu = torch.device("cpu")
    assert kernels.batched_kernel(cpu, torch.float32, 16, 256, 256) == "bmm row"
    assert kernels.batched_kernel(cpu, torch.float32, 64, 64, 64) == "bmm row"
    assert kernels.batched_kernel(cpu, torch.float32, 64, 256, 256) == "bmm row"  # 16 MiB: still cached
    assert kernels.batched_kernel(cpu, torch.float32, 64, 512, 512) == "loop"     # 64 MiB of 1 MiB matrices
    assert kernels.batched_kernel(cpu, torch.float32, 32, 256, 1024) == "loop"    # 32 MiB of 1 MiB matrices
    assert kernels.batched_kernel(cpu, torch.float64, 1024, 64, 64) == "bmm row"  # 32 MiB of 32 KiB matrices
    assert kernels.batched_kernel(torch.device("cuda"), torch.float32, 64, 512, 512) == "bmm"  # one launch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keeps_the_batched_product_and_equals_the_loop():
    Ws, us, vs = (x.cuda() for x in _problem(8, 32, 16, 0))
    got = torch.func.vmap(lambda W, u, v: power.power_iteration(W, u, v, 3))(Ws, us, vs)
    for a, b in zip(got, _loop(Ws, us, vs, 3)):
        torch.testing.assert_close(a, b)


@needs_ops
@pytest.mark.compile
def test_vmapped_spectral_norm_compiles_to_one_graph_holding_the_operation():
    Ws, us, vs = _problem(4, 6, 5, 0, dtype=torch.float32)

    def sn(W, u, v):
        u, v = power.power_iteration(W, u, v, 3)
        return W / power.sigma(W, u, v), u, v

    f = lambda Ws, us, vs: torch.func.vmap(sn)(Ws, us, vs)  # noqa: E731
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(Ws, us, vs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert "pfunc.power_iteration" in "".join(g.print_readable(print_output=False) for g in explained.graphs)
    for got, expected in zip(torch.compile(f, backend="aot_eager")(Ws, us, vs), f(Ws, us, vs)):
        torch.testing.assert_close(got, expected)
