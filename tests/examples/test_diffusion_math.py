"""Gaussian diffusion math: schedule properties and round trips as Hypothesis properties, losses and
sampling checked against closed forms (an oracle denoiser for a one-point data set)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.diffusion.gaussian_diffusion import GaussianDiffusion, normalize_to_neg_one_to_one, unnormalize_to_zero_to_one
from examples.diffusion.schedules import beta_schedule, cosine_beta_schedule, linear_beta_schedule

timesteps = st.integers(min_value=21, max_value=2000)
schedules = st.sampled_from(["linear", "cosine"])
objectives = st.sampled_from(["pred_noise", "pred_x0", "pred_v"])


def _batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 2, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(n, 2, 3, 3, generator=g)
    return x0, noise, g


@given(T=timesteps, name=schedules)
def test_schedule_betas_lie_in_open_unit_interval_and_alphas_cumprod_strictly_decreases(T, name):
    d = GaussianDiffusion(beta_schedule(name, T))
    assert d.num_timesteps == T
    assert bool(((d.betas > 0) & (d.betas < 1)).all())
    ac = d.alphas_cumprod.double()
    assert bool((ac[1:] < ac[:-1]).all()) and 0 < ac[-1] and ac[0] < 1
    assert torch.allclose(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1]) and d.alphas_cumprod_prev[0] == 1


@given(T=st.integers(min_value=21, max_value=2000))
def test_linear_schedule_increases_and_spans_the_same_noise_for_any_length(T):
    betas = linear_beta_schedule(T)
    assert bool((betas[1:] > betas[:-1]).all())
    # rescaled so the total noise is about the same as DDPM's 1000 steps
    # float(): pytest.approx cannot compare a 0-d tensor when numpy is absent (as in CI)
    assert float(betas[0]) == pytest.approx(1e-4 * 1000 / T)
    assert float(betas[-1]) == pytest.approx(0.02 * 1000 / T)


@given(T=st.integers(min_value=10, max_value=2000))
def test_cosine_schedule_alphas_cumprod_follow_the_squared_cosine(T):
    s = 0.008
    ac = torch.cumprod(1 - cosine_beta_schedule(T, s), dim=0)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    # equal wherever the 0.999 clip on betas did not bite (it only bites at the very end)
    ok = expected > 1e-3
    torch.testing.assert_close(ac[ok], expected[ok], rtol=1e-9, atol=1e-12)


@given(T=timesteps, name=schedules)
def test_posterior_variance_lies_between_zero_and_beta(T, name):
    d = GaussianDiffusion(beta_schedule(name, T))
    assert d.posterior_variance[0] == 0
    assert bool((d.posterior_variance >= 0).all()) and bool((d.posterior_variance <= d.betas * (1 + 1e-6)).all())


@given(T=st.integers(min_value=21, max_value=1000), name=schedules, seed=st.integers(0, 2**16), frac=st.floats(0, 1))
def test_predict_start_from_noise_inverts_q_sample(T, name, seed, frac):
    d = GaussianDiffusion(beta_schedule(name, T))
    x0, noise, _ = _batch(seed)
    t = torch.full((4,), min(int(frac * T), T - 1))
    xt = d.q_sample(x0, t, noise)
    # the inverse multiplies noise by sqrt(1/abar - 1): allow for that amplification of float32 error
    scale = float(d.sqrt_recip_alphas_cumprod[t[0]])
    torch.testing.assert_close(d.predict_start_from_noise(xt, t, noise), x0, atol=2e-6 * scale + 1e-6, rtol=0)
    torch.testing.assert_close(d.predict_noise_from_start(xt, t, x0), noise, atol=2e-6 * scale / max(float(d.sqrt_recipm1_alphas_cumprod[t[0]]), 1e-3) + 1e-5, rtol=1e-4)


@given(T=st.integers(min_value=21, max_value=1000), name=schedules, seed=st.integers(0, 2**16), frac=st.floats(0, 1))
def test_predict_start_from_v_inverts_predict_v(T, name, seed, frac):
    d = GaussianDiffusion(beta_schedule(name, T))
    x0, noise, _ = _batch(seed)
    t = torch.full((4,), min(int(frac * T), T - 1))
    xt = d.q_sample(x0, t, noise)
    v = d.predict_v(x0, t, noise)
    torch.testing.assert_close(d.predict_start_from_v(xt, t, v), x0, atol=1e-5, rtol=0)


@given(objective=objectives, name=schedules, seed=st.integers(0, 2**16), frac=st.floats(0.05, 1))
def test_interpret_recovers_x0_and_noise_from_each_objectives_exact_target(objective, name, seed, frac):
    d = GaussianDiffusion(beta_schedule(name, 100), objective=objective)
    x0, noise, _ = _batch(seed)
    t = torch.full((4,), min(int(frac * 100), 99))
    xt = d.q_sample(x0, t, noise)
    target = {"pred_noise": noise, "pred_x0": x0, "pred_v": d.predict_v(x0, t, noise)}[objective]
    pred = d.interpret(target, xt, t)
    # float32 error grows with sqrt(1/abar_t) (x0 from noise) and sqrt(1/(1/abar_t - 1)) (noise from x0)
    amp = float(d.sqrt_recip_alphas_cumprod[t[0]]) + 1 / float(d.sqrt_recipm1_alphas_cumprod[t[0]])
    torch.testing.assert_close(pred.pred_x_start, x0, atol=4e-6 * amp + 1e-5, rtol=0)
    torch.testing.assert_close(pred.pred_noise, noise, atol=4e-6 * amp + 1e-5, rtol=1e-4)


@given(seed=st.integers(0, 2**16), T=st.integers(21, 500))
def test_q_posterior_mean_is_x0_weighted_average_and_equals_x0_when_xt_is_x0_at_t1(seed, T):
    d = GaussianDiffusion(linear_beta_schedule(T))
    x0, noise, _ = _batch(seed)
    t = torch.zeros(4, dtype=torch.long)
    xt = d.q_sample(x0, t, noise)
    mean, var, _ = d.q_posterior(x0, xt, t)
    # at t = 0 the posterior of x_{-1} = x_0 is a point mass at x_0
    torch.testing.assert_close(mean, x0, atol=1e-5, rtol=0)
    assert bool((var == 0).all())


def test_normalization_round_trip():
    x = torch.rand(10)
    torch.testing.assert_close(unnormalize_to_zero_to_one(normalize_to_neg_one_to_one(x)), x)


def test_bad_schedules_and_objectives_are_refused():
    with pytest.raises(ValueError, match="objective"):
        GaussianDiffusion(linear_beta_schedule(100), objective="pred_eps")
    with pytest.raises(ValueError, match="schedule"):
        beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="above 20"):
        linear_beta_schedule(20)


# ------------------------------------------------------------------------------ losses
def _oracle(d: GaussianDiffusion, point: torch.Tensor):
    """The exact denoiser when the data set is the single image ``point``, in the objective's terms."""

    def model(x, t, sc):
        n = x.dim()
        a = d.sqrt_alphas_cumprod[t].reshape(-1, *(1,) * (n - 1))
        s = d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, *(1,) * (n - 1))
        x0 = point.expand_as(x)
        eps = (x - a * x0) / s
        return {"pred_noise": eps, "pred_x0": x0, "pred_v": a * eps - s * x0}[d.objective]

    return model


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_training_loss_is_zero_for_the_oracle_and_positive_for_a_wrong_model(objective):
    d = GaussianDiffusion(cosine_beta_schedule(100), objective=objective)
    point = torch.rand(1, 2, 3, 3) * 2 - 1
    x0 = point.expand(8, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 100, (8,), generator=g), torch.randn(8, 2, 3, 3, generator=g)
    assert d.training_loss(_oracle(d, point), x0, t, noise).item() < 1e-6
    assert d.training_loss(lambda x, t, sc: torch.zeros_like(x), x0, t, noise).item() > 1e-2


