"""How a call runs, on real models: privately, in the mode ``training`` says, state in and state out.

Each test names the failure it guards against; the models are small versions of torchvision's
ResNet and MobileNet, timm's Swin attention and geotorch's sphere (``tests/models.py``).
"""

import random
import signal
import threading
import time

import pytest
import torch
from torch import nn

import pfunc as pf
from pfunc.parametrizations import Skew, SpectralNorm, Symmetric
from tests.models import (
    AssignedRunningMean,
    MobileNetBlock,
    ResNet,
    Sphere,
    WindowAttention,
    assert_unwritten,
    conv_input,
    fingerprint,
    torch_forward,
)


def _resnet_net():
    torch.manual_seed(0)
    model = ResNet()  # freshly built: train mode
    assert model.training
    return model, pf.parametrize(model, {"fc.weight": SpectralNorm()})


# ----------------------------------------------------------------------------- training governs every layer
def test_eval_call_on_a_train_mode_resnet_equals_torch_eval_bitwise_and_changes_no_state():
    model, net = _resnet_net()
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x = conv_input()
    out, new_state = net(params, state, x, training=False)
    values, _ = net.materialize(params, state, training=False)
    expected, _ = torch_forward(model, values, x, training=False)
    assert torch.equal(out, expected)
    assert new_state.keys() == state.keys() and all(new_state[k] is state[k] for k in state)
    assert model.training and all(m.training for m in model.modules())


