"""ZSCL: fine-tuning with distillation towards the initial model on reference (pool) data, plus weight consolidation.

Zheng et al. 2023, "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models"
(ICCV, arXiv 2303.06628). The math lives in :func:`distillation`; the method holds theta_0 (its forward runs as
``torch.func.functional_call`` of the same model on those weights, so no second module exists), a fixed reference
set of pool samples the assembly hands over once (``Method.use_reference``), and the weight ensemble.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fomo_ray.methods.base import Method, StateDict, clone_state, freeze_all_but


def distillation(logits: torch.Tensor, logits0: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 [KL(p0 || p) over texts per image + KL(p0 || p) over images per text]``, batch means, with
    ``p = softmax(logits / T)`` of the current model and ``p0`` of the initial one: zero exactly when the two models
    give the same image-text similarities (ZSCL's distillation of both directions)."""
    loss = logits.new_zeros(())
    for cur, ref in ((logits, logits0), (logits.T, logits0.T)):
        loss = loss + F.kl_div(F.log_softmax(cur / temperature, dim=1), F.log_softmax(ref / temperature, dim=1),
                               reduction="batchmean", log_target=True)
    return loss * temperature ** 2


def _clip_terms(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised image features, normalised text features, exp(logit scale)) of open_clip's forward output."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


class ZSCL(Method):
    """ZSCL (Zheng et al. 2023, "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
    Models", ICCV, arXiv 2303.06628): full fine-tuning plus ``weight * distillation`` of the image-text similarities
    of the frozen initial model theta_0 on a reference batch of pool data every step, and weight consolidation: every
    ``we_every`` steps the weight ensemble takes the current weights into its running mean (from the task's start
    weights), and after the task the ensemble is deployed and is where the next task starts (the reference
    implementation of Roth et al. 2024 does the same). The distillation's two forwards are part of the measured
    step, theta_0 and the ensemble of the method's memory, so the budget charges both."""

    name = "zscl"
    reads = ("zscl.",)
    cost_reads = ("zscl.ref_batch",)

    def setup(self, model: nn.Module) -> nn.Module:
        z = self.cfg.zscl
        self.weight, self.temperature, self.we_every = z.weight, z.temperature, z.we_every
        self.reference_size, self.ref_batch = z.ref_size, z.ref_batch
        freeze_all_but(model, lambda n, p: True)
        self.theta0 = clone_state(model.state_dict())
        self.ref_images: torch.Tensor | None = None
        self.ref_tokens: torch.Tensor | None = None
        self.draws = 0              # reference batches used so far (the cycle's position)
        self.ensemble: StateDict | None = None
        self.members = 0            # snapshots in the ensemble besides the task's start weights
        self.consolidated: StateDict | None = None  # the ensemble deployed after the last task
        return model

    def use_reference(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        self.ref_images, self.ref_tokens = images, tokens

    def steady_state(self, model: nn.Module) -> None:
        # the budget's step: a reference batch of the run's shapes and the ensemble held, as from the first task on
        if self.ref_images is None:
            g = torch.Generator().manual_seed(0)
            size, ctx, vocab = model.visual.image_size, model.context_length, model.vocab_size
            size = size if isinstance(size, int) else size[0]
            tokens = torch.randint(1, vocab - 1, (self.ref_batch, ctx), generator=g)
            tokens[:, -1] = vocab - 1  # the end-of-text token, where open_clip pools
            self.use_reference(torch.randn(self.ref_batch, 3, size, size, generator=g), tokens)
        self.ensemble = clone_state(model.state_dict())

    def _reference_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_images is None:
            raise RuntimeError("ZSCL needs its reference set of pool samples (Method.use_reference); the run "
                               "assembly hands it over before the stream")
        n = len(self.ref_images)
        idx = (self.draws * self.ref_batch + torch.arange(self.ref_batch)) % n
        device = next(iter(self.theta0.values())).device
        return self.ref_images[idx.to(self.ref_images.device)].to(device), self.ref_tokens[idx].to(device)

    def extra_loss(self, model: nn.Module, t: int) -> torch.Tensor | None:
        images, tokens = self._reference_batch()
        with torch.no_grad():  # the initial model: the same module run on theta_0's weights
            f0_img, f0_txt, scale0 = _clip_terms(torch.func.functional_call(model, self.theta0, (images, tokens)))
            logits0 = scale0 * f0_img @ f0_txt.T
        f_img, f_txt, _ = _clip_terms(model(images, tokens))
        logits = scale0 * f_img @ f_txt.T  # theta_0's temperature on both sides: the comparison is of similarities
        return self.weight * distillation(logits, logits0, self.temperature)

    def training_weights(self, t: int, model: nn.Module) -> StateDict | None:
        start = self.consolidated if t > 0 else None
        if self.we_every:
            self.ensemble = clone_state(start if start is not None else model.state_dict())
            self.members = 0
        return start

    def after_step(self, model: nn.Module, t: int, step: int, lr: float) -> None:
        self.draws += 1
        if self.we_every and (step + 1) % self.we_every == 0:
            self.members += 1  # running mean of the start weights and every snapshot: e += (theta - e) / (k + 1)
            keys = [k for k, v in self.ensemble.items() if v.is_floating_point()]
            current = model.state_dict()
            ens = [self.ensemble[k] for k in keys]
            torch._foreach_add_(ens, torch._foreach_sub([current[k].detach() for k in keys], ens),
                                alpha=1.0 / (self.members + 1))

    def after_task(self, model: nn.Module, t: int, task_losses) -> None:
        self.consolidated = clone_state(self.ensemble) if self.we_every and self.members else None

    def deployed_weights(self, t: int, model: nn.Module) -> StateDict:
        return self.consolidated if self.consolidated is not None else model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"theta0": self.theta0, "draws": self.draws, "members": self.members}
        if self.ensemble is not None:
            out["ensemble"] = self.ensemble
        if self.consolidated is not None:
            out["consolidated"] = self.consolidated
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(iter(self.theta0.values())).device
        self.theta0 = clone_state(state["theta0"], device)
        self.draws, self.members = int(state["draws"]), int(state["members"])
        self.ensemble = clone_state(state["ensemble"], device) if "ensemble" in state else None
        self.consolidated = clone_state(state["consolidated"], device) if "consolidated" in state else None
