"""The two reference points every study needs: zero-shot (no update) and joint training (the oracle upper bound).

Both come from Roth et al. 2024, "A Practitioner's Guide to Continual Multimodal Pretraining" (arXiv 2408.14471):
the stream's starting point and the model trained once on the union of all update data with the whole stream's
compute, which the paper plots as the upper bound of accumulation.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from fomo_ray.methods.base import Method, TaskPlan, freeze_all_but


class ZeroShot(Method):
    """No update at all: every task gets 0 steps, so every evaluation point shows theta_0 (the trajectory is flat
    and aligned with the other methods' evaluation points). The stream's starting point in Roth et al. 2024
    (arXiv 2408.14471)."""

    name = "zero_shot"
    trains = False

    def setup(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def task_plan(self, task_rows: list[np.ndarray], steps_per_task: int) -> list[TaskPlan]:
        return [TaskPlan(rows, 0) for rows in task_rows]


class Joint(Method):
    """Joint / oracle training: one task over the union of all tasks' update data with the whole stream's budget
    (T x the per-task steps), full fine-tuning; the evaluation trajectory has two points (before and after).
    The upper bound of accumulation plotted by Roth et al. 2024 (arXiv 2408.14471)."""

    name = "joint"
    cost_as = "finetune"

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: True)
        return model

    def task_plan(self, task_rows: list[np.ndarray], steps_per_task: int) -> list[TaskPlan]:
        union = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in task_rows]))
        return [TaskPlan(union, steps_per_task * len(task_rows))]
