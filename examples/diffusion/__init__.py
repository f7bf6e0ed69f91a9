"""The classic DDPM Unet (Ho et al.), trained with a pure functional loop on pfunc parametrizations.

Modules: :mod:`.unet` (the Unet; weight standardization is a pfunc parametrization on
plain ``nn.Conv2d``), :mod:`.gaussian_diffusion` (schedules, losses, DDPM/DDIM sampling as
functions of a denoiser), :mod:`.data` (embedded procedurally drawn shapes, or a folder of
images read with Pillow), :mod:`.training` (the ``pf.grad_and_value`` step, AdamW on
the originals, EMA), :mod:`.model` (the model a config describes, sampling from its weights),
:mod:`.checkpoint` (atomic, verified, code-free checkpoint files), :mod:`.training_checkpoint`
(what a run's checkpoint holds and its checks), :mod:`.config` (presets and checks),
:mod:`.quality` (Fréchet classifier distance with brackets), :mod:`.cli`, :mod:`.folders` and
:mod:`.interrupt` (what the commands share), and the two commands:
``python -m examples.diffusion.train`` (its flags in :mod:`.train_args`, its checks before any work
in :mod:`.train_plan`, what a run writes in :mod:`.run_outputs`, one model across torchrun's
processes in :mod:`.data_parallel`) and ``python -m examples.diffusion.sample``.
"""
