"""The main job's Unet is denoising-diffusion-pytorch's Unet, in both of that package's layouts.

- Releases up to 1.5 build the classic layout (weight-standardized conv + GroupNorm, LayerNorm
  before attention, linear attention's values divided by h*w): the main job's ``layout="classic"``
  (a plain ``nn.Conv2d`` plus pfunc's ``WeightStandardization``) gives the same output and the same
  gradients with identical weights, to float32 rounding.
- Releases 2.x build the modern one (RMSNorm, memory key/values, full attention innermost): the
  main job's ``layout="modern"`` has the same parameters under the same seed, and the same output
  and gradients.

Each test runs where that release is installed (``pip install -e ".[benchmarks]"`` gives 2.3.4;
``pip install --no-deps denoising-diffusion-pytorch==1.5.0 einops`` gives 1.5.0) and is skipped,
saying why, everywhere else. The package's model code is read without importing the package
(:mod:`benchmarks.reference_unet`), whose imports pull torchvision, accelerate and pytorch-fid.
"""

from __future__ import annotations

import re
import types

import pytest
import torch

import pfunc as pf
from benchmarks.reference_unet import ReferenceUnavailable, load_model_code, package_folder
from examples.diffusion.unet import LAYOUTS, Unet, parametrize_unet

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


def reference_model_code(layout: str) -> types.ModuleType:
    """The installed release's model code, or a skip saying what to install for ``layout``."""
    try:
        folder = package_folder()
        source = (folder / "denoising_diffusion_pytorch.py").read_text()
        classic = "class WeightStandardizedConv2d" in source and "RMSNorm" not in source
        modern = "class WeightStandardizedConv2d" not in source and "mem_kv" in source
        if layout == "classic" and not classic:
            pytest.skip(f"{folder} is not a release with the classic blocks (pip install --no-deps denoising-diffusion-pytorch==1.5.0 einops)")
        if layout == "modern" and not modern:
            pytest.skip(f"{folder} is not a 2.x release (pip install -e \".[benchmarks]\")")
        return load_model_code(folder)
    except ReferenceUnavailable as e:
        pytest.skip(str(e))


def assert_same_gradients(theirs: torch.nn.Module, net: pf.Parametrized, params, state, x, t, theirs_name) -> None:
    (theirs(x, t) ** 2).mean().backward()
    loss = lambda p, s: ((net(p, s, x, t, training=True)[0]) ** 2).mean()
    grads = pf.grad(loss)(params, state)
    for name, ours_name in theirs_name.items():
        reference = dict(theirs.named_parameters())[name].grad
        torch.testing.assert_close(grads[ours_name], reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()), msg=name)


def test_the_classic_layout_equals_the_release_1_5_unet_in_output_and_gradients():
    reference = reference_model_code("classic")
    torch.manual_seed(0)
    config = dict(dim=16, dim_mults=(1, 2, 4), channels=3, resnet_block_groups=8)
    theirs = reference.Unet(**config)
    options = dict(LAYOUTS["classic"])
    ours = Unet(**config, attn_heads=4, attn_dim_head=32, **{k: v for k, v in options.items() if k != "weight_standardization"})
    state_dict = theirs.state_dict()
    assert sorted(state_dict) == sorted(ours.state_dict())     # the same layout, name for name
    ours.load_state_dict(state_dict, strict=True)
    net = parametrize_unet(ours, options["weight_standardization"])
    params, state = net.init()

    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 500, 999])
    got, _ = net(params, state, x, t, training=True)
    torch.testing.assert_close(got, theirs(x, t), rtol=1e-5, atol=1e-5)
    names = {n: n if n in params else re.sub(r"proj\.weight$", "proj.parametrizations.weight.original", n)
             for n, _ in theirs.named_parameters()}
    assert_same_gradients(theirs, net, params, state, x, t, names)


def modern_name(ours: str) -> str:
    """The 2.x name of a modern-layout parameter: the attention's norm lives inside its layer there (no PreNorm)."""
    return ours.replace(".fn.fn.", ".").replace(".fn.", ".")


