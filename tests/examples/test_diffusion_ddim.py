"""DDIM at any step count is finite: the step coefficients from the float64 schedule without the
cancellation that made 1 - abar_next - sigma^2 round below zero, and sampling from briefly trained
tiny models (every objective, both schedules, 1000 steps) giving finite images in [0, 1]."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.diffusion.data import draw_shapes
from examples.diffusion.gaussian_diffusion import GaussianDiffusion, normalize_to_neg_one_to_one
from examples.diffusion.schedules import beta_schedule, ddim_coefficients, ddim_time_pairs
from examples.diffusion.training import MicroBatch, TrainState, make_grad_fn, make_loss_fn, make_optimizer, train_step
from examples.diffusion.unet import Unet, parametrize_unet


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


@given(name=st.sampled_from(["linear", "cosine"]), T=st.integers(21, 2000), k=st.integers(1, 2000),
       eta=st.floats(0, 1))
def test_ddim_step_coefficients_are_finite_non_negative_and_keep_the_marginal_variance(name, T, k, eta):
    k = min(k, T)
    ac = torch.cumprod(1 - beta_schedule(name, T), 0)   # float64, as the sampler reads it
    for t, t_next in ddim_time_pairs(T, k):
        if t_next < 0:
            continue
        a, an = float(ac[t]), float(ac[t_next])
        c, sigma = ddim_coefficients(a, an, eta)
        assert math.isfinite(c) and math.isfinite(sigma) and c >= 0 and sigma >= 0
        assert c * c + sigma * sigma == pytest.approx(1 - an, rel=1e-12, abs=1e-15)
        assert sigma * sigma == pytest.approx(eta**2 * (1 - an) / (1 - a) * (1 - a / an), rel=1e-9, abs=1e-15)


def test_the_cosine_schedules_first_ddim_step_gets_its_tiny_c_right_where_float32_cancellation_did_not():
    ac = torch.cumprod(1 - beta_schedule("cosine", 1000), 0)
    for k in (2, 3, 5):
        t, t_next = ddim_time_pairs(1000, k)[0]
        a, an = float(ac[t]), float(ac[t_next])
        assert t == 999 and a < 1e-8        # the last beta is clipped to 0.999
        exact_c2 = a * (1 - an) ** 2 / (an * (1 - a))   # eta = 1, in closed form
        c, _ = ddim_coefficients(a, an, 1.0)
        assert c * c == pytest.approx(exact_c2, rel=1e-9)
        # the textbook formula in float32 (0, or +-1 rounding step of 1 - abar_next) has not one correct digit
        a32, an32 = torch.tensor(a, dtype=torch.float32), torch.tensor(an, dtype=torch.float32)
        textbook = float(1 - an32 - (1 - a32 / an32) * (1 - an32) / (1 - a32))
        assert abs(textbook - exact_c2) >= exact_c2


def test_ddim_coefficients_refuse_values_outside_their_domain():
    with pytest.raises(ValueError, match="alpha < alpha_next"):
        ddim_coefficients(0.5, 0.25, 1.0)
    with pytest.raises(ValueError, match="eta must be in"):
        ddim_coefficients(0.25, 0.5, 1.5)


def test_ddim_sampling_refuses_a_non_finite_eta():
    d = GaussianDiffusion(beta_schedule("linear", 100))
    for eta in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="eta must be a number in"):
            d.ddim_sample(lambda x, t, sc: torch.zeros_like(x), (1, 1, 2, 2), torch.Generator(), 5, eta)


def _briefly_trained(objective: str, schedule: str, steps: int = 12):
    torch.manual_seed(0)
    unet = Unet(dim=8, dim_mults=(1, 2), channels=1, resnet_block_groups=4, attn_heads=2, attn_dim_head=8)
    net = parametrize_unet(unet)
    diffusion = GaussianDiffusion(beta_schedule(schedule, 1000), objective=objective)
    p0, state = net.init(generator=torch.Generator().manual_seed(0))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in p0.items()}
    ts = TrainState(params, state, {k: v.detach().clone() for k, v in params.items()}, make_optimizer(params, 2e-3, 0.0), 0)
    grad_fn = make_grad_fn(make_loss_fn(net, diffusion))
    data, _ = draw_shapes(8 * steps, 8, 1, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        x0 = normalize_to_neg_one_to_one(data[8 * i : 8 * (i + 1)])
        mb = MicroBatch(x0, torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g), False)
        losses.append(train_step(ts, grad_fn, [mb], max_grad_norm=1.0, ema_decay=0.9, ema_every=1, ema_after=0))
    assert all(math.isfinite(v) for v in losses)
    values, _ = net.materialize(ts.params, ts.state, training=False)
    return diffusion, (lambda x, t, sc: net.apply(values, x, t, sc))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_ddim_from_a_briefly_trained_model_gives_finite_images_in_range_at_any_step_count(objective, schedule):
    diffusion, model = _briefly_trained(objective, schedule)
    for steps in (1, 2, 3, 5, 10):
        for eta in (0.0, 1.0):
            calls = []
            x = diffusion.sample(model, (4, 1, 8, 8), torch.Generator().manual_seed(steps), steps, eta,
                                 on_step=lambda: calls.append(1))
            assert bool(torch.isfinite(x).all()), f"{objective}/{schedule}: {steps} steps, eta {eta} gave non-finite pixels"
            assert x.min() >= 0 and x.max() <= 1
            assert len(calls) == steps == diffusion.num_sampling_steps(steps)


def test_ddim_time_pairs_equal_torch_linspace_truncated():
    """The host computation of the visited times matches ``torch.linspace(-1, T - 1, S + 1).int()``
    (what denoising-diffusion-pytorch uses), float32 rounding included."""
    from examples.diffusion.schedules import _linspace_float32_int

    cases = [(T, S) for T in range(1, 65) for S in range(1, T + 1)] + [(1000, S) for S in range(1, 1001, 7)] + [(4000, 250)]
    for T, S in cases:
        assert _linspace_float32_int(-1.0, float(T - 1), S + 1) == torch.linspace(-1, T - 1, steps=S + 1).int().tolist(), (T, S)
