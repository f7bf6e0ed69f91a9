"""The functional training step: torch.func grads equal autograd on a torch-parametrized twin, the
optimizer updates pfunc's originals, gradient accumulation, clipping, EMA, and the GPU options
(bf16 autocast, torch.compile) exercised on CPU through the same code."""

import pytest
import torch
from torch.nn.utils import parametrize as torch_parametrize

import pfunc as pf
from examples.diffusion.data import BatchOrder
from examples.diffusion.gaussian_diffusion import GaussianDiffusion
from examples.diffusion.schedules import cosine_beta_schedule
from examples.diffusion.training import (
    Generators,
    MicroBatch,
    TrainState,
    draw_micro_batch,
    make_grad_fn,
    make_loss_fn,
    make_optimizer,
    train_step,
    update_ema,
)
from examples.diffusion.unet import ResnetBlock, SinusoidalPosEmb, Unet, parametrize_unet, weight_standardization_spec


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


TINY = dict(dim=8, dim_mults=(1, 2), channels=1, resnet_block_groups=4, attn_heads=2, attn_dim_head=8)


def _setup(self_condition=False, learned_variance=False, seed=0):
    torch.manual_seed(seed)
    unet = Unet(**TINY, self_condition=self_condition, learned_variance=learned_variance)
    net = parametrize_unet(unet)
    diffusion = GaussianDiffusion(cosine_beta_schedule(100), self_condition=self_condition, learned_variance=learned_variance)
    params, state = net.init()
    return unet, net, diffusion, params, state


def _batch(n=4, seed=1, use_sc=False):
    g = torch.Generator().manual_seed(seed)
    return MicroBatch(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 100, (n,), generator=g),
                      torch.randn(n, 1, 8, 8, generator=g), use_sc)


def _state(net, params, state, lr=1e-3):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    return TrainState(params, dict(state), {k: v.detach().clone() for k, v in params.items()}, make_optimizer(params, lr, 0.0), 0)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_functional_grads_equal_autograd_on_the_torch_parametrized_twin(learned_variance):
    unet, net, diffusion, params, state = _setup(learned_variance=learned_variance)
    mb = _batch()
    grads, (loss, _) = make_grad_fn(make_loss_fn(net, diffusion))(params, state, mb.x0, mb.t, mb.noise, False)
    twin = pf.to_torch(net, params, state)  # torch.nn.utils.parametrize with the same originals
    assert torch_parametrize.is_parametrized(twin.downs[0][0].block1.proj, "weight")
    ref = diffusion.training_loss(lambda x, t, sc: twin(x, t, sc), mb.x0, mb.t, mb.noise)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    assert not loss.requires_grad and not any(g.requires_grad for g in grads.values())  # no outer graph
    named = dict(twin.named_parameters())
    for k, g in grads.items():
        torch.testing.assert_close(g, named[k].grad, rtol=1e-4, atol=1e-6, msg=k)


def test_optimizer_step_updates_the_raw_originals_and_the_values_stay_standardized():
    unet, net, diffusion, params, state = _setup()
    ts = _state(net, params, state)
    key = "downs.0.0.block1.proj.parametrizations.weight.original"
    before = ts.params[key].detach().clone()
    grad_fn = make_grad_fn(make_loss_fn(net, diffusion))
    train_step(ts, grad_fn, [_batch()], max_grad_norm=1.0, ema_decay=0.9, ema_every=1, ema_after=0)
    assert ts.step == 1 and not torch.equal(ts.params[key], before)
    values, _ = net.materialize(ts.params, ts.state, training=False)
    W = values["downs.0.0.block1.proj.weight"]
    torch.testing.assert_close(W.mean(dim=(1, 2, 3)), torch.zeros(W.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(W.var(dim=(1, 2, 3), unbiased=False), torch.ones(W.shape[0]), atol=1e-2, rtol=0)


def test_training_decreases_the_loss_on_a_fixed_batch():
    unet, net, diffusion, params, state = _setup()
    ts = _state(net, params, state, lr=3e-3)
    grad_fn = make_grad_fn(make_loss_fn(net, diffusion))
    mb = _batch(8)
    first = train_step(ts, grad_fn, [mb], max_grad_norm=1.0, ema_decay=0.9, ema_every=1, ema_after=0)
    for _ in range(30):
        last = train_step(ts, grad_fn, [mb], max_grad_norm=1.0, ema_decay=0.9, ema_every=1, ema_after=0)
    assert last < 0.5 * first


def test_gradient_accumulation_applies_the_mean_gradient_of_the_micro_batches():
    unet, net, diffusion, params, state = _setup()
    a, b = _batch(4, seed=1), _batch(4, seed=2)
    grad_fn = make_grad_fn(make_loss_fn(net, diffusion))
    ts = _state(net, params, state)
    loss = train_step(ts, grad_fn, [a, b], max_grad_norm=0.0, ema_decay=0.9, ema_every=1, ema_after=0)
    # by hand: mean of the two gradients, one AdamW step
    ref = _state(net, params, state)
    ga, (la, _) = grad_fn(ref.params, ref.state, a.x0, a.t, a.noise, False)
    gb, (lb, _) = grad_fn(ref.params, ref.state, b.x0, b.t, b.noise, False)
    for k, p in ref.params.items():
        p.grad = (ga[k] + gb[k]) / 2
    ref.optimizer.step()
    assert loss == pytest.approx(((la + lb) / 2).item(), rel=1e-6)
    for k in ts.params:
        torch.testing.assert_close(ts.params[k], ref.params[k], rtol=1e-6, atol=1e-7, msg=k)


def test_gradient_clipping_bounds_the_applied_gradient_norm():
    unet, net, diffusion, params, state = _setup()
    ts = _state(net, params, state)
    seen = {}
    step = ts.optimizer.step

    def spy(*a, **k):
        seen["norm"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ts.params.values()])).item()
        return step(*a, **k)

    ts.optimizer.step = spy
    train_step(ts, make_grad_fn(make_loss_fn(net, diffusion)), [_batch()], max_grad_norm=1e-3, ema_decay=0.9, ema_every=1, ema_after=0)
    assert seen["norm"] == pytest.approx(1e-3, rel=1e-3)


