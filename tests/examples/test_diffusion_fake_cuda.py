"""The diffusion example on a simulated CUDA device (tests/fake_cuda.py).

In process: the diffusion process alone (building it, the forward process, the training loss
under bf16 autocast, both samplers) with a denoiser made of CUDA factory tensors, and the two
placement bugs a test-only copy with a ``device=`` reverted shows caught. In a process of its own
(tests/fake_cuda_worker.py running tests/examples/fake_cuda_diffusion.py): the main job's GPU
preset, its Unet through pfunc, one training step, EMA, DDIM and DDPM sampling, and what a
checkpoint save and resume build.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

import examples.diffusion.gaussian_diffusion as gd
from examples.diffusion.gaussian_diffusion import GaussianDiffusion
from examples.diffusion.schedules import beta_values
from tests.fake_cuda import CUDA, assert_dry_run_passed, assert_on, failed_dry_runs, fake_cuda, run_worker

pytestmark = pytest.mark.usefixtures("one_thread")


def _denoiser(channels: int, out_channels: int):
    """A 3x3 conv denoiser whose weights are made on the device (time enters as a bias)."""
    w = torch.randn(out_channels, channels, 3, 3, device=CUDA) * 0.1
    b = torch.zeros(out_channels, device=CUDA)

    def model(x, t, x_self_cond):
        return F.conv2d(x + t.float().reshape(-1, 1, 1, 1) * 1e-3, w, b, padding=1)

    return model


def _run_process(module=gd, learned_variance=False, objective="pred_noise", check_schedule=True):
    """Build on cuda, q_sample, the loss under bf16 autocast, DDIM and DDPM: every output checked."""
    with fake_cuda():
        d = module.GaussianDiffusion(beta_values("cosine", 8), objective=objective,
                                     learned_variance=learned_variance).to("cuda")
        if check_schedule:
            assert_on({k: getattr(d, k) for k in d._host}, CUDA, torch.float32, what="schedule")
        model = _denoiser(1, 2 if learned_variance else 1)
        g = torch.Generator(device="cuda").manual_seed(0)
        x0 = torch.rand(4, 1, 8, 8, device=CUDA) * 2 - 1
        t = torch.randint(0, d.num_timesteps, (4,), generator=g, device=g.device)
        noise = torch.randn(x0.shape, generator=g, device=g.device)
        assert_on(d.q_sample(x0, t, noise), what="q_sample")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x0, t, None)
            loss = d.training_loss(model, x0, t, noise)
        assert out.dtype == torch.bfloat16, "autocast('cuda', bf16) did not run the conv in bf16"
        assert_on(loss, CUDA, torch.float32, what="loss")  # the loss itself in float32
        for steps in (3, d.num_timesteps):  # DDIM, then DDPM (all timesteps)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                img = d.sample(model, (2, 1, 8, 8), g, steps, eta=1.0, device=CUDA)
            assert_on(img, CUDA, torch.float32, what=f"sample({steps} steps)")


@pytest.mark.parametrize("learned_variance", [False, True])
@pytest.mark.parametrize("objective", ["pred_noise", "pred_v"])
def test_process_loss_and_both_samplers_stay_on_cuda(learned_variance, objective):
    _run_process(learned_variance=learned_variance, objective=objective)


def test_the_schedule_is_built_on_the_device_without_reading_device_data():
    with fake_cuda():
        d = GaussianDiffusion(beta_values("linear", 30), device="cuda")
        assert d.device.type == "cuda" and d.num_timesteps == 30
        assert_on(d.sqrt_alphas_cumprod, CUDA, torch.float32)
    real = GaussianDiffusion(beta_values("linear", 30))
    assert real._alphas_cumprod64 == d._alphas_cumprod64  # the same host values either way


def _copy_with(tmp_path: Path, old: str, new: str):
    """A test-only copy of gaussian_diffusion.py with ``old`` replaced by ``new`` (once)."""
    source = Path(gd.__file__).read_text()
    assert source.count(old) == 1, old
    path = tmp_path / "gaussian_diffusion_copy.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location("examples.diffusion.gaussian_diffusion_copy", path)  # in the package: its relative imports work
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_schedule_table_left_on_the_cpu_is_caught(tmp_path):
    """The placement bug the dry run exists for: the tables made without ``device=`` (so on the CPU)
    while the data is on the GPU. CPU tests cannot see it; the fake run names the op."""
    broken = _copy_with(tmp_path, "torch.tensor(v, dtype=torch.float32, device=device)", "torch.tensor(v, dtype=torch.float32)")
    with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu|cpu and cuda:0"):
        _run_process(broken, check_schedule=False)  # the first op that mixes them (q_sample's product) names it
    same = "torch.tensor(v, dtype=torch.float32, device=device)"
    _run_process(_copy_with(tmp_path, same, same))  # an unchanged copy passes: the copying is not what fails


def test_a_noise_draw_without_the_generators_device_is_caught(tmp_path):
    """A draw from the CUDA noise generator made on the default (CPU) device: a real GPU refuses it."""
    broken = _copy_with(tmp_path, "generator=generator, device=generator.device).to(device)", "generator=generator).to(device)")
    with pytest.raises(RuntimeError, match="Expected a 'cpu' device type for generator but found 'cuda'"):
        _run_process(broken)


MAIN_JOB = ["diffusion:training_step", "diffusion:sampling", "diffusion:checkpoint"]


@pytest.fixture(scope="module")
def main_job_results(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fake_cuda_diffusion"), MAIN_JOB)


@pytest.mark.parametrize("name", MAIN_JOB)
def test_the_gpu_presets_step_sampler_and_checkpoint_stay_on_cuda(main_job_results, name):
    assert_dry_run_passed(main_job_results, name, checked=2)


@pytest.mark.cuda
def test_the_main_job_dry_runs_compute_on_a_real_gpu(tmp_path):
    results = run_worker(tmp_path, MAIN_JOB, real=True)
    assert not failed_dry_runs(results), failed_dry_runs(results)
