"""Continual-update methods: an explicit registry from DESIGN names to :class:`Method` classes.

``build_method(cfg)`` builds ``cfg.method.name`` with its typed sub-config (``cfg.method.merge`` / ``.peft`` /
``.reg``, defaults from DESIGN §5 in ``fomo_ray/config.py``). One small file per family:

- ``finetune.py``: finetune, locked_image, locked_text, bitfit, lnfit
- ``peft_methods.py``: lora, dora, vera (peft, on attention q/k/v/out and MLP linears of both towers)
- ``regularisers.py``: ewc, si
- ``merging.py``: ema_merge, zs_merge, ft_merge, offline_merge and the general TIME triple ``merge``
- ``baselines.py``: zero_shot, joint (the reference points every study needs)
- ``peft_mha.py``: the exact nn.MultiheadAttention -> Linear swap the peft adapters need
"""
from __future__ import annotations

from fomo_ray.config import ConfigError, ExperimentConfig, MethodConfig
from fomo_ray.methods.base import Method, TaskPlan
from fomo_ray.methods.finetune import BitFit, FineTune, LNFit, LockedImage, LockedText
from fomo_ray.methods.merging import MERGE_PRESETS, Merge
from fomo_ray.methods.peft_methods import DoRA, LoRA, VeRA
from fomo_ray.methods.baselines import Joint, ZeroShot
from fomo_ray.methods.regularisers import EWC, SI

REGISTRY: dict[str, type[Method]] = {
    "finetune": FineTune,
    "locked_image": LockedImage,
    "locked_text": LockedText,
    "lora": LoRA,
    "dora": DoRA,
    "vera": VeRA,
    "bitfit": BitFit,
    "lnfit": LNFit,
    "ewc": EWC,
    "si": SI,
    **{name: Merge for name in MERGE_PRESETS},  # presets of one TIME-triple class (merging.py)
    "zero_shot": ZeroShot,
    "joint": Joint,
}


class UnknownMethodError(ConfigError):
    """``method.name`` is not in :data:`REGISTRY`; the message lists the valid names."""


def build_method(cfg: ExperimentConfig | MethodConfig, seed: int | None = None) -> Method:
    """The method named by ``cfg.method.name`` (or ``cfg.name`` for a ``MethodConfig``)."""
    if isinstance(cfg, ExperimentConfig):
        method_cfg, seed = cfg.method, cfg.seed if seed is None else seed
    else:
        method_cfg = cfg
    if method_cfg.name not in REGISTRY:
        raise UnknownMethodError(f"unknown method '{method_cfg.name}' (config key 'method.name'); "
                                 f"valid: {', '.join(REGISTRY)}")
    return REGISTRY[method_cfg.name](method_cfg, seed=seed or 0)


__all__ = ["Method", "TaskPlan", "REGISTRY", "build_method", "UnknownMethodError"]
