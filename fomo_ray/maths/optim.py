"""The AdamW of every training step in fomo_ray (the continual loop and pretraining of the tiny base).

Decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") on matrices only: biases,
norm gains (all 1-D), embeddings and ``logit_scale`` are exempt, as open_clip trains CLIP. The FiF reference decays
every parameter (docs/BENCHMARK.md §Reference settings); ``optimizer.exempt_no_decay = false`` reproduces that.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether AdamW decays ``name``: not biases, norm gains (all 1-D), embeddings or logit_scale (as open_clip)."""
    return p.ndim >= 2 and "embedding" not in name and "logit_scale" not in name


def adamw_groups(named: Sequence[tuple[str, nn.Parameter]], weight_decay: float,
                 exempt_no_decay: bool = True) -> list[dict[str, Any]]:
    """AdamW parameter groups: decayed matrices first, then the exempt parameters at decay 0 (empty groups dropped);
    one group for everything when ``exempt_no_decay`` is off."""
    if not exempt_no_decay:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the optimizer updates, in a fixed (registration) order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, cfg: Any) -> torch.optim.AdamW:
    """A fresh AdamW over the model's trainable parameters under ``cfg.optimizer`` (the loop's, once per task)."""
    o = cfg.optimizer
    return torch.optim.AdamW(adamw_groups(trainable_named(model), o.weight_decay, o.exempt_no_decay),
                             lr=o.lr, betas=o.betas, eps=o.eps)