def test_the_modern_layout_equals_the_release_2_unet_in_parameters_output_and_gradients():
    reference = reference_model_code("modern")
    config = dict(dim=16, dim_mults=(1, 2, 4), channels=3, attn_heads=2, attn_dim_head=16)
    torch.manual_seed(0)
    theirs = reference.Unet(**config)
    options = dict(LAYOUTS["modern"])
    torch.manual_seed(0)
    ours = Unet(**config, **{k: v for k, v in options.items() if k != "weight_standardization"})
    theirs_state = theirs.state_dict()
    names = {modern_name(k): k for k in ours.state_dict()}
    assert sorted(names) == sorted(theirs_state)
    for name, value in theirs_state.items():          # the same initial values: same layers, built in the same order
        assert torch.equal(ours.state_dict()[names[name]], value), name
    net = parametrize_unet(ours, options["weight_standardization"])
    assert net.chains == {}                           # plain convs: nothing is parametrized
    params, state = net.init()

    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1.0, 10.0, 500.0, 999.0])
    got, _ = net(params, state, x, t, training=True)
    torch.testing.assert_close(got, theirs(x, t), rtol=1e-5, atol=1e-5)
    assert_same_gradients(theirs, net, params, state, x, t, {n: names[n] for n, _ in theirs.named_parameters()})


def test_the_release_2_diffusion_process_gives_the_main_jobs_loss_and_ddim_samples():
    """The package's own ``GaussianDiffusion`` (cosine schedule; DDIM with eta 1) and the main job's: the same
    training loss on the same batch, times and noise (for pred_v and pred_x0 before the package's per-sample weights),
    and the same samples from the same draws."""
    reference_model_code("modern")                   # skips unless a 2.x release is installed
    from benchmarks.reference_unet import load_diffusion_code
    from examples.diffusion.gaussian_diffusion import GaussianDiffusion
    from examples.diffusion.schedules import cosine_beta_schedule

    code = load_diffusion_code()
    torch.manual_seed(0)
    unet = code.Unet(dim=8, dim_mults=(1, 2), channels=3, attn_heads=2, attn_dim_head=8)
    theirs = code.GaussianDiffusion(unet, image_size=8, timesteps=1000, sampling_timesteps=10, objective="pred_noise",
                                    beta_schedule="cosine", ddim_sampling_eta=1.0)
    ours = GaussianDiffusion(cosine_beta_schedule(1000), objective="pred_noise")
    model = lambda x, t, sc: unet(x, t, sc)
    g = torch.Generator().manual_seed(1)
    x0, noise, t = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)
    torch.testing.assert_close(ours.training_loss(model, x0, t, noise), theirs.p_losses(x0, t, noise=noise), rtol=1e-5, atol=1e-6)
    # The other objectives: the main job's loss is the plain MSE of the objective's target; the package weights it
    # per sample (pred_v by snr / (snr + 1), pred_x0 by snr), which makes each equal to the noise-prediction MSE
    for objective in ("pred_v", "pred_x0"):
        theirs_other = code.GaussianDiffusion(unet, image_size=8, timesteps=1000, objective=objective, beta_schedule="cosine")
        ours_other = GaussianDiffusion(cosine_beta_schedule(1000), objective=objective)
        unweighted = theirs_other.p_losses(x0, t, noise=noise, loss_reduction="none") / theirs_other.loss_weight[t]
        torch.testing.assert_close(ours_other.training_loss(model, x0, t, noise), unweighted.mean(), rtol=1e-5, atol=1e-6, msg=objective)

    with torch.no_grad():
        torch.manual_seed(7)                          # the package draws from the global generator, in the same order
        expected = theirs.ddim_sample((4, 3, 8, 8))
        got = ours.sample(model, (4, 3, 8, 8), torch.Generator().manual_seed(7), sampling_timesteps=10, eta=1.0)
    # the step coefficients come from the float64 schedule here, from float32 buffers there: 1e-4-level differences
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-4)
