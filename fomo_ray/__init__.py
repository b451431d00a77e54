"""fomo_ray: a scalable sweep engine for continual multimodal pretraining of CLIP models (FoMo-in-Flux)."""
import os as _os

# Pretrained tags / HF tokenizers retry the network for ~46 s before failing; the embedded default never needs it.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
