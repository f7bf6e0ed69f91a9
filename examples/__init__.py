"""pfunc's runnable examples: the diffusion main job, a BigGAN-style GAN, a vmap ensemble, a cached RNN.

They need the ``examples`` extra (``pip install -e ".[examples]"``): Pillow for images,
matplotlib for figures, tqdm for progress. The library ``pfunc`` itself needs none of them.
"""
