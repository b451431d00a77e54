"""fomo_ray: a scalable sweep engine for continual multimodal pretraining of CLIP models (FoMo-in-Flux)."""
import os as _os

# Pretrained tags / HF tokenizers retry the network for ~46 s before failing; the embedded default never needs it.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads spin by default; on a busy 2-core box that made 2 torch threads ~6x slower than 1 (measured).
# Takes effect only when fomo_ray is imported before torch (the CLI, the scripts and the tests do so).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
