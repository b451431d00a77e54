"""The contrastive losses a CLIP model trains with: symmetric InfoNCE, or SigLIP's sigmoid loss.

- :func:`clip_loss` — symmetric InfoNCE with a learnable temperature (Radford et al. 2021, "Learning Transferable
  Visual Models From Natural Language Supervision", Fig. 3 pseudocode; InfoNCE: van den Oord et al. 2018,
  "Representation Learning with Contrastive Predictive Coding").
- :func:`siglip_loss` — the pairwise sigmoid loss with a learnable temperature *and bias* (Zhai, Mustafa, Kolesnikov,
  Beyer 2023, "Sigmoid Loss for Language Image Pre-Training", ICCV; open_clip's ``SigLipLoss``).

:func:`contrastive_loss` picks the one a model was built for: open_clip models with a ``logit_bias`` parameter
(SigLIP configs set ``init_logit_bias``) train with the sigmoid loss, all others with InfoNCE. It is the one dispatch
every training loss goes through (the loop's ``batch_loss``, the budget's measured step, the throughput timing), and
:func:`logit_terms` reads a model's ``(exp(logit_scale), logit_bias)`` for it. In both losses every other pair in the
batch is a negative, so the mixed P/D/B batch of the continual loop acts as one pool of in-batch negatives.
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


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss: every image-text pair is an independent binary classification.

    ``logits = scale * I @ T^T + bias``; labels are +1 on the diagonal (matching pairs) and -1 elsewhere;
    ``loss = -sum(logsigmoid(labels * logits)) / B`` (Zhai et al. 2023, Algorithm 1; open_clip's
    ``SigLipLoss`` on one device). ``logit_scale`` is the *exponentiated* scale as for :func:`clip_loss`,
    ``logit_bias`` the model's learnable bias (``-10`` at init in SigLIP). Over the features of a whole global batch
    gathered from all ranks this is exactly the one-process loss of that batch. Computed in fp32.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"siglip_loss needs two [B, D] feature matrices of one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    logits = clip_logits(image_features.float(), text_features.float(), logit_scale.float()) + logit_bias.float()
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a model with these logit terms: :func:`siglip_loss` when it has a ``logit_bias``
    (SigLIP), else :func:`clip_loss`. Pass :func:`logit_terms` of the model (or what ``PairEncoder`` returns)."""
    if logit_bias is None:
        return clip_loss(image_features, text_features, logit_scale)
    return siglip_loss(image_features, text_features, logit_scale, logit_bias)


def logit_terms(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(exp(logit_scale), logit_bias or None)`` of an open_clip model, as its forward returns them."""
    return model.logit_scale.exp(), getattr(model, "logit_bias", None)


@torch.no_grad()
def clamp_logit_scale_(model: torch.nn.Module) -> None:
    """Clamp ``model.logit_scale`` to [0, ln 100] in place after an optimizer step, as open_clip's training loop."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
