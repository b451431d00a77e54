"""Continual model merging as a TIME triple: (initialisation rule, deployment rule, merge operator).

Dziadzio et al. 2024, "How to Merge Your Multimodal Models Over Time?" (TIME, arXiv 2412.06712) factor merging over
a stream into *where task t starts training* (init), *what is merged into the deployed model* (deploy) and *how*
(the operator, from ``fomo_ray.merge_ops.OPERATORS``). With theta_0 the zero-shot weights, theta_t the weights after
training task t and m_t the deployed weights (m_0 = theta_0, w = ``method.merge.weight``):

=================  ===========================================================================================
init rule          task t starts from
=================  ===========================================================================================
previous_deployed  m_{t-1}
previous_trained   theta_{t-1} (the raw weights; merges only affect what is served)
zero_shot          theta_0
=================  ===========================================================================================

=================  ===========================================================================================
deploy rule        m_t =
=================  ===========================================================================================
ema                op(base=m_{t-1}, experts=[theta_t], weights=[w])   (interpolate: w·theta_t + (1-w)·m_{t-1})
zero_shot_anchor   op(base=theta_0, experts=[theta_t], weights=[w])   (interpolate: w·theta_t + (1-w)·theta_0)
all_experts        op(base=theta_0, experts=[theta_1..theta_t])       (interpolate: the mean of all experts)
=================  ===========================================================================================

The named merges of Roth et al. 2024 (arXiv 2408.14471, Sec. 5) are presets of that triple (:data:`MERGE_PRESETS`):

- ``ema_merge`` = (previous_deployed, ema): EMA of the fine-tuned weights, the paper's best long-horizon method
  (after Stojanovski et al. 2022, "Momentum-based Weight Interpolation of Strong Zero-Shot Models for Continual
  Learning").
- ``zs_merge`` = (zero_shot, ema): every task trains from theta_0, the EMA accumulates the experts.
- ``ft_merge`` = (previous_deployed, zero_shot_anchor): per-task WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning
  of zero-shot models", CVPR), the next task trains from m_t.
- ``offline_merge`` = (zero_shot, all_experts): independent experts from theta_0, deployed as a one-shot merge of
  all experts so far (TIME's offline baseline).
- ``merge`` reads init/deploy/operator from ``method.merge`` (any TIME triple).

The presets fix init/deploy; the operator and its parameters always come from ``method.merge``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fomo_ray import merge_ops
from fomo_ray.config import MethodConfig
from fomo_ray.methods.base import Method, StateDict, TaskLosses, clone_state, freeze_all_but
from fomo_ray.seeding import derive_seed

INIT_RULES = ("previous_deployed", "previous_trained", "zero_shot")
DEPLOY_RULES = ("ema", "zero_shot_anchor", "all_experts")

#: registry name -> (init rule, deploy rule); None = both from ``method.merge``
MERGE_PRESETS: dict[str, tuple[str, str] | None] = {
    "merge": None,
    "ema_merge": ("previous_deployed", "ema"),
    "zs_merge": ("zero_shot", "ema"),
    "ft_merge": ("previous_deployed", "zero_shot_anchor"),
    "offline_merge": ("zero_shot", "all_experts"),
}


def _on(state: Mapping[str, torch.Tensor], device: torch.device | str) -> StateDict:
    return {k: v.to(device) for k, v in state.items()}


class Merge(Method):
    """Fine-tuning with continual model merging: one class, five registry names (see the module docstring and
    :data:`MERGE_PRESETS`); papers: Roth et al. 2024 (arXiv 2408.14471), TIME (Dziadzio et al. 2024, arXiv
    2412.06712), WiSE-FT (Wortsman et al. 2022), Stojanovski et al. 2022."""

    name = "merge"
    cost_as = "finetune"

    def __init__(self, cfg: MethodConfig, seed: int = 0):
        super().__init__(cfg, seed)
        if cfg.name not in MERGE_PRESETS:
            raise ValueError(f"method '{cfg.name}' is not a merge preset; valid: {', '.join(MERGE_PRESETS)}")
        self.name = cfg.name
        preset = MERGE_PRESETS[cfg.name]
        self.init_rule, self.deploy_rule = preset if preset else (cfg.merge.init, cfg.merge.deploy)
        if self.init_rule not in INIT_RULES:
            raise ValueError(f"unknown merge init rule '{self.init_rule}'; valid: {', '.join(INIT_RULES)}")
        if self.deploy_rule not in DEPLOY_RULES:
            raise ValueError(f"unknown merge deploy rule '{self.deploy_rule}'; valid: {', '.join(DEPLOY_RULES)}")
        merge_ops.operator_params(cfg.merge.operator)  # unknown operator -> MergeError listing the valid ones
        if self.deploy_rule == "all_experts" and cfg.merge.operator == "slerp":
            raise ValueError("merge operator 'slerp' merges two models only; deploy rule 'all_experts' needs an "
                             "operator over many experts (interpolate, task_arithmetic, ties, ...)")
        if self.deploy_rule != "all_experts" and not 0.0 <= cfg.merge.weight <= 1.0:  # all_experts has no weight
            raise ValueError(f"config key 'method.merge.weight' must be in [0, 1], got {cfg.merge.weight}")

    @classmethod
    def config_keys(cls, cfg: MethodConfig) -> tuple[str, ...]:
        """What :meth:`after_task` reads: init/deploy only for ``merge`` (the presets fix them), the weight unless
        the deploy rule merges all experts equally, the operator with the parameters it accepts (as
        ``merge_ops.merge_from_config`` passes them), LiNeS' alpha and, when LiNeS is on, its beta."""
        preset = MERGE_PRESETS.get(cfg.name)
        deploy = preset[1] if preset else cfg.merge.deploy
        keys = [] if preset else ["merge.init", "merge.deploy"]
        keys += [] if deploy == "all_experts" else ["merge.weight"]
        keys += ["merge.operator"]
        keys += [f"merge.{k}" for k in merge_ops.config_params(cfg.merge.operator)]
        keys += ["merge.lines_alpha"] + (["merge.lines_beta"] if cfg.merge.lines_alpha >= 0 else [])
        return tuple(keys)

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: True)
        self.device = next(model.parameters()).device
        self.theta0 = clone_state(model.state_dict())
        self.deployed = self.theta0  # m_0 = theta_0
        # all_experts keeps every expert; they live on the CPU so long streams do not exhaust accelerator memory
        self.experts: list[StateDict] = []
        return model

    def training_weights(self, t: int, model: nn.Module) -> StateDict | None:
        if t == 0 or self.init_rule == "previous_trained":
            return None  # task 0 starts from theta_0, which the model holds
        return self.deployed if self.init_rule == "previous_deployed" else self.theta0

    def after_task(self, model: nn.Module, t: int, task_losses: TaskLosses) -> None:
        theta_t = clone_state(model.state_dict())
        seed = derive_seed(self.seed, "merge", t)  # only operators that draw (DARE) use it
        if self.deploy_rule == "ema":
            w = self.cfg.merge.weight  # read only where it applies (config_keys: what a run logs)
            self.deployed = merge_ops.merge_from_config(self.cfg.merge, self.deployed, [theta_t], [w], seed=seed)
        elif self.deploy_rule == "zero_shot_anchor":
            w = self.cfg.merge.weight
            self.deployed = merge_ops.merge_from_config(self.cfg.merge, self.theta0, [theta_t], [w], seed=seed)
        else:
            self.experts.append(clone_state(theta_t, "cpu"))
            merged = merge_ops.merge_from_config(self.cfg.merge, _on(self.theta0, "cpu"), self.experts, None,
                                                 seed=seed)
            self.deployed = _on(merged, self.device)

    def deployed_weights(self, t: int, model: nn.Module) -> StateDict:
        return self.deployed

    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "deployed": self.deployed, "experts": list(self.experts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.theta0 = clone_state(state["theta0"], self.device)
        self.deployed = clone_state(state["deployed"], self.device)
        self.experts = [clone_state(e, "cpu") for e in state["experts"]]
