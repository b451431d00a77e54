"""CLIP image transforms on whole batches in torch, deterministic from a seed.

Training: RandomResizedCrop(scale 0.9-1.0, ratio 3/4-4/3, bicubic) then CLIP mean/std normalisation, as in
CLIP/open_clip training and the FiF reference (DESIGN §2). Evaluation: bicubic resize of the shorter side plus a
centre crop (the identity when the stored images already have the target size), then normalisation.

Why in torch on the batch rather than in FFCV's pipeline: FFCV's ``RandomResizedCropRGBImageDecoder`` draws its
crops from numpy's global RNG inside numba threads, so its output cannot be reproduced, and the "memory" backend
would need a second implementation. Here the crop boxes come from a ``torch.Generator`` seeded from
``(seed, epoch, batch)`` (or ``(seed, task, step)`` for mixed batches), so both loader backends produce identical
tensors and a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (the CLIP normalisation).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RRC_SCALE = (0.9, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10  # torchvision's number of attempts before falling back to a centre crop


def seed_for(*keys: int) -> int:
    """A 63-bit seed mixing integer keys (e.g. seed, epoch, batch) through numpy's SeedSequence."""
    entropy = [int(k) % (1 << 64) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator_for(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*keys))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ``float32 [B, 3, H, W]`` in [0, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3] images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place (callers pass freshly made tensors)."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def rrc_boxes(n: int, height: int, width: int, generator: torch.Generator,
              scale: Sequence[float] = RRC_SCALE, ratio: Sequence[float] = RRC_RATIO) -> torch.Tensor:
    """Integer crop boxes ``[n, 4] = (top, left, h, w)`` drawn exactly like torchvision's RandomResizedCrop
    (up to 10 tries per image, first valid one wins, else the whole image), vectorised over the batch."""
    area = height * width
    u = torch.rand(n, _RRC_TRIES, 4, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1).clamp(min=1)).long()
    left = torch.floor(u[..., 3] * (width - w + 1).clamp(min=1)).long()
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    idx = first.clamp(min=0).unsqueeze(1)
    boxes = torch.stack([top.gather(1, idx), left.gather(1, idx), h.gather(1, idx), w.gather(1, idx)], -1)[:, 0]
    boxes[first < 0] = _fallback_box(height, width, ratio)
    return boxes


def _fallback_box(height: int, width: int, ratio: Sequence[float]) -> torch.Tensor:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return torch.tensor([(height - h) // 2, (width - w) // 2, h, w])


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of ``x [B, C, H, W]`` to its box and resize it to ``size`` (bicubic), in one
    ``grid_sample`` call; pixel centres map as in ``F.interpolate(align_corners=False)``."""
    b, _, height, width = x.shape
    top, left, h, w = (boxes[:, k].to(x.dtype) for k in range(4))
    theta = torch.zeros(b, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots; PIL-based pipelines clamp to the pixel range too


def train_transform(images: torch.Tensor, size: int, generator: torch.Generator, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD, scale: Sequence[float] = RRC_SCALE,
                    ratio: Sequence[float] = RRC_RATIO) -> torch.Tensor:
    """CLIP training transform of a ``uint8 [B, H, W, 3]`` batch -> normalised ``float32 [B, 3, size, size]``."""
    x = to_float(images)
    boxes = rrc_boxes(x.shape[0], x.shape[2], x.shape[3], generator, scale, ratio)
    return normalize(resized_crop(x, boxes, size), mean, std)


def eval_transform(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP test transform: bicubic resize of the shorter side to ``size``, centre crop, normalise."""
    x = to_float(images)
    h, w = x.shape[2], x.shape[3]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    return normalize(x, mean, std)
