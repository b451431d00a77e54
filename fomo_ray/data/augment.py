"""CLIP image transforms, split between the host and the device, deterministic from a seed.

Training: RandomResizedCrop(scale 0.9-1.0, ratio 3/4-4/3) then CLIP mean/std normalisation, as in CLIP/open_clip
training and the FiF reference (docs/BENCHMARK.md §Reference settings). The crop *boxes* are drawn here, on the host,
from a ``torch.Generator`` seeded from ``(seed, epoch, batch)`` (or ``(seed, task, step)`` for mixed batches), exactly
as torchvision draws them; the compiled image stage (:mod:`fomo_ray.data.decode`) then decodes, crops and resizes to
``uint8`` in one pass. FFCV's own ``RandomResizedCropRGBImageDecoder`` draws its crops from numpy's global RNG inside
numba threads, so its output cannot be reproduced; seeded boxes keep both loader backends identical and a resumed run on
exactly the batches an uninterrupted one sees.

Evaluation: the images as stored (FFCV's centre-crop decoder for files of mixed sizes), then, on the device, a
bicubic resize of the shorter side plus a centre crop when they are not yet ``size`` x ``size``.

:func:`model_input` is the device half: ``uint8 [B, H, W, 3]`` -> float, normalised, in the model's dtype. It runs
after the copy to the device, which moves 4x fewer bytes than float32 and does the float work on the accelerator.
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
    """``uint8 [B, H, W, 3]`` -> ``float32 [B, 3, H, W]`` in [0, 1], on the images' device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3] images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place (callers pass freshly made tensors)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def model_input(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's image input from ``uint8 [B, H, W, 3]`` already on the device: float, resized to ``size`` if
    needed (the evaluation transform; training crops arrive at ``size``), CLIP-normalised, then cast to ``dtype``
    (the autocast dtype; the normalisation itself runs in float32)."""
    x = to_float(images)
    if x.shape[2:] != (size, size):
        x = _resize_center_crop(x, size)
    x = normalize(x, mean, std)
    return x if dtype is None or dtype == x.dtype else x.to(dtype)


def _resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP test transform: bicubic resize of the shorter side to ``size``, then a centre crop."""
    h, w = x.shape[2], x.shape[3]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size]


def rrc_boxes(heights: torch.Tensor | int, widths: torch.Tensor | int, generator: torch.Generator,
              scale: Sequence[float] = RRC_SCALE, ratio: Sequence[float] = RRC_RATIO, n: int | None = None
              ) -> torch.Tensor:
    """Integer crop boxes ``[n, 4] = (top, left, h, w)`` drawn exactly like torchvision's RandomResizedCrop
    (up to 10 tries per image, first valid one wins, else a centre crop of the allowed aspect ratio), vectorised
    over the batch. ``heights``/``widths``: each image's size (tensors) or one size for all ``n`` images."""
    height = torch.as_tensor(heights, dtype=torch.int64).reshape(-1)
    width = torch.as_tensor(widths, dtype=torch.int64).reshape(-1)
    n = max(len(height), len(width)) if n is None else n
    height, width = height.expand(n).unsqueeze(1), width.expand(n).unsqueeze(1)
    area = (height * width).double()
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
    for i in torch.nonzero(first < 0).flatten().tolist():
        boxes[i] = _fallback_box(int(height[i, 0]), int(width[i, 0]), ratio)
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
