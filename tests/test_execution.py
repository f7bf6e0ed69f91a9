"""pfunc.execution: a module's code runs on private shadows, which behave as the module would."""

import threading

import pytest
import torch
from torch import nn

from pfunc.execution import ShadowPool


def _values(module):
    return {k: v.detach().clone() for k, v in [*module.named_parameters(), *module.named_buffers()]}


def _values_plus(module, delta):
    return {k: (v + delta if v.is_floating_point() else v) for k, v in _values(module).items()}


def test_forward_hooks_and_pre_hooks_run_on_the_shadow_as_on_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model[1].register_forward_hook(lambda m, args, out: seen.append(m.weight) or out + 1)
    values = _values_plus(model, 0.5)
    out, _ = ShadowPool(model).run(values, (torch.ones(1, 3),))
    expected = torch.func.functional_call(model, values, (torch.ones(1, 3),))
    assert torch.equal(out, expected)
    # the hook's module holds the call's tensors (copy-on-write copies of them), not the module's
    assert torch.equal(seen[0], values["1.weight"]) and not torch.equal(seen[0], model[1].weight)


def test_a_submodule_registered_twice_and_one_referenced_by_a_plain_attribute_see_the_calls_tensors():
    shared = nn.Linear(3, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = shared
            self.b = shared  # the same object under two names
            self.blocks = nn.ModuleList([nn.Linear(3, 3)])
            object.__setattr__(self, "helper", self.blocks[0])  # not registered: a plain attribute
            object.__setattr__(self, "pipeline", [self.a, self.blocks[0]])

        def forward(self, x):
            y = self.b(self.a(x))
            for layer in self.pipeline:
                y = layer(y)
            return self.helper(y)

    model = Net()
    values = _values_plus(model, 1.0)
    pool = ShadowPool(model)
    assert pool.param_keys == {"a.weight", "a.bias", "blocks.0.weight", "blocks.0.bias"}
    x = torch.randn(2, 3)
    out, _ = pool.run(values, (x,))
    lin = lambda z, n: nn.functional.linear(z, values[f"{n}.weight"], values[f"{n}.bias"])  # noqa: E731
    expected = lin(lin(lin(lin(lin(x, "a"), "a"), "a"), "blocks.0"), "blocks.0")
    torch.testing.assert_close(out, expected)


def test_multihead_attention_reads_its_weights_as_on_the_module():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    values = _values_plus(mha, 0.1)
    q = torch.randn(2, 5, 8)
    out, _ = ShadowPool(mha).run(values, (q, q, q), {"need_weights": False})
    expected = torch.func.functional_call(mha, values, (q, q, q), {"need_weights": False})
    assert torch.equal(out[0], expected[0])


def test_another_thread_reading_the_module_mid_call_sees_its_own_tensors():
    inside, release = threading.Event(), threading.Event()

    class Slow(nn.Linear):
        def forward(self, x):
            inside.set()
            release.wait(10)
            return super().forward(x)

    model = Slow(3, 3)
    own = dict(model.named_parameters())
    pool = ShadowPool(model)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=pool.run(_values_plus(model, 1.0), (torch.ones(1, 3),))))
    worker.start()
    assert inside.wait(10)
    mid_call = dict(model.named_parameters())  # read while the forward runs with other tensors
    release.set()
    worker.join()
    assert all(mid_call[k] is own[k] for k in own) and mid_call.keys() == own.keys()
    assert "out" in result


