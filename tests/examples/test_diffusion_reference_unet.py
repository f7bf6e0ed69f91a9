"""The main job's Unet is denoising-diffusion-pytorch's Unet of the releases with the older blocks.

denoising-diffusion-pytorch up to 1.7 builds the classic layout the main job follows (weight-standardized
conv + GroupNorm, LayerNorm before attention, linear attention's values divided by h*w; 1.7 adds
RMSNorm, 1.8 drops weight standardization). With identical weights, that release's ``Unet`` and the main
job's (a plain ``nn.Conv2d`` plus pfunc's ``WeightStandardization``) give the same output and the same
gradients of a loss, to float32 rounding.

Runs only where such a release is installed, e.g.
``pip install --no-deps denoising-diffusion-pytorch==1.5.0 einops``; it reads the package's model code
without importing the package (whose imports pull torchvision, accelerate and pytorch-fid), and is
skipped, saying why, everywhere else.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import types

import pytest
import torch

import pfunc as pf
from examples.diffusion.unet import Unet, parametrize_unet

# The imports of the package's module that its model code does not use (data, training, FID).
UNUSED_IMPORTS = ("from torchvision", "from PIL", "from tqdm", "from ema_pytorch", "from accelerate",
                  "from pytorch_fid", "from denoising_diffusion_pytorch.version", "from beartype", "from jaxtyping")


def reference_model_code() -> types.ModuleType:
    """denoising-diffusion-pytorch's model code (everything before its diffusion process), loaded by itself."""
    spec = importlib.util.find_spec("denoising_diffusion_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("denoising-diffusion-pytorch is not installed (pip install --no-deps denoising-diffusion-pytorch==1.5.0 einops)")
    pytest.importorskip("einops", reason="denoising-diffusion-pytorch's model code needs einops")
    source_file = pathlib.Path(next(iter(spec.submodule_search_locations))) / "denoising_diffusion_pytorch.py"
    source = source_file.read_text()
    if "class WeightStandardizedConv2d" not in source or "RMSNorm" in source:
        pytest.skip(f"{source_file} is a release with the newer blocks; the main job follows 1.5 and earlier")
    model_code = source.split("def extract(a, t, x_shape):")[0]
    model_code = "\n".join(line for line in model_code.splitlines() if not line.startswith(UNUSED_IMPORTS))
    module = types.ModuleType("denoising_diffusion_pytorch_model")
    exec(compile(model_code, str(source_file), "exec"), module.__dict__)
    return module


def test_the_main_jobs_unet_equals_the_reference_unet_in_output_and_gradients():
    reference = reference_model_code()
    torch.manual_seed(0)
    config = dict(dim=16, dim_mults=(1, 2, 4), channels=3, resnet_block_groups=8)
    theirs = reference.Unet(**config)
    ours = Unet(**config, attn_heads=4, attn_dim_head=32)     # the release's fixed attention sizes
    state_dict = theirs.state_dict()
    assert sorted(state_dict) == sorted(ours.state_dict())     # the same layout, name for name
    ours.load_state_dict(state_dict, strict=True)
    net = parametrize_unet(ours)
    params, state = net.init()

    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 500, 999])
    expected = theirs(x, t)
    got, _ = net(params, state, x, t, training=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    (expected ** 2).mean().backward()
    loss = lambda p, s: ((net(p, s, x, t, training=True)[0]) ** 2).mean()
    grads = pf.grad(loss)(params, state)
    for name, parameter in theirs.named_parameters():
        key = name if name in grads else re.sub(r"proj\.weight$", "proj.parametrizations.weight.original", name)
        scale = parameter.grad.abs().max()
        torch.testing.assert_close(grads[key], parameter.grad, rtol=1e-4, atol=1e-4 * float(scale), msg=name)
