"""Continual-update methods: an explicit registry from method names to :class:`Method` classes.

The methods are those of docs/BENCHMARK.md §Methods.

``build_method(cfg)`` builds ``cfg.method.name`` with its typed sub-config (``cfg.method.merge`` / ``.peft`` /
``.reg``, defaults in ``fomo_ray/config.py``). One small file per family:

- ``finetune.py``: finetune, locked_image, locked_text, bitfit, lnfit
- ``peft_methods.py``: lora, dora, vera (peft, on attention q/k/v/out and MLP linears of both towers)
- ``regularisers.py``: ewc, si
- ``merging.py``: ema_merge, zs_merge, ft_merge, offline_merge, magmax_merge, opcm_merge, dop_merge and the
  general TIME triple ``merge``
- ``references.py``: zero_shot, joint (the reference points every study needs; the *baseline* is what a report subtracts)
- ``zscl.py``: zscl (distillation towards the initial model on pool data, plus weight consolidation)
- ``peft_mha.py``: the exact nn.MultiheadAttention -> Linear swap the peft adapters need
"""
from __future__ import annotations

from typing import Any

from fomo_ray.config import ConfigError, ExperimentConfig, MethodConfig
from fomo_ray.methods.base import Method, TaskPlan
from fomo_ray.methods.finetune import BitFit, FineTune, LNFit, LockedImage, LockedText
from fomo_ray.methods.merging import MERGE_PRESETS, Merge
from fomo_ray.methods.peft_methods import DoRA, LoRA, VeRA
from fomo_ray.methods.references import Joint, ZeroShot
from fomo_ray.methods.regularisers import EWC, SI
from fomo_ray.methods.zscl import ZSCL

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
    "zscl": ZSCL,
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


#: config sections that only shape training steps; they do not apply to a method that takes none (zero_shot)
TRAINING_SECTIONS = ("optimizer.", "schedule.", "mixture.", "budget.")


def applicable_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg.flat()`` less what does not apply to ``cfg.method.name``: the ``method.*`` settings it does not read
    (:meth:`Method.config_keys`) and, for a method that never trains, the training sections. What a run logs as its
    MLflow params: a fine-tuning or zero-shot run must not show, or plot at, the default merge weight."""
    cls = REGISTRY.get(cfg.method.name)
    if cls is None:  # unknown names are refused where the method is built; log everything meanwhile
        return cfg.flat()
    own = {f"method.{k}" for k in cls.config_keys(cfg.method)} | {"method.name"}
    return {k: v for k, v in cfg.flat().items()
            if (k in own or not k.startswith("method.")) and (cls.trains or not k.startswith(TRAINING_SECTIONS))}


def cost_settings(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """The ``method.*`` settings registered method ``name`` declares as changing its cost (``Method.cost_reads``:
    a continual merge's operator parameters, ZSCL's reference batch), relative to ``method.``; empty for every
    other method. The budget keys its cached measurements by them."""
    if name not in REGISTRY:
        return {}
    reads = getattr(build_method(cfg.replace({"method.name": name})), "cost_reads", ())  # duck-typed methods: none
    flat = {k[len("method."):]: v for k, v in cfg.flat().items() if k.startswith("method.")}
    return {k: v for k, v in sorted(flat.items()) if reads and k.startswith(reads)}


__all__ = ["Method", "cost_settings", "TaskPlan", "REGISTRY", "build_method", "UnknownMethodError", "applicable_params",
           "TRAINING_SECTIONS"]
