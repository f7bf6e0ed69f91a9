"""Seed 002's denoising diffusion model, trained with a pure functional loop on pfunc parametrizations.

Modules: :mod:`.unet` (the Unet; weight standardization is a pfunc parametrization on
plain ``nn.Conv2d``), :mod:`.gaussian_diffusion` (schedules, losses, DDPM/DDIM
sampling as functions of a denoiser), :mod:`.data` (embedded procedurally drawn shapes,
or a folder of images) and :mod:`.png` (stdlib PNG decoder), :mod:`.training` (the
``torch.func.grad_and_value`` step, AdamW on the originals, EMA), :mod:`.checkpoint`
(atomic, verified, code-free checkpoints), :mod:`.config` (presets and checks),
:mod:`.quality` (Fréchet classifier distance with brackets), :mod:`.progress`, and
:mod:`.train`, the CLI: ``python -m examples.diffusion.train``.
"""