def test_training_call_equals_torch_train_forward_and_batchnorm_statistics_come_back_in_new_state():
    model, net = _resnet_net()
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    before = fingerprint(state)
    x = conv_input()
    model.eval()  # the module's own mode does not matter when training is given
    out, new_state = net(params, state, x, training=True)
    values, sn_state = net.materialize(params, state, training=True)
    expected, buffers = torch_forward(model, values, x, training=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    bn_keys = [k for k in state if "running" in k or "num_batches" in k]
    assert len(bn_keys) == 6 * 3
    for k in bn_keys:
        assert torch.equal(new_state[k], buffers[k]), k
        assert not torch.equal(new_state[k], state[k]), k
    for k in sn_state:
        if k not in bn_keys:
            assert torch.equal(new_state[k], sn_state[k]), k
    assert_unwritten(state, before)
    assert not model.training


def test_training_false_turns_off_dropout_too_and_none_keeps_each_layers_own_mode():
    torch.manual_seed(0)
    model = MobileNetBlock(p=0.9)  # train mode
    net = pf.parametrize(model, {})
    params, state = net.init()
    x = conv_input(8)
    eval_out, s_eval = net(params, state, x, training=False)
    again, _ = net(params, state, x, training=False)
    assert torch.equal(eval_out, again)  # no dropout, batch statistics not used
    expected, _ = torch_forward(model, {**params, **state}, x, training=False)
    assert torch.equal(eval_out, expected)
    assert all(s_eval[k] is state[k] for k in state)
    # None: the module's own modes, read at call time; here only the dropout stays in train mode
    model.eval()
    model.drop.train()
    torch.manual_seed(3)
    mixed, s_mixed = net(params, state, x)
    assert all(s_mixed[k] is state[k] for k in state)  # every BatchNorm in eval: nothing changes
    torch.manual_seed(3)
    assert torch.equal(mixed, model(x))
    model.drop.eval()
    assert torch.equal(net(params, state, x)[0], eval_out)


@pytest.mark.parametrize("bad", ["no", "yes", 1, 0, None.__class__, torch.tensor(True)])
def test_training_must_be_true_false_or_none_and_a_bad_value_runs_nothing(bad):
    calls = []
    model = nn.Linear(3, 3)
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    net = pf.parametrize(model, {"weight": Symmetric()})
    params, state = net.init()
    values, _ = net.materialize(params, state)
    for call in (
        lambda: net(params, state, torch.randn(2, 3), training=bad),
        lambda: net.materialize(params, state, training=bad),
        lambda: net.apply(values, torch.randn(2, 3), training=bad),
        lambda: pf.ensemble.call(net, *pf.ensemble.init(net, pf.ensemble.generators(0, 2)), torch.randn(2, 3), training=bad),
    ):
        with pytest.raises(TypeError, match="training must be True, False or None"):
            call()
    assert calls == []


def test_per_sample_gradients_with_training_false_on_a_train_mode_batchnorm_model():
    model, net = _resnet_net()
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x, y = conv_input(3), torch.tensor([0, 1, 2])

    def loss(p, s, xi, yi):
        out, _ = net(p, s, xi[None], training=False)
        return nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(pf.grad(loss), in_dims=(None, None, 0, 0))(params, state, x, y)
    for i in range(3):
        solo = pf.grad(loss)(params, state, x[i], y[i])
        for k in params:
            torch.testing.assert_close(grads[k][i], solo[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- state in, state out
def test_a_buffer_the_forward_assigns_comes_back_in_new_state_and_eval_drops_it():
    torch.manual_seed(0)
    model = AssignedRunningMean()
    net = pf.parametrize(model, {"lin.weight": Skew()})
    params, state = net.init()
    x = torch.randn(6, 4) + 2
    _, new_state = net(params, state, x, training=True)
    values, _ = net.materialize(params, state)
    _, expected = torch_forward(model, values, x, training=True)
    assert torch.equal(new_state["running_mean"], expected["running_mean"])
    assert torch.equal(state["running_mean"], torch.zeros(4))
    assert "running_mean" in model._buffers and torch.equal(model.running_mean, torch.zeros(4))
    assert net(params, state, x, training=False)[1]["running_mean"] is state["running_mean"]


def test_only_the_buffers_the_forward_changed_are_new_and_nothing_of_the_callers_is_written():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), AssignedRunningMean(4))
    model.register_buffer("constant", torch.arange(4.0))  # never written by the forward
    net = pf.parametrize(model, {"0.weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    p_before, s_before = fingerprint(params), fingerprint(state)
    x = torch.randn(8, 4)
    _, new_state = net(params, state, x, training=True)
    assert new_state["constant"] is state["constant"]
    changed = {k for k in state if new_state[k] is not state[k]}
    assert changed == {"1.running_mean", "1.running_var", "1.num_batches_tracked", "2.running_mean",
                       "0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v"}
    # every other path, in train mode with BatchNorm: nothing of the caller's is written
    values, _ = net.materialize(params, state, training=True)
    v_before = fingerprint(values)
    net.apply(values, x)
    net.apply(values, x, training=True)
    assert_unwritten(values, v_before)
    ens_p, ens_s = pf.ensemble.init(net, pf.ensemble.generators(0, 3))
    e_before = fingerprint(ens_s)
    pf.ensemble.call(net, ens_p, ens_s, x, training=True)
    assert_unwritten(ens_s, e_before)

    def loss(p, s):
        out, s = net(p, s, x, training=True)
        return out.sum(), s

    torch.func.grad(loss, has_aux=True)(params, state)
    pf.grad(loss, has_aux=True)(params, state)
    torch.func.vmap(lambda s: net(params, s, x, training=True)[0])(pf.ensemble.stack([state, state]))
    assert_unwritten(params, p_before)
    assert_unwritten(state, s_before)


def test_a_parametrized_batchnorm_buffer_keeps_its_original_through_a_training_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    net = pf.parametrize(model, {"1.running_mean": lambda m: m})  # the identity: the value is the original itself
    params, state = net.init()
    before = fingerprint(state)
    _, new_state = net(params, state, torch.randn(8, 3) + 5, training=True)
    assert_unwritten(state, before)
    # as with torch, BatchNorm's update of a parametrized buffer lands in the computed value and is dropped
    assert torch.equal(new_state["1.parametrizations.running_mean.original"], torch.zeros(3))
    assert not torch.equal(new_state["1.running_var"], state["1.running_var"])


# ----------------------------------------------------------------------------- threads and interrupts
def _module_snapshot(module):
    return [(m, dict(m._parameters), dict(m._buffers), dict(m._modules), m.training, sorted(m.__dict__)) for m in module.modules()]


def _assert_module_is(module, snapshot):
    now = _module_snapshot(module)
    assert len(now) == len(snapshot)
    for (m, p, b, c, t, d), (m0, p0, b0, c0, t0, d0) in zip(now, snapshot):
        assert m is m0 and t == t0 and d == d0
        assert p.keys() == p0.keys() and all(p[k] is p0[k] for k in p)
        assert b.keys() == b0.keys() and all(b[k] is b0[k] for k in b)
        assert c.keys() == c0.keys() and all(c[k] is c0[k] for k in c)


def test_two_threads_calling_one_net_get_their_own_weights_and_a_third_sees_the_modules_own_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net = pf.parametrize(model, {"0.weight": Symmetric()})
    own = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    own_values = {n: t.detach().clone() for n, t in own.items()}
    trees = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        params, state = net.init(values={k: torch.randn(v.shape, generator=g) for k, v in own.items()})
        trees.append((params, state))
    x = torch.randn(3, 4)
    expected = [net(p, s, x)[0].detach() for p, s in trees]
    errors, stop = [], threading.Event()

    def caller(i):
        p, s = trees[i]
        with torch.no_grad():
            for _ in range(2000):
                out, _ = net(p, s, x)
                if not torch.equal(out, expected[i]):
                    errors.append(f"thread {i} got another call's output")
                    return

    def watcher():
        while not stop.is_set():
            for n, t in [*model.named_parameters(), *model.named_buffers()]:
                if t is not own[n] or not torch.equal(t, own_values[n]):
                    errors.append(f"the module held a foreign tensor at {n}")
                    return

    threads = [threading.Thread(target=caller, args=(i,)) for i in (0, 1)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    assert errors == []


def test_an_interrupt_storm_never_leaves_the_module_touched_and_the_next_call_is_right():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.BatchNorm1d(8))])
    net = pf.parametrize(model, {"0.weight": Symmetric(), "2.weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected, expected_state = net(params, state, x, training=True)
    snapshot = _module_snapshot(model)
    before = fingerprint(state)
    rng = random.Random(0)
    durations = []
    with torch.no_grad():
        for _ in range(10):
            start = time.perf_counter()
            for _ in range(3):
                net(params, state, x, training=True)
            durations.append(time.perf_counter() - start)
    window = 0.9 * min(durations)  # the alarm lands at a random instant of the three calls

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for _ in range(300):
            try:  # one alarm, armed and disarmed inside the try: it fires in here or not at all
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, window))
                with torch.no_grad():
                    for _ in range(3):
                        net(params, state, x, training=True)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                interrupted += 1
                torch.set_grad_enabled(True)  # an interrupt inside no_grad's own __enter__ skips its __exit__
            _assert_module_is(model, snapshot)
            assert_unwritten(state, before)
            with torch.no_grad():
                out, new_state = net(params, state, x, training=True)
            assert torch.equal(out, expected)
            assert all(torch.equal(new_state[k], expected_state[k]) for k in state)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 100


# ----------------------------------------------------------------------------- strict values
def _linear_net():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    net = pf.parametrize(model, {"0.weight": Symmetric()})
    return net, *net.init()


def test_apply_refuses_missing_unknown_and_non_tensor_values_naming_them():
    net, params, state = _linear_net()
    values, _ = net.materialize(params, state)
    x = torch.randn(2, 3)
    with pytest.raises(KeyError, match=r"values is missing \['0.bias', '0.weight', '2.bias', '2.weight'\]"):
        net.apply({}, x)
    typo = {("2.wieght" if k == "2.weight" else k): v for k, v in values.items()}
    with pytest.raises(KeyError, match=r"missing \['2.weight'\].*unexpected \['2.wieght'\]"):
        net.apply(typo, x)
    with pytest.raises(TypeError, match=r"values\['2.bias'\] is NoneType, expected a Tensor"):
        net.apply({**values, "2.bias": None}, x)
    with pytest.raises(TypeError, match="values must be a dict of tensors"):
        net.apply([values], x)


def test_call_refuses_non_tensors_wrong_containers_shapes_and_meta_tensors_naming_them():
    net, params, state = _linear_net()
    x = torch.randn(2, 3)
    before = fingerprint(params)
    with pytest.raises(TypeError, match=r"params\['2.bias'\] is NoneType, expected a Tensor"):
        net({**params, "2.bias": None}, state, x)
    for bad in (None, [params], "params"):
        with pytest.raises(TypeError, match="params must be a dict of tensors"):
            net(bad, state, x)
    with pytest.raises(TypeError, match="state must be a dict of tensors"):
        net(params, None, x)
    with pytest.raises(ValueError, match=r"params\['2.bias'\] has shape \(1,\), but the net expects \(2,\)"):
        net({**params, "2.bias": torch.zeros(1)}, state, x)  # would broadcast silently
    stacked, _ = pf.ensemble.init(net, pf.ensemble.generators(0, 4))
    with pytest.raises(ValueError, match=r"has shape \(4, 3\), but the net expects \(3,\).*ensemble-stacked"):
        net(stacked, {}, x)
    with pytest.raises(ValueError, match=r"stacked ensemble params need \(N, 3\).*one net's params"):
        pf.ensemble.call(net, params, state, x)
    meta = {**params, "2.weight": torch.empty(2, 3, device="meta")}
    with pytest.raises(ValueError, match=r"params\['2.weight'\] is a meta tensor"):
        net(meta, state, x)
    assert_unwritten(params, before)


def test_an_unsafe_chain_may_change_its_originals_shape():
    class FirstRows(nn.Module):
        def forward(self, X):
            return X[:2]

    net = pf.parametrize(nn.Linear(3, 3, bias=False), {"weight": FirstRows()}, unsafe=True)
    params, state = net.init()
    params["parametrizations.weight.original"] = torch.randn(5, 3)  # unsafe: its shape is not checked
    out, _ = net(params, state, torch.randn(1, 3))
    assert out.shape == (1, 2)


def test_a_non_callable_parametrization_names_its_tensor():
    with pytest.raises(TypeError, match="the parametrization given for '0.weight' is not usable"):
        pf.parametrize(nn.Sequential(nn.Linear(3, 3)), {"0.weight": 3})
    net, params, state = _linear_net()
    with pytest.raises(TypeError, match="the parametrization given for '2.bias' is not usable"):
        net.register(params, state, "2.bias", "tanh")


# ----------------------------------------------------------------------------- torch's state_dict keys
def _geotorch_style_model():
    torch.manual_seed(0)
    model = nn.Sequential(WindowAttention(), nn.Linear(8, 4))
    torch.nn.utils.parametrize.register_parametrization(model[1], "weight", Sphere((4, 8)))
    return model


def test_state_dict_gives_torchs_keys_and_loads_strictly_with_non_persistent_buffers():
    model = _geotorch_style_model()
    net = pf.parametrize(model, {"0.proj.weight": SpectralNorm()})
    params, state = net.init(generator=torch.Generator().manual_seed(0))
    assert "0.relative_position_index" in state and "1.parametrizations.weight.0._reference" in state
    twin = pf.to_torch(net, params, state)
    sd = net.state_dict(params, state)
    assert sd.keys() == twin.state_dict().keys()
    twin.load_state_dict(sd, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        twin.load_state_dict({**params, **state}, strict=True)  # what the README used to show
    p2, s2 = pf.split_state_dict(net, twin.state_dict())
    assert p2.keys() == params.keys() and s2.keys() == state.keys()
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(net(p2, s2, x, training=False)[0], twin.eval()(x))


# ----------------------------------------------------------------------------- found on real models
def test_a_call_can_run_another_method_privately():
    class Sampler(nn.Linear):
        def sample(self, n, scale=1.0):
            return self(torch.ones(n, self.in_features)) * scale

    model = Sampler(3, 2)
    net = pf.parametrize(model, {"bias": torch.tanh})
    params, state = net.init()
    out, _ = net(params, state, 4, scale=2.0, method="sample")
    expected = torch.nn.functional.linear(torch.ones(4, 3), params["weight"], torch.tanh(params["parametrizations.bias.original"])) * 2
    torch.testing.assert_close(out, expected)
    out2, _ = net(params, state, 4, method=lambda m, n: m.sample(n, scale=2.0))
    torch.testing.assert_close(out2, expected)
    with pytest.raises(AttributeError, match="method: Sampler has no method 'smaple'"):
        net(params, state, 4, method="smaple")
    with pytest.raises(TypeError, match="method must be a method name or a callable"):
        net(params, state, 4, method=3)


def test_ensemble_call_forwards_keyword_arguments():
    class Scaled(nn.Linear):
        def forward(self, x, *, scale):
            return super().forward(x) * scale

    net = pf.parametrize(Scaled(3, 2), {})
    params, state = pf.ensemble.init(net, pf.ensemble.generators(0, 3))
    x = torch.randn(5, 3)
    out, _ = pf.ensemble.call(net, params, state, x, scale=3.0)
    for k in range(3):
        solo, _ = net(pf.ensemble.member(params, k), {}, x, scale=3.0)
        torch.testing.assert_close(out[k], solo)
    xs, scales = torch.randn(3, 5, 3), torch.tensor([1.0, 2.0, 3.0])
    out, _ = pf.ensemble.call(net, params, state, xs, batched_args=True, scale=scales)
    for k in range(3):
        torch.testing.assert_close(out[k], net(pf.ensemble.member(params, k), {}, xs[k], scale=scales[k])[0])


def test_ensemble_members_drawn_from_a_model_factory_get_the_architectures_own_init():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)  # _reset_parameters: not a reset_parameters method
            self.head = nn.Linear(8, 1)

    net = pf.parametrize(Attn(), {"head.weight": SpectralNorm()})
    gens = pf.ensemble.generators(seed=0, n=3)
    params, state = pf.ensemble.init(net, gens, factory=Attn)
    again, _ = pf.ensemble.init(net, pf.ensemble.generators(seed=0, n=3), factory=Attn)
    for k in params:
        assert torch.equal(params[k], again[k]), k
    w = params["attn.in_proj_weight"]
    assert not torch.equal(w[0], w[1])
    # member k is exactly what building the model under a seed drawn from gens[k] gives
    g = torch.Generator().manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = Attn()
    assert torch.equal(w[1], built.attn.in_proj_weight)
    with pytest.raises(ValueError, match=r"missing \['attn.in_proj_bias'.*unexpected"):
        pf.ensemble.init(net, gens, factory=lambda: nn.Linear(8, 1))


def test_init_with_a_generator_is_reproducible_for_parametrizations_that_draw_from_the_global_rng():
    net = pf.parametrize(nn.Linear(8, 4), {"weight": Sphere((4, 8))})
    state_before = torch.random.get_rng_state()
    p1, _ = net.init(generator=torch.Generator().manual_seed(0))
    p2, _ = net.init(generator=torch.Generator().manual_seed(0))
    p3, _ = net.init(generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's global RNG is left alone
    key = "parametrizations.weight.original"
    assert torch.equal(p1[key], p2[key]) and not torch.equal(p1[key], p3[key])
    e1, _ = pf.ensemble.init(net, pf.ensemble.generators(0, 2), reinit=None)
    e2, _ = pf.ensemble.init(net, pf.ensemble.generators(0, 2), reinit=None)
    assert torch.equal(e1[key], e2[key]) and not torch.equal(e1[key][0], e1[key][1])
