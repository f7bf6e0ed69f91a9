"""A class-conditional GAN with BigGAN's spectral norm, through pfunc.

The discriminator (and, by default, the generator) has ``SpectralNorm.biggan`` on
every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` weight, put there in one go
by :func:`pfunc.spectral.spectral_norm_spec`; the singular values BigGAN keeps in
``sv`` buffers "for logging" come out in ``state`` and are read with
:func:`pfunc.spectral.singular_values`.

Modules: :mod:`.data` (2-D mixtures of Gaussians; the image data of the diffusion
example), :mod:`.metrics` (mode coverage and sample quality), :mod:`.models`
(projection discriminators and conditional generators), :mod:`.train` (the CLI:
``python -m examples.gan.train``).
"""
