"""pfunc's runnable examples: the diffusion main job, a BigGAN-style GAN, a vmap ensemble, a cached RNN."""

import warnings

# The examples need no numpy; torch warns at import when it is absent (as in a fresh venv).
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
