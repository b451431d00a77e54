"""Continual model merging as a TIME triple: (initialisation rule, deployment rule, merge operator).

Dziadzio et al. 2024, "How to Merge Your Multimodal Models Over Time?" (TIME, arXiv 2412.06712) factor merging over
a stream into *where task t starts training* (init), *what is merged into the deployed model* (deploy) and *how*
(the operator, from ``fomo_ray.maths.merge_ops.OPERATORS``). With theta_0 the zero-shot weights, theta_t the weights
after training task t and m_t the deployed weights (m_0 = theta_0, w = ``method.merge.weight``):

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
- ``magmax_merge`` = (previous_trained, all_experts, magmax): MagMax (Marczak et al. 2024, "MagMax: Leveraging
  Model Merging for Seamless Continual Learning", arXiv 2407.06322): sequential fine-tuning, every snapshot kept,
  deployed as the per-entry largest-magnitude task vector of all snapshots.
- ``opcm_merge`` = (zero_shot, all_experts, opcm): OPCM in its paper's setting (Tang et al. 2025, arXiv 2501.09522):
  independent experts from theta_0 merged one at a time by orthogonal projection.
- ``dop_merge`` = (zero_shot, all_experts, dop): DOP in the same setting (dual projections, NeurIPS 2025).
- ``merge`` reads init/deploy/operator from ``method.merge`` (any TIME triple).

The first five presets fix init/deploy, the last three the operator too; the operator's parameters always come
from ``method.merge``.

The continual operators ``opcm`` and ``dop`` (``fomo_ray/maths/merge_continual.py``) fold theta_t into a running merge
anchored at theta_0 with a carried state, so under every deploy rule the method calls their step (never keeping
experts: constant memory) with the deploy rule's base as the running merge: ``ema`` and ``all_experts`` both give
the papers' sequential merge m_t = step(theta_0, m_{t-1}, theta_t) (the fold of all experts, incrementally);
``zero_shot_anchor`` has no history, so each m_t is the first-step rule, theta_t itself. The weight ``w`` does not
apply (lambda_t and the MGDA weight set the mix). Their SVDs and DOP's optimisation are charged per task by the
budget (:meth:`Merge.extra_cost`, ``merge_continual.step_gflops``); merging by the other operators is counted free,
as in Roth et al. 2024.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fomo_ray.maths import merge_continual, merge_ops
from fomo_ray.config import MethodConfig
from fomo_ray.costs import ExtraCost
from fomo_ray.methods.base import Method, StateDict, TaskLosses, clone_state, freeze_all_but
from fomo_ray.seeding import derive_seed

INIT_RULES = ("previous_deployed", "previous_trained", "zero_shot")
DEPLOY_RULES = ("ema", "zero_shot_anchor", "all_experts")

#: registry name -> (init rule, deploy rule, operator or None = ``method.merge.operator``); None = all three from
#: ``method.merge``
MERGE_PRESETS: dict[str, tuple[str, str, str | None] | None] = {
    "merge": None,
    "ema_merge": ("previous_deployed", "ema", None),
    "zs_merge": ("zero_shot", "ema", None),
    "ft_merge": ("previous_deployed", "zero_shot_anchor", None),
    "offline_merge": ("zero_shot", "all_experts", None),
    "magmax_merge": ("previous_trained", "all_experts", "magmax"),
    "opcm_merge": ("zero_shot", "all_experts", "opcm"),
    "dop_merge": ("zero_shot", "all_experts", "dop"),
}


def _on(state: Mapping[str, torch.Tensor], device: torch.device | str) -> StateDict:
    return {k: v.to(device) for k, v in state.items()}


class Merge(Method):
    """Fine-tuning with continual model merging: one class, one registry name per preset (see the module docstring
    and :data:`MERGE_PRESETS`); papers: Roth et al. 2024 (arXiv 2408.14471), TIME (Dziadzio et al. 2024, arXiv
    2412.06712), WiSE-FT (Wortsman et al. 2022), Stojanovski et al. 2022, MagMax (Marczak et al. 2024, arXiv
    2407.06322), OPCM (Tang et al. 2025, arXiv 2501.09522), DOP (NeurIPS 2025)."""

    name = "merge"
    cost_as = "finetune"

    def __init__(self, cfg: MethodConfig, seed: int = 0):
        super().__init__(cfg, seed)
        if cfg.name not in MERGE_PRESETS:
            raise ValueError(f"method '{cfg.name}' is not a merge preset; valid: {', '.join(MERGE_PRESETS)}")
        self.name = cfg.name
        preset = MERGE_PRESETS[cfg.name]
        self.init_rule, self.deploy_rule, operator = preset if preset else (cfg.merge.init, cfg.merge.deploy, None)
        self.operator = operator or cfg.merge.operator
        self.continual = self.operator in merge_ops.CONTINUAL
        if self.continual:  # its SVDs / optimisation are charged on top of fine-tuning's step (budget.registry_cost)
            self.cost_as, self.step_as = None, "finetune"
            self.cost_reads = ("merge.operator",) + tuple(f"merge.{k}" for k in merge_ops.config_params(self.operator))
        if self.init_rule not in INIT_RULES:
            raise ValueError(f"unknown merge init rule '{self.init_rule}'; valid: {', '.join(INIT_RULES)}")
        if self.deploy_rule not in DEPLOY_RULES:
            raise ValueError(f"unknown merge deploy rule '{self.deploy_rule}'; valid: {', '.join(DEPLOY_RULES)}")
        merge_ops.operator_params(self.operator)  # unknown operator -> MergeError listing the valid ones
        if self.deploy_rule == "all_experts" and self.operator == "slerp":
            raise ValueError("merge operator 'slerp' merges two models only; deploy rule 'all_experts' needs an "
                             "operator over many experts (interpolate, task_arithmetic, ties, ...)")
        if self._weighted() and not 0.0 <= cfg.merge.weight <= 1.0:  # all_experts has no weight
            raise ValueError(f"config key 'method.merge.weight' must be in [0, 1], got {cfg.merge.weight}")

    @classmethod
    def config_keys(cls, cfg: MethodConfig) -> tuple[str, ...]:
        """What :meth:`after_task` reads: init/deploy only for ``merge`` (the presets fix them), the weight unless
        the deploy rule merges all experts equally, the operator with the parameters it accepts (as
        ``merge_ops.merge_from_config`` passes them), LiNeS' alpha and, when LiNeS is on, its beta."""
        preset = MERGE_PRESETS.get(cfg.name)
        deploy = preset[1] if preset else cfg.merge.deploy
        operator = (preset[2] if preset else None) or cfg.merge.operator
        keys = [] if preset else ["merge.init", "merge.deploy"]
        keys += [] if deploy == "all_experts" or operator in merge_ops.CONTINUAL else ["merge.weight"]
        keys += [] if preset and preset[2] else ["merge.operator"]
        keys += [f"merge.{k}" for k in merge_ops.config_params(operator)]
        keys += ["merge.lines_alpha"] + (["merge.lines_beta"] if cfg.merge.lines_alpha >= 0 else [])
        return tuple(keys)

    def _weighted(self) -> bool:
        return self.deploy_rule != "all_experts" and not self.continual

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: True)
        self.device = next(model.parameters()).device
        self.theta0 = clone_state(model.state_dict())
        self.deployed = self.theta0  # m_0 = theta_0
        # all_experts keeps every expert; they live on the CPU so long streams do not exhaust accelerator memory
        self.experts: list[StateDict] = []
        self.carried = merge_continual.new_state()  # the continual operators' state (unused by the others)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
        return model

    def steady_state(self, model: nn.Module) -> None:
        # the budget prepares fine-tuning's step (step_as) and asks this method only for the shapes it merges
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}

    def extra_cost(self) -> ExtraCost:
        """A continual operator's per-task merge, counted on the model's shapes (``merge_continual.step_gflops``);
        the other operators are counted free, as in Roth et al. 2024."""
        if not self.continual or not getattr(self, "shapes", None):
            return ExtraCost()
        params = {k: getattr(self.cfg.merge, k) for k in merge_ops.config_params(self.operator)}
        return ExtraCost(task_gflops=merge_continual.step_gflops(self.operator, self.shapes, params))

    def training_weights(self, t: int, model: nn.Module) -> StateDict | None:
        if t == 0 or self.init_rule == "previous_trained":
            return None  # task 0 starts from theta_0, which the model holds
        return self.deployed if self.init_rule == "previous_deployed" else self.theta0

    def after_task(self, model: nn.Module, t: int, task_losses: TaskLosses) -> None:
        theta_t = clone_state(model.state_dict())
        seed = derive_seed(self.seed, "merge", t)  # only operators that draw (DARE) use it
        if self.continual:
            self._continual_merge(theta_t)
        elif self.deploy_rule == "ema":
            w = self.cfg.merge.weight  # read only where it applies (config_keys: what a run logs)
            self.deployed = self._merge(self.deployed, [theta_t], [w], seed)
        elif self.deploy_rule == "zero_shot_anchor":
            w = self.cfg.merge.weight
            self.deployed = self._merge(self.theta0, [theta_t], [w], seed)
        else:
            self.experts.append(clone_state(theta_t, "cpu"))
            merged = self._merge(_on(self.theta0, "cpu"), self.experts, None, seed)
            self.deployed = _on(merged, self.device)

    def _continual_merge(self, theta_t: StateDict) -> None:
        """m_t = step(theta_0, running merge, theta_t) with the carried state; zero_shot_anchor restarts it."""
        cfg = self.cfg.merge
        params = {k: getattr(cfg, k) for k in merge_ops.config_params(self.operator)}
        history = self.carried if self.deploy_rule != "zero_shot_anchor" else merge_continual.new_state()
        running = self.deployed if self.deploy_rule != "zero_shot_anchor" else self.theta0
        merged, self.carried = merge_continual.STEPS[self.operator](self.theta0, running, theta_t, history, **params)
        if cfg.lines_alpha >= 0:  # LiNeS rescales the merge's update of the deploy rule's base, as for every operator
            merged = merge_ops.apply_lines(running, merged, cfg.lines_alpha, cfg.lines_beta)
        self.deployed = merged

    def _merge(self, base: StateDict, experts: list[StateDict], weights: list[float] | None, seed: int) -> StateDict:
        return merge_ops.merge_from_config(self.cfg.merge, base, experts, weights, seed=seed, operator=self.operator)

    def deployed_weights(self, t: int, model: nn.Module) -> StateDict:
        return self.deployed

    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "deployed": self.deployed, "experts": list(self.experts),
                **({"carried": dict(self.carried)} if self.continual else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.theta0 = clone_state(state["theta0"], self.device)
        self.deployed = clone_state(state["deployed"], self.device)
        self.experts = [clone_state(e, "cpu") for e in state["experts"]]
        self.carried = dict(state.get("carried", merge_continual.new_state()))