def test_ema_copies_until_after_then_decays_and_respects_every():
    ema = {"w": torch.zeros(2)}
    update_ema(ema, {"w": torch.ones(2)}, step=5, decay=0.9, every=1, after=10)
    assert torch.equal(ema["w"], torch.ones(2))  # still copying
    update_ema(ema, {"w": torch.full((2,), 3.0)}, step=11, decay=0.9, every=1, after=10)
    torch.testing.assert_close(ema["w"], torch.full((2,), 0.9 * 1 + 0.1 * 3))
    before = ema["w"].clone()
    update_ema(ema, {"w": torch.full((2,), 100.0)}, step=13, decay=0.9, every=2, after=10)
    assert torch.equal(ema["w"], before)  # 13 is not a multiple of 2


def test_self_conditioned_step_threads_state_and_is_finite():
    unet, net, diffusion, params, state = _setup(self_condition=True)
    ts = _state(net, params, state)
    loss = train_step(ts, make_grad_fn(make_loss_fn(net, diffusion)), [_batch(use_sc=True), _batch(seed=3)],
                      max_grad_norm=1.0, ema_decay=0.9, ema_every=1, ema_after=0)
    assert loss == loss and loss > 0


def test_bf16_autocast_runs_the_loss_in_bfloat16_with_the_matching_standardization_eps():
    unet, net, diffusion, params, state = _setup()
    mb = _batch()
    grad32 = make_grad_fn(make_loss_fn(net, diffusion))
    grad16 = make_grad_fn(make_loss_fn(net, diffusion, bf16=True, device_type="cpu"))
    g32, (l32, _) = grad32(params, state, mb.x0, mb.t, mb.noise, False)
    g16, (l16, _) = grad16(params, state, mb.x0, mb.t, mb.noise, False)
    assert l16.dtype == torch.float32 and torch.isfinite(l16)
    assert l16.item() != l32.item()  # really ran in lower precision
    assert l16.item() == pytest.approx(l32.item(), rel=0.1)
    for k in g32:
        assert g16[k].dtype == torch.float32 and torch.isfinite(g16[k]).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec = net.chains["downs.0.0.block1.proj.weight"][0]
        assert spec._eps(params["downs.0.0.block1.proj.parametrizations.weight.original"]) == 1e-3


class SmallDenoiser(torch.nn.Module):
    """A ResnetBlock-sized denoiser with the Unet's call signature: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.time = SinusoidalPosEmb(8)
        self.block = ResnetBlock(2, 4, time_emb_dim=8, groups=2)
        self.out = torch.nn.Conv2d(4, 1, 1)

    def forward(self, x, time, x_self_cond=None):
        x = torch.cat((x_self_cond if x_self_cond is not None else torch.zeros_like(x), x), dim=1)
        return self.out(self.block(x, self.time(time)))


def _compiled_matches_eager(net, diffusion, params, state, use_scs=(True,)):
    # "aot_eager" runs dynamo's capture and AOT autograd of the real step without a C++ toolchain
    loss_fn = make_loss_fn(net, diffusion)
    eager, compiled = make_grad_fn(loss_fn), make_grad_fn(loss_fn, compile=True, backend="aot_eager")
    for use_sc in use_scs:
        mb = _batch(use_sc=use_sc)
        ge, (le, _) = eager(params, state, mb.x0, mb.t, mb.noise, use_sc)
        gc, (lc, _) = compiled(params, state, mb.x0, mb.t, mb.noise, use_sc)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for k in ge:
            torch.testing.assert_close(gc[k], ge[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.compile
def test_compiled_grad_fn_matches_eager_through_weight_standardization():
    torch.manual_seed(0)
    module = SmallDenoiser()
    net = pf.parametrize(module, weight_standardization_spec(module))
    assert len(net.chains) == 2
    diffusion = GaussianDiffusion(cosine_beta_schedule(100), self_condition=True)
    _compiled_matches_eager(net, diffusion, *net.init())


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_grad_fn_matches_eager_on_the_unet():
    unet, net, diffusion, params, state = _setup(self_condition=True)
    _compiled_matches_eager(net, diffusion, params, state, use_scs=(False, True))


def test_micro_batches_come_from_the_generators_and_replay_after_restoring_their_state():
    _, _, diffusion, _, _ = _setup(self_condition=True)
    data = torch.rand(10, 1, 8, 8)

    def gens():
        return Generators(BatchOrder(10, 4, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2), torch.Generator().manual_seed(3))

    g = gens()
    for _ in range(3):
        draw_micro_batch(data, g, diffusion, True, torch.device("cpu"))
    saved = g.state_dict()
    expected = [draw_micro_batch(data, g, diffusion, True, torch.device("cpu")) for _ in range(4)]
    h = gens()
    h.load_state_dict(saved)
    got = [draw_micro_batch(data, h, diffusion, True, torch.device("cpu")) for _ in range(4)]
    for e, r in zip(expected, got):
        assert torch.equal(e.x0, r.x0) and torch.equal(e.t, r.t) and torch.equal(e.noise, r.noise)
        assert e.use_self_condition == r.use_self_condition
    assert {e.use_self_condition for e in expected} <= {True, False}
    bad = saved | {"noise_device": "cuda"}
    with pytest.raises(ValueError, match="--device cuda"):
        gens().load_state_dict(bad)
