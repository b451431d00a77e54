"""The CLIP contrastive loss: symmetric InfoNCE with a learnable temperature.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (Fig. 3 pseudocode);
InfoNCE: van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding". Every other pair in
the batch is a negative, so the mixed P/D/B batch of the continual loop acts as one pool of in-batch negatives.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: open_clip clamps exp(logit_scale) at 100 (CLIP's 0.01 temperature floor) to keep training stable.
MAX_LOGIT_SCALE = math.log(100.0)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """Image-to-text logits ``scale * I @ T^T`` of L2-normalised features (rows: images, columns: texts)."""
    return logit_scale * image_features @ text_features.T


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy with the diagonal as targets.

    ``image_features``/``text_features``: ``[B, D]``, L2-normalised (open_clip's ``model(images, texts)`` returns
    them so). ``logit_scale``: the *exponentiated* scale (open_clip's forward returns ``logit_scale.exp()``), so the
    temperature stays learnable through the model's ``logit_scale`` parameter. Computed in fp32 for stable softmax
    under autocast.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"clip_loss needs two [B, D] feature matrices of one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    logits = clip_logits(image_features.float(), text_features.float(), logit_scale.float())
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@torch.no_grad()
def clamp_logit_scale_(model: torch.nn.Module) -> None:
    """Clamp ``model.logit_scale`` to [0, ln 100] in place after an optimizer step, as open_clip's training loop."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