def test_concurrent_and_nested_calls_get_shadows_of_their_own_and_sequential_calls_reuse_one():
    seen = []
    both_inside = threading.Barrier(2, timeout=10)

    class Recorder(nn.Linear):
        def forward(self, x, depth=0, concurrent=False):
            seen.append((depth, concurrent, id(self)))
            if concurrent:
                both_inside.wait()  # two threads inside a call at once
            if depth == 0 and not concurrent:
                pool.run(_values(module), (x,), {"depth": 1})
            return super().forward(x)

    module = Recorder(2, 2)
    pool = ShadowPool(module)
    x = torch.ones(1, 2)
    for _ in range(3):
        pool.run(_values(module), (x,))
    outer = {i for d, c, i in seen if d == 0 and not c}
    inner = {i for d, c, i in seen if d == 1}
    assert len(outer) == 1 and len(inner) == 1 and outer != inner  # reused; a nested call does not share
    threads = [threading.Thread(target=pool.run, args=(_values(module), (x,), {"concurrent": True})) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = [i for d, c, i in seen if c]
    assert len(concurrent) == 2 and concurrent[0] != concurrent[1]
    assert id(module) not in {i for *_, i in seen}


def test_training_sets_every_mode_for_the_call_and_none_follows_the_modules_modes():
    model = nn.Sequential(nn.Dropout(1.0), nn.BatchNorm1d(2))
    pool = ShadowPool(model)
    x = torch.ones(4, 2)
    values = _values(model)
    out, changed = pool.run(values, (x,), training=False)
    torch.testing.assert_close(out, x)
    assert changed == {}
    out, changed = pool.run(values, (x,), training=True)
    assert torch.equal(out, torch.zeros(4, 2)) and set(changed) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    model.eval()
    out, changed = pool.run(values, (x,))
    torch.testing.assert_close(out, x)
    assert changed == {}
    assert not model.training and values["1.num_batches_tracked"] == 0


def test_a_method_stored_on_the_instance_is_rebound_to_the_shadow():
    class WithStoredMethod(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))
            self.step = self._step  # e.g. torch parametrizations set self.right_inverse this way

        def _step(self, x):
            self.count += 1
            return x * 2

    model = WithStoredMethod()
    out, changed = ShadowPool(model).run(_values(model), (torch.ones(2),), method="step")
    assert torch.equal(out, torch.full((2,), 2.0))
    assert float(changed["count"]) == 1.0 and float(model.count) == 0.0


def test_an_exception_in_the_forward_propagates_and_the_next_call_works():
    class Fails(nn.Linear):
        def forward(self, x, fail=False):
            if fail:
                raise RuntimeError("boom")
            return super().forward(x)

    model = Fails(2, 2)
    pool = ShadowPool(model)
    with pytest.raises(RuntimeError, match="boom"):
        pool.run(_values(model), (torch.ones(1, 2),), {"fail": True})
    out, _ = pool.run(_values(model), (torch.ones(1, 2),))
    torch.testing.assert_close(out, model(torch.ones(1, 2)))


def test_a_shadow_keeps_no_tensor_of_a_finished_call():
    model = nn.Linear(2, 2)
    pool = ShadowPool(model)
    values = _values(model)
    pool.run(values, (torch.ones(1, 2),))
    (shadow,) = pool._free
    assert all(v is None for v in shadow.root._parameters.values())


def test_a_torch_compiled_call_traces_the_shadow_without_graph_breaks():
    pytest.importorskip("torch._dynamo")
    from torch.torch_version import TorchVersion

    import pfunc as pf

    if TorchVersion(torch.__version__) < pf.COMPILE_MIN_TORCH:
        pytest.skip("torch.compile of pfunc needs a newer torch")
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    pool = ShadowPool(model)
    values = _values(model)
    before = {k: v.clone() for k, v in values.items()}

    def f(values, x):
        return pool.run(values, (x,), training=True)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(values, torch.randn(4, 3))
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, backend="aot_eager")
    x = torch.randn(4, 3)
    out, changed = compiled(values, x)
    eager_out, eager_changed = f(values, x)
    torch.testing.assert_close(out, eager_out)
    for k in eager_changed:
        torch.testing.assert_close(changed[k], eager_changed[k])
    assert all(torch.equal(values[k], before[k]) for k in values)  # the inputs were not mutated by the graph


def test_a_module_wrapped_by_ddp_or_fully_shard_is_refused_with_the_way_out(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 3))
        with pytest.raises(TypeError, match="wrapped by DistributedDataParallel.*ddp.module"):
            ShadowPool(ddp)
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        fully_shard(model[0])
        with pytest.raises(TypeError, match="'0' is wrapped by FSDPLinear"):
            ShadowPool(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_torchscript_module_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="'1' is a TorchScript module"):
        ShadowPool(model)
