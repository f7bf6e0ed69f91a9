"""The main job's GPU preset dry-run on a simulated CUDA device (run by tests/fake_cuda_worker.py).

The same construction code as ``python -m examples.diffusion.train --preset gpu`` (build_model,
initial_train_state, make_generators, draw_micro_batch, make_loss_fn, update_ema, sample_images,
make_payload, restore) at the preset's sizes (dim 64, 4 levels, 32x32, batch 128, bf16 autocast),
nothing computed. ``torch.compile`` is left out (a dry run traces nothing); the data set is 256
random images instead of 50000 drawn shapes (the same shape and dtype).
"""

from __future__ import annotations

import torch

from examples.diffusion.config import PRESETS, TrainConfig
from examples.diffusion.model import build_model, sample_images
from examples.diffusion.training import (
    draw_micro_batch, initial_train_state, make_generators, make_grad_fn, make_loss_fn, train_step, update_ema,
)
from examples.diffusion.training_checkpoint import make_payload, restore
from tests.fake_cuda import CUDA, GRADIENTS, REAL, assert_on, fake_cuda

GPU = TrainConfig(**{**PRESETS["gpu"], "compile": False})


def _setup(cfg: TrainConfig = GPU):
    _, net, diffusion = build_model(cfg)
    ts = initial_train_state(net, cfg.seed, CUDA, cfg.lr, cfg.weight_decay)
    data = torch.rand(256, cfg.channels, cfg.image_size, cfg.image_size).to(CUDA)
    gens = make_generators(cfg.seed, data.shape[0], cfg.batch_size, CUDA)
    return net, diffusion.to(CUDA), ts, data, gens


def training_step() -> int:
    """One step of the GPU preset: the batch's draws, the bf16 loss, (with gradients) clipping, AdamW and EMA."""
    n = 0
    with fake_cuda():
        net, diffusion, ts, data, gens = _setup()
        assert gens.noise.device.type == "cuda"
        n += assert_on(ts.params, what="params") + assert_on(ts.ema, what="ema")
        assert not ts.state, "the Unet has no buffers: a state to check would need assert_on"
        mb = draw_micro_batch(data, gens, diffusion, GPU.self_condition, CUDA)
        n += assert_on({"x0": mb.x0, "t": mb.t, "noise": mb.noise}, what="micro batch")
        loss_fn = make_loss_fn(net, diffusion, bf16=GPU.bf16, device_type=CUDA.type)
        with torch.no_grad():  # the forward alone: recording autograd needs a torch built with CUDA (see GRADIENTS)
            out, _ = net(ts.params, ts.state, mb.x0, mb.t, None, training=True)
            with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=GPU.bf16):
                out_bf16, _ = net(ts.params, ts.state, mb.x0, mb.t, None, training=True)
            loss, new_state = loss_fn(ts.params, ts.state, mb.x0, mb.t, mb.noise, False)
        n += assert_on(out, dtype=torch.float32, what="Unet out (float32)")
        n += assert_on(out_bf16, dtype=torch.bfloat16, what="Unet out under the preset's autocast")
        n += assert_on(loss, dtype=torch.float32, what="loss")
        if GRADIENTS:  # torch built with CUDA (the GPU check), or the real GPU
            grads, (loss, _) = make_grad_fn(loss_fn)(ts.params, ts.state, mb.x0, mb.t, mb.noise, False)
            n += assert_on(grads, dtype=torch.float32, what="grads") + assert_on(loss, dtype=torch.float32, what="loss")
            if REAL:  # the whole step: AdamW reads its step count on the host, which a fake mode cannot
                train_step(ts, make_grad_fn(loss_fn), [mb], max_grad_norm=GPU.max_grad_norm, ema_decay=GPU.ema_decay,
                           ema_every=1, ema_after=0)
                n += assert_on(ts.params, dtype=torch.float32, what="params after AdamW")
                n += assert_on([s["exp_avg"] for s in ts.optimizer.state.values()], what="AdamW moments")
            else:
                for name, p in ts.params.items():
                    p.grad = grads[name]
                norm = torch.nn.utils.clip_grad_norm_(list(ts.params.values()), GPU.max_grad_norm)
                n += assert_on(norm, what="gradient norm") + assert_on([p.grad for p in ts.params.values()], what="clipped grads")
        update_ema(ts.ema, ts.params, 200, GPU.ema_decay, 1, 100)
        n += assert_on(ts.ema, dtype=torch.float32, what="ema")
    return n


def sampling() -> int:
    """The sampler at the preset's sizes: DDIM (2 steps, eta 1) and DDPM (all steps of a 4-step schedule), bf16."""
    n = 0
    with fake_cuda():
        for cfg, steps in ((GPU, 2), (GPU.replace(timesteps=4, sampling_steps=4), 4)):
            net, diffusion, ts, _, _ = _setup(cfg)
            images = sample_images(net, diffusion, ts.ema, ts.state, 4, cfg, seed=0, sampling_steps=steps, eta=1.0,
                                   device=CUDA, batch_size=4, bf16=True)
            # sample_images hands back CPU float32 images (for saving): the one place tensors leave the device
            n += assert_on(images, torch.device("cpu"), torch.float32, what=f"images ({steps} steps)")
            assert images.shape == (4, cfg.channels, cfg.image_size, cfg.image_size)
    return n


def checkpoint() -> int:
    """What a save builds (CPU tensors, the CUDA noise generator's state) and what a resume rebuilds on the device."""
    n = 0
    with fake_cuda():
        net, diffusion, ts, data, gens = _setup()
        payload = make_payload(GPU, ts, gens)
        n += assert_on({k: payload[k] for k in ("params", "state", "ema")}, torch.device("cpu"), what="payload")
        assert payload["rng"]["noise_device"] == "cuda"
        gens2 = make_generators(GPU.seed, data.shape[0], GPU.batch_size, CUDA)
        ts2 = restore(payload, net, GPU, CUDA, gens2, "dry-run")
        n += assert_on(ts2.params, what="restored params") + assert_on(ts2.ema, what="restored ema")
        assert all(p.requires_grad for p in ts2.params.values())
    return n


RUNS = {"diffusion:training_step": training_step, "diffusion:sampling": sampling, "diffusion:checkpoint": checkpoint}
