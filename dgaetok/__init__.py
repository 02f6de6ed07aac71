"""dgaetok: DGAE image tokenizers (arXiv 2506.09644): an SD-VAE encoder and a diffusion decoder.

    from dgaetok import load_model
    model = load_model()                      # the default weights in weights/
    z = model.encode(x).latent_dist.mode()    # x: (B, 3, H, W) in [-1, 1]
    x_rec = model.decode(z, steps=50)
"""
__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .models import DGAE, DGAE_models, DGAEConfig, load_model, save_model  # noqa: E402

__all__ = ["DGAE", "DGAEConfig", "DGAE_models", "InputError", "load_model", "save_model", "__version__"]
