"""Adapter methods through ``peft``: LoRA, DoRA and VeRA on the attention and MLP linears of both towers.

open_clip's attention is ``nn.MultiheadAttention``, which peft cannot adapt fully (DoRA/VeRA take ``nn.Linear`` only;
LoRA on ``out_proj`` alone is a no-op), so :func:`inject_adapters` first swaps it for the numerically identical
:class:`~fomo_ray.methods.peft_mha.LinearAttention` and then targets ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
(attention) and ``c_fc``, ``c_proj`` (MLP). The adapters are injected *into the CLIP module itself* (peft's tuner
classes modify it in place), so they are part of ``model.state_dict()`` and therefore of every checkpoint, and
persist across tasks. Only adapter parameters train.
"""
from __future__ import annotations

from torch import nn

from fomo_ray.config import PeftConfig
from fomo_ray.methods.peft_mha import swap_attention
from fomo_ray.methods.base import Method

#: module-name suffixes peft matches: attention q/k/v/out after the swap, and the MLP's two linears
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")
ADAPTER_KINDS = ("lora", "dora", "vera")


def peft_config(kind: str, cfg: PeftConfig):
    """The peft config object for ``kind`` with this project's targets and hyperparameters."""
    from peft import LoraConfig, VeraConfig

    if cfg.rank < 1:
        raise ValueError(f"config key 'method.peft.rank' must be >= 1, got {cfg.rank}")
    targets = list(ADAPTER_TARGETS)
    if kind in ("lora", "dora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          use_dora=kind == "dora", bias="none")
    if kind == "vera":
        # projection_prng_key fixes the shared frozen random matrices A, B, so every run draws the same ones
        return VeraConfig(r=cfg.rank, vera_dropout=cfg.dropout, target_modules=targets, projection_prng_key=0,
                          save_projection=True, bias="none")
    raise ValueError(f"unknown adapter kind '{kind}'; valid: {', '.join(ADAPTER_KINDS)}")


def inject_adapters(model: nn.Module, kind: str, cfg: PeftConfig) -> nn.Module:
    """Swap MHA for linear attention, inject ``kind`` adapters in place, freeze everything else; return ``model``."""
    from peft.tuners.lora import LoraModel
    from peft.tuners.vera import VeraModel

    swap_attention(model)
    config = peft_config(kind, cfg)
    tuner_cls = VeraModel if kind == "vera" else LoraModel
    # The tuner replaces target modules inside ``model`` and marks only adapter weights trainable; it keeps no
    # state of its own that the layers do not hold (VeRA's shared A/B are registered on every adapted layer).
    tuner_cls(model, config, "default")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"peft injected no trainable {kind} adapter (targets {ADAPTER_TARGETS} not found)")
    return model


class LoRA(Method):
    """Low-rank adapters ``W + (alpha/r)·B·A`` (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language
    Models", ICLR). Ranks 4 and 64 in Roth et al. 2024 (arXiv 2408.14471)."""

    name = "lora"
    reads = ("peft.",)

    def setup(self, model: nn.Module) -> nn.Module:
        return inject_adapters(model, "lora", self.cfg.peft)


class DoRA(Method):
    """Weight-decomposed low-rank adaptation: a learned magnitude times a LoRA-updated direction (Liu et al. 2024,
    "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML)."""

    name = "dora"
    reads = ("peft.",)

    def setup(self, model: nn.Module) -> nn.Module:
        return inject_adapters(model, "dora", self.cfg.peft)


class VeRA(Method):
    """Vector-based random matrix adaptation: frozen shared random A, B and trained scaling vectors (Kopiczko,
    Blankevoort, Asano 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR)."""

    name = "vera"
    reads = ("peft.rank", "peft.dropout")  # VeRA has no alpha: its scaling vectors are trained

    def setup(self, model: nn.Module) -> nn.Module:
        return inject_adapters(model, "vera", self.cfg.peft)
