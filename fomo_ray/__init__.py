"""fomo_ray: a scalable sweep engine for continual multimodal pretraining of CLIP models (FoMo-in-Flux)."""
import os as _os

# Pretrained tags / HF tokenizers retry the network for ~46 s before failing; the embedded default never needs it.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads spin by default; on a busy 2-core box that made 2 torch threads ~6x slower than 1 (measured).
# Takes effect only when fomo_ray is imported before torch (the CLI, the scripts and the tests do so).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

# The Python API (fomo_ray/api.py), loaded on first use: `import fomo_ray` stays cheap and sets the environment above
# before torch, Ray or MLflow are imported.
__all__ = ["run", "sweep", "load_results", "load_model", "Results", "__version__"]
_API = ("run", "sweep", "load_results", "load_model", "Results")


def __getattr__(name: str):
    if name in _API:
        from fomo_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'fomo_ray' has no attribute {name!r}")
