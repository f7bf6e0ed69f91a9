"""The main job's device-dependent branches, selected on a CPU-only machine with CUDA's answers simulated:
one GPU per torchrun process (``cuda:LOCAL_RANK``) and NCCL by default, ``--bf16`` on a GPU without
bfloat16, and the CUDA noise generator's state through a checkpoint and a resume.

(The main job uses neither ``pin_memory`` nor ``non_blocking`` copies: the data set is moved to the
device once, before training.)
"""

import re

import pytest
import torch
import torch.distributed as dist

from examples.diffusion.config import PRESETS, ConfigError, TrainConfig, check_device
from examples.diffusion.data_parallel import choose_backend, rank_device
from examples.diffusion.training import make_generators
from examples.torchrun import Launch
from tests.fake_cuda import SimulatedGenerator

GPU = TrainConfig(**PRESETS["gpu"])


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n, bf16=True)``: torch answers as on a machine with ``n`` CUDA GPUs."""

    def simulate(n: int, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4" if not bf16 else "NVIDIA H100")
        monkeypatch.setattr(dist, "is_nccl_available", lambda: True)

    return simulate


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank_and_nccl(gpus):
    gpus(4)
    for local_rank in range(4):
        launch = Launch(rank=4 + local_rank, world_size=8, local_rank=local_rank, local_world_size=4)  # 2 machines x 4
        for spec in ("auto", "cuda"):
            device = rank_device(spec, launch)
            assert device == torch.device("cuda", local_rank)
            assert choose_backend(None, device) == "nccl" and choose_backend("auto", device) == "nccl"
    assert choose_backend("gloo", torch.device("cuda", 1)) == "gloo"  # asked for: gloo moves CUDA tensors too
    assert rank_device("cpu", Launch(rank=1, world_size=2, local_rank=1, local_world_size=2)) == torch.device("cpu")


def test_more_processes_than_gpus_or_one_named_gpu_for_several_processes_is_refused_naming_the_flag(gpus):
    gpus(2)
    launch = Launch(rank=3, world_size=4, local_rank=3, local_world_size=4)
    with pytest.raises(ConfigError, match=re.escape("torchrun started 4 processes on this machine, which has 2 CUDA device(s)")):
        rank_device("auto", launch)
    with pytest.raises(ConfigError, match=r"--device cuda:0: under torchrun each process takes the GPU of its LOCAL_RANK"):
        rank_device("cuda:0", Launch(rank=1, world_size=2, local_rank=1, local_world_size=2))


def test_nccl_missing_from_this_torch_is_refused_naming_the_flag(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(ConfigError, match="--backend"):
        choose_backend(None, torch.device("cuda", 0))


def test_bf16_on_a_gpu_without_bfloat16_is_refused_before_the_run_naming_the_flag(gpus):
    gpus(1, bf16=False)
    with pytest.raises(ConfigError, match=re.escape("--bf16: Tesla T4 (cuda:0) has no bfloat16 support; use --no-bf16")):
        check_device(GPU, torch.device("cuda", 0))
    check_device(GPU.replace(bf16=False), torch.device("cuda", 0))
    check_device(GPU, torch.device("cpu"))  # CPU autocast has bfloat16
    gpus(1, bf16=True)
    check_device(GPU, torch.device("cuda", 0))


def test_the_cuda_noise_generators_state_goes_through_a_checkpoint_and_a_resume_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch, "Generator", SimulatedGenerator)  # torch.Generator(device="cuda") on this machine
    gens = make_generators(0, 64, 16, torch.device("cuda", 0))
    assert gens.noise.device.type == "cuda" and gens.order.generator.device.type == "cpu" and gens.coin.device.type == "cpu"
    torch.randn(5, generator=gens.noise)  # the run draws: the state moves on
    saved = gens.state_dict()
    assert saved["noise_device"] == "cuda"
    expected = torch.randn(5, generator=gens.noise)
    resumed = make_generators(0, 64, 16, torch.device("cuda", 0))
    resumed.load_state_dict(saved)
    assert torch.equal(torch.randn(5, generator=resumed.noise), expected)  # the same stream continues
    on_cpu = make_generators(0, 64, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="ran on cuda, this run's on cpu: resume with --device cuda"):
        on_cpu.load_state_dict(saved)
