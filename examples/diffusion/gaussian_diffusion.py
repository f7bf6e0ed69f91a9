"""Gaussian diffusion (DDPM of Ho et al., DDIM of Song et al.) as pure functions of a denoiser.

:class:`GaussianDiffusion` holds only the noise schedule (plain tensors) and options;
every method takes the denoiser as an argument, ``model(x_t, t, x_self_cond) -> out``,
so the same object trains (``model`` closes over ``params``) and samples (``model``
closes over the EMA ``params``), and never owns weights. All randomness comes in as
tensors or an explicit ``torch.Generator``.

Conventions: data in ``[-1, 1]`` (:func:`normalize_to_neg_one_to_one`), integer
times ``t`` in ``[0, num_timesteps)``, ``objective`` one of ``"pred_noise"`` (DDPM's),
``"pred_x0"``, ``"pred_v"``. With ``learned_variance`` the denoiser returns
twice the channels; the second half interpolates the log variance between
``beta_t`` and the posterior variance (Improved DDPM), trained with the hybrid loss.

>>> import torch
>>> from examples.diffusion.schedules import linear_beta_schedule
>>> d = GaussianDiffusion(linear_beta_schedule(1000))
>>> x0, noise, t = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4), torch.tensor([0, 999])
>>> xt = d.q_sample(x0, t, noise)
>>> bool(torch.allclose(d.predict_start_from_noise(xt, t, noise), x0, atol=1e-3))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .schedules import ddim_coefficients, ddim_time_pairs

__all__ = [
    "normalize_to_neg_one_to_one",
    "unnormalize_to_zero_to_one",
    "ModelPrediction",
    "GaussianDiffusion",
    "OBJECTIVES",
]

Denoiser = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def normalize_to_neg_one_to_one(img: Tensor) -> Tensor:
    """``[0, 1] -> [-1, 1]``."""
    return img * 2 - 1


def unnormalize_to_zero_to_one(x: Tensor) -> Tensor:
    """``[-1, 1] -> [0, 1]``."""
    return (x + 1) * 0.5


def _host_tables(betas: Union[Tensor, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """The schedule and every table derived from it, as float64 Python floats, checked on the host."""
    if isinstance(betas, Tensor):
        if betas.dim() != 1:
            raise ValueError(f"GaussianDiffusion: betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        betas = betas.detach().to("cpu", torch.float64).tolist()
    b = [float(x) for x in betas]
    if not b:
        raise ValueError("GaussianDiffusion: betas must be a non-empty 1-D tensor, got shape (0,)")
    if not all(0 < x < 1 for x in b):
        raise ValueError("GaussianDiffusion: every beta must lie in (0, 1)")
    ac, prod = [], 1.0
    for x in b:
        prod *= 1.0 - x
        ac.append(prod)
    ac_prev = [1.0] + ac[:-1]
    posterior_variance = [x * (1.0 - p) / (1.0 - a) for x, a, p in zip(b, ac, ac_prev)]
    return {
        "betas": tuple(b),
        "alphas_cumprod": tuple(ac),
        "alphas_cumprod_prev": tuple(ac_prev),
        "sqrt_alphas_cumprod": tuple(math.sqrt(a) for a in ac),
        "sqrt_one_minus_alphas_cumprod": tuple(math.sqrt(1.0 - a) for a in ac),
        "log_one_minus_alphas_cumprod": tuple(math.log(1.0 - a) for a in ac),
        "sqrt_recip_alphas_cumprod": tuple(math.sqrt(1.0 / a) for a in ac),
        "sqrt_recipm1_alphas_cumprod": tuple(math.sqrt(1.0 / a - 1) for a in ac),
        "posterior_variance": tuple(posterior_variance),
        # the posterior variance is 0 at t = 0: clip its log
        "posterior_log_variance_clipped": tuple(math.log(max(v, 1e-20)) for v in posterior_variance),
        "posterior_mean_coef1": tuple(x * math.sqrt(p) / (1.0 - a) for x, a, p in zip(b, ac, ac_prev)),
        "posterior_mean_coef2": tuple((1.0 - p) * math.sqrt(1.0 - x) / (1.0 - a) for x, a, p in zip(b, ac, ac_prev)),
        "log_betas": tuple(math.log(x) for x in b),
    }


def _extract(a: Tensor, t: Tensor, ndim: int) -> Tensor:
    """``a[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against a ``ndim``-dimensional batch.

    ``index_select`` rather than ``a[t]``: the same gather, and one that a fake mode follows on
    torch's CPU-only wheel too (Python indexing of a fake CUDA tensor asks for CUDA's device guard).
    """
    return a.index_select(0, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x**3))))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor, thres: float = 0.999) -> Tensor:
    """Log-likelihood of 8-bit data ``x`` in ``[-1, 1]`` under a Gaussian discretized to bins of width 2/255."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -thres, log_cdf_plus, torch.where(x > thres, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12)))
    )


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


