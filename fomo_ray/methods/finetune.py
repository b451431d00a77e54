"""Fine-tuning family: full fine-tuning and the methods that fine-tune a fixed subset of the parameters.

Each method differs only in :meth:`setup` (which parameters stay trainable); everything else is the base class's
plain continual fine-tuning: train from theta_{t-1}, deploy theta_t.
"""
from __future__ import annotations

from torch import nn

from fomo_ray.methods.base import Method, freeze_all_but

# open_clip's CLIP keeps the text tower at the top level; CustomTextCLIP (HF text towers) under ``text.``.
TEXT_TOWER_PREFIXES = ("text.", "transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                       "text_projection")
IMAGE_TOWER_PREFIXES = ("visual.",)


def is_image_tower(name: str) -> bool:
    return name.startswith(IMAGE_TOWER_PREFIXES)


def is_text_tower(name: str) -> bool:
    return name.startswith(TEXT_TOWER_PREFIXES)


def is_bias(name: str) -> bool:
    """Every additive bias term, incl. ``nn.MultiheadAttention``'s packed ``in_proj_bias``."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def layernorm_param_names(model: nn.Module) -> set[str]:
    """Names of the affine parameters of every LayerNorm (open_clip's LayerNorm subclasses ``nn.LayerNorm``)."""
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
            for p_name, _ in mod.named_parameters(recurse=False)}


class FineTune(Method):
    """Full fine-tuning of both towers; trains from theta_{t-1} (Roth et al. 2024, "A Practitioner's Guide to
    Continual Multimodal Pretraining", arXiv 2408.14471: the FiF baseline every budget is measured against)."""

    name = "finetune"

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: True)
        return model


class LockedImage(Method):
    """Locked-image tuning: the image tower is frozen, the text tower and ``logit_scale`` train
    (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR)."""

    name = "locked_image"

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: not is_image_tower(n))
        return model


class LockedText(Method):
    """Locked-text tuning: the text tower is frozen, the image tower and ``logit_scale`` train (the mirror of LiT,
    as in Roth et al. 2024, arXiv 2408.14471, Sec. 4)."""

    name = "locked_text"

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: not is_text_tower(n))
        return model


class BitFit(Method):
    """Bias-only fine-tuning (Ben Zaken, Ravfogel, Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning
    for Transformer-based Masked Language-models", ACL)."""

    name = "bitfit"

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: is_bias(n))
        return model


class LNFit(Method):
    """LayerNorm-only fine-tuning (De Min et al. 2023, "On the Effectiveness of LayerNorm Tuning for Continual
    Learning in Vision Transformers", ICCV Workshops)."""

    name = "lnfit"

    def setup(self, model: nn.Module) -> nn.Module:
        norms = layernorm_param_names(model)
        freeze_all_but(model, lambda n, p: n in norms)
        return model