def test_self_conditioning_loss_feeds_the_detached_x0_estimate_back():
    d = GaussianDiffusion(linear_beta_schedule(50), self_condition=True)
    seen = []

    def model(x, t, sc):
        seen.append(sc)
        return torch.zeros_like(x)

    x0 = torch.rand(2, 1, 2, 2)
    t, noise = torch.tensor([3, 40]), torch.randn(2, 1, 2, 2)
    d.training_loss(model, x0, t, noise, use_self_condition=True)
    assert seen[0] is None and seen[1] is not None and not seen[1].requires_grad
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(seen[1], d.predict_start_from_noise(xt, t, torch.zeros_like(xt)).clamp(-1, 1))
    with pytest.raises(ValueError, match="self_condition"):
        GaussianDiffusion(linear_beta_schedule(50)).training_loss(model, x0, t, noise, use_self_condition=True)


def test_learned_variance_loss_adds_the_bound_and_trains_only_the_variance_through_it():
    d = GaussianDiffusion(cosine_beta_schedule(100), learned_variance=True)
    x0 = torch.rand(4, 1, 3, 3) * 2 - 1
    t, noise = torch.tensor([0, 5, 50, 99]), torch.randn(4, 1, 3, 3)
    pred = torch.zeros(4, 1, 3, 3, requires_grad=True)
    var = torch.zeros(4, 1, 3, 3, requires_grad=True)
    loss = d.training_loss(lambda x, t, sc: torch.cat([pred, var], 1), x0, t, noise)
    simple = noise.square().flatten(1).mean(1).mean()
    assert loss.item() > simple.item()  # the variational bound is positive
    gp, gv = torch.autograd.grad(loss, (pred, var))
    # the prediction's gradient is the simple loss's alone: the bound sees a detached mean
    torch.testing.assert_close(gp, 2 * (pred - noise).detach() / noise[0].numel() / 4)
    assert gv.abs().sum() > 0


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("self_condition", [False, True])
def test_ddim_and_ddpm_with_the_oracle_land_on_the_single_data_point(objective, self_condition):
    d = GaussianDiffusion(cosine_beta_schedule(100), objective=objective, self_condition=self_condition)
    point = torch.rand(1, 1, 4, 4) * 2 - 1
    model = _oracle(d, point)
    expected = unnormalize_to_zero_to_one(point).expand(3, -1, -1, -1)
    ddim = d.sample(model, (3, 1, 4, 4), torch.Generator().manual_seed(0), sampling_timesteps=10)
    ddim_noisy = d.sample(model, (3, 1, 4, 4), torch.Generator().manual_seed(0), sampling_timesteps=10, eta=1.0)
    ddpm = d.sample(model, (3, 1, 4, 4), torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ddim_noisy, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ddpm, expected, atol=1e-3, rtol=0)


def test_ddim_visits_the_seeds_time_pairs_and_is_deterministic_given_the_generator():
    d = GaussianDiffusion(linear_beta_schedule(1000))
    times = []

    def model(x, t, sc):
        times.append(int(t[0]))
        return torch.zeros_like(x)

    a = d.ddim_sample(model, (2, 1, 2, 2), torch.Generator().manual_seed(1), sampling_timesteps=4)
    b = d.ddim_sample(model, (2, 1, 2, 2), torch.Generator().manual_seed(1), sampling_timesteps=4)
    assert times[:4] == [999, 749, 499, 249]
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="sampling_timesteps"):
        d.ddim_sample(model, (1, 1, 2, 2), torch.Generator(), sampling_timesteps=1001)
