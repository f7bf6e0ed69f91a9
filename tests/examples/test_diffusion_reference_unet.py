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