class ModelPrediction(NamedTuple):
    """The denoiser's output read as a noise estimate and an ``x_0`` estimate."""

    pred_noise: Tensor
    pred_x_start: Tensor


@dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """The forward (noising) process of ``betas`` and its learned reverse, for any denoiser.

    Args:
        betas: ``[T]`` noise schedule (e.g. :func:`cosine_beta_values`): Python floats, or a CPU tensor
            with real values; read on the host, derived in float64, stored on ``device`` as float32.
        objective: what the denoiser predicts: ``"pred_noise"``, ``"pred_x0"`` or ``"pred_v"``.
        self_condition: train with self-conditioning (half of the steps feed the model its own
            detached ``x_0`` estimate) and sample with it.
        learned_variance: the denoiser returns ``2 * C`` channels (prediction, variance
            interpolation); the loss adds ``vb_loss_weight`` times the variational bound.
        device: where the schedule's tables live (the device of the data they scale). They are
            made there from host floats (``torch.tensor(..., device=device)``), never computed on
            the device or moved from another, so building one reads no device data: a fake mode
            (``torch._subclasses.fake_tensor.FakeTensorMode``) can follow it.
    """

    betas: Union[Tensor, Sequence[float]]
    objective: str = "pred_noise"
    self_condition: bool = False
    learned_variance: bool = False
    vb_loss_weight: float = 0.001
    device: Union[torch.device, str] = "cpu"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"GaussianDiffusion: unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        host = _host_tables(self.betas)
        device = torch.device(self.device)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "_host", host)
        # DDIM's step coefficients come from these float64 host values (see ddim_coefficients)
        object.__setattr__(self, "_alphas_cumprod64", host["alphas_cumprod"])
        for k, v in host.items():
            object.__setattr__(self, k, torch.tensor(v, dtype=torch.float32, device=device))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        """The same process with its schedule tables made on ``device``."""
        return GaussianDiffusion(self._host["betas"], self.objective, self.self_condition, self.learned_variance,
                                 self.vb_loss_weight, device)

    # -------------------------------------------------------------------------- the forward process
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
        n = x_start.dim()
        return _extract(self.sqrt_alphas_cumprod, t, n) * x_start + _extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The ``x_0`` that gives ``x_t`` with ``noise`` (inverse of :meth:`q_sample` in ``x_0``)."""
        n = x_t.dim()
        return _extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, n) * noise

    def predict_noise_from_start(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that gives ``x_t`` from ``x0`` (inverse of :meth:`q_sample` in the noise)."""
        n = x_t.dim()
        return (_extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x0) / _extract(self.sqrt_recipm1_alphas_cumprod, t, n)

    def predict_v(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The velocity target ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0``."""
        n = x_start.dim()
        return _extract(self.sqrt_alphas_cumprod, t, n) * noise - _extract(self.sqrt_one_minus_alphas_cumprod, t, n) * x_start

    def predict_start_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """``x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``."""
        n = x_t.dim()
        return _extract(self.sqrt_alphas_cumprod, t, n) * x_t - _extract(self.sqrt_one_minus_alphas_cumprod, t, n) * v

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_0)``."""
        n = x_t.dim()
        mean = _extract(self.posterior_mean_coef1, t, n) * x_start + _extract(self.posterior_mean_coef2, t, n) * x_t
        return mean, _extract(self.posterior_variance, t, n), _extract(self.posterior_log_variance_clipped, t, n)

    # -------------------------------------------------------------------------- reading the denoiser
    def _split(self, out: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``(prediction, variance part or None)`` of a raw denoiser output."""
        if self.learned_variance:
            pred, var = out.chunk(2, dim=1)
            return pred, var
        return out, None

    def interpret(self, pred: Tensor, x_t: Tensor, t: Tensor, clip_x_start: bool = False) -> ModelPrediction:
        """``pred`` (the objective's target estimate) as noise and ``x_0`` estimates.

        With ``clip_x_start`` the ``x_0`` estimate is clamped to ``[-1, 1]`` and the noise
        re-derived from it, so both stay consistent (DDIM needs that).
        """
        if self.objective == "pred_noise":
            pred_noise = pred
            x_start = self.predict_start_from_noise(x_t, t, pred_noise)
            if clip_x_start:
                x_start = x_start.clamp(-1.0, 1.0)
                pred_noise = self.predict_noise_from_start(x_t, t, x_start)
        elif self.objective == "pred_x0":
            x_start = pred.clamp(-1.0, 1.0) if clip_x_start else pred
            pred_noise = self.predict_noise_from_start(x_t, t, x_start)
        else:
            x_start = self.predict_start_from_v(x_t, t, pred)
            if clip_x_start:
                x_start = x_start.clamp(-1.0, 1.0)
            pred_noise = self.predict_noise_from_start(x_t, t, x_start)
        return ModelPrediction(pred_noise, x_start)

    def model_predictions(
        self, model: Denoiser, x: Tensor, t: Tensor, x_self_cond: Optional[Tensor] = None, clip_x_start: bool = False
    ) -> ModelPrediction:
        """Run ``model`` on ``x_t`` and read its output (``model_predictions`` of denoising-diffusion-pytorch)."""
        pred, _ = self._split(model(x, t, x_self_cond))
        return self.interpret(pred, x, t, clip_x_start)

    def _model_log_variance(self, var_part: Optional[Tensor], t: Tensor, ndim: int) -> Tensor:
        min_log = _extract(self.posterior_log_variance_clipped, t, ndim)
        if var_part is None:
            return min_log
        max_log = _extract(self.log_betas, t, ndim)
        frac = unnormalize_to_zero_to_one(var_part)
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self, model: Denoiser, x: Tensor, t: Tensor, x_self_cond: Optional[Tensor] = None, clip_denoised: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and log variance of ``p(x_{t-1} | x_t)``, and the ``x_0`` estimate."""
        pred, var_part = self._split(model(x, t, x_self_cond))
        x_start = self.interpret(pred, x, t).pred_x_start
        if clip_denoised:
            x_start = x_start.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x_start, x, t)
        return mean, self._model_log_variance(var_part, t, x.dim()), x_start

    # -------------------------------------------------------------------------- training
    def training_loss(
        self,
        model: Denoiser,
        x_start: Tensor,
        t: Tensor,
        noise: Tensor,
        use_self_condition: bool = False,
    ) -> Tensor:
        """The mean training loss on a batch (``p_losses`` of denoising-diffusion-pytorch, L2 loss).

        The loss is the plain mean squared error of the objective's target, for every objective.
        denoising-diffusion-pytorch weights each sample's error for ``pred_v`` by ``snr / (snr + 1)``
        and for ``pred_x0`` by ``snr``, which turns both into the noise-prediction loss in another
        parametrization; unweighted, ``pred_v`` puts more weight on the noisiest times (``1 / abar_t``
        relative to noise prediction), where the shapes are decided: on the main job's shapes it gave
        half the FCD of noise prediction (``examples/diffusion/README.md``, "Which layout and objective").

        ``t`` and ``noise`` are drawn by the caller (explicit randomness). With
        ``use_self_condition`` (the caller's coin flip, half the time as in Chen et al.'s self-conditioning) the
        model first sees ``x_t`` alone and its detached ``x_0`` estimate, clipped to
        ``[-1, 1]`` as in sampling (denoising-diffusion-pytorch feeds it unclipped), is fed back.
        With learned variance the variational bound (KL to the true posterior, the
        decoder likelihood at ``t = 0``, in bits per dimension) is added, with gradients
        only to the variance (the mean is detached), as Improved DDPM.
        """
        x = self.q_sample(x_start, t, noise)
        x_self_cond = None
        if use_self_condition:
            if not self.self_condition:
                raise ValueError("training_loss: use_self_condition needs a GaussianDiffusion built with self_condition=True")
            with torch.no_grad():
                # clipped, as sampling feeds it: unclipped x_0 estimates at the noisiest steps are
                # the noise estimate's error times sqrt(1 / abar_t) (~1e4 for the cosine schedule)
                x_self_cond = self.model_predictions(model, x, t, clip_x_start=True).pred_x_start.detach()
        out = model(x, t, x_self_cond)
        pred, var_part = self._split(out)
        if self.objective == "pred_noise":
            target = noise
        elif self.objective == "pred_x0":
            target = x_start
        else:
            target = self.predict_v(x_start, t, noise)
        loss = _mean_flat((pred.float() - target.float()) ** 2)
        if var_part is not None:
            loss = loss + self.vb_loss_weight * self._vb_terms(x_start, x, t, pred.detach(), var_part)
        return loss.mean()

    def _vb_terms(self, x_start: Tensor, x_t: Tensor, t: Tensor, pred: Tensor, var_part: Tensor) -> Tensor:
        """Per-example variational-bound term in bits per dimension."""
        pred, var_part = pred.float(), var_part.float()
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        model_x_start = self.interpret(pred, x_t, t).pred_x_start
        model_mean, _, _ = self.q_posterior(model_x_start, x_t, t)
        model_log_var = self._model_log_variance(var_part, t, x_t.dim())
        kl = _mean_flat(_normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def ddpm_sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        on_step: Optional[Callable[[], None]] = None,
    ) -> Tensor:
        """Ancestral sampling through all ``num_timesteps`` steps; returns images in ``[0, 1]``. ``on_step()`` after each step."""
        img = _randn(shape, generator, device)
        x_start = None
        for time in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), time, device=device, dtype=torch.long)
            mean, log_var, x_start = self.p_mean_variance(model, img, t, x_start if self.self_condition else None)
            img = mean + (0.5 * log_var).exp() * _randn(shape, generator, device) if time > 0 else mean
            if on_step is not None:
                on_step()
        return unnormalize_to_zero_to_one(img).clamp(0, 1)

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        generator: torch.Generator,
        sampling_timesteps: int,
        eta: float = 0.0,
        device: torch.device | str = "cpu",
        on_step: Optional[Callable[[], None]] = None,
    ) -> Tensor:
        """DDIM sampling in ``sampling_timesteps`` steps (``eta = 0``: deterministic given the start); images in ``[0, 1]``.

        The steps visit :func:`ddim_time_pairs`; each moves with :func:`ddim_coefficients`.
        ``on_step()`` is called after each step (a progress display).
        """
        if not 1 <= sampling_timesteps <= self.num_timesteps:
            raise ValueError(f"ddim_sample: sampling_timesteps must be in [1, {self.num_timesteps}], got {sampling_timesteps}")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"ddim_sample: eta must be a number in [0, 1], got {eta!r}")
        img = _randn(shape, generator, device)
        x_start = None
        for time, time_next in ddim_time_pairs(self.num_timesteps, sampling_timesteps):
            t = torch.full((shape[0],), time, device=device, dtype=torch.long)
            pred_noise, x_start = self.model_predictions(model, img, t, x_start if self.self_condition else None, clip_x_start=True)
            if time_next < 0:
                img = x_start
            else:
                # from the float64 schedule: in float32, 1 - abar_next - sigma^2 can round below 0 (see ddim_coefficients)
                ac = self._alphas_cumprod64
                c, sigma = ddim_coefficients(float(ac[time]), float(ac[time_next]), eta)
                img = x_start * math.sqrt(float(ac[time_next])) + c * pred_noise
                if eta > 0:
                    img = img + sigma * _randn(shape, generator, device)
            if on_step is not None:
                on_step()
        return unnormalize_to_zero_to_one(img).clamp(0, 1)

    def sample(
        self,
        model: Denoiser,
        shape: tuple[int, ...],
        generator: torch.Generator,
        sampling_timesteps: Optional[int] = None,
        eta: float = 0.0,
        device: torch.device | str = "cpu",
        on_step: Optional[Callable[[], None]] = None,
    ) -> Tensor:
        """DDIM when ``sampling_timesteps < num_timesteps``, else DDPM (the rule of Song et al.'s DDIM code);
        images in ``[0, 1]``. ``on_step()`` is called after each of the :meth:`num_sampling_steps` steps."""
        steps = self.num_timesteps if sampling_timesteps is None else sampling_timesteps
        if steps < self.num_timesteps:
            return self.ddim_sample(model, shape, generator, steps, eta, device, on_step)
        if steps > self.num_timesteps:
            raise ValueError(f"sample: sampling_timesteps must be at most num_timesteps={self.num_timesteps}, got {steps}")
        return self.ddpm_sample(model, shape, generator, device, on_step)

    def num_sampling_steps(self, sampling_timesteps: Optional[int] = None) -> int:
        """How many denoiser calls :meth:`sample` makes per batch (``on_step`` calls)."""
        return self.num_timesteps if sampling_timesteps is None else min(sampling_timesteps, self.num_timesteps)


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> Tensor:
    """Standard normal draws from ``generator`` (drawn on its device, then moved to ``device``)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)
