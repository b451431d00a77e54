"""What a training step costs beyond what ``FlopCounterMode`` sees: the vocabulary methods use to declare their own
costs (``Method.extra_cost``) and the budget charges (``fomo_ray/budgets/budget.py``, docs/BENCHMARK.md §Budgets). Pure
data, no torch."""
from __future__ import annotations

from dataclasses import dataclass

#: elementwise FLOPs per trainable parameter of one AdamW step (moments 7, bias-corrected denominator 3,
#: update 3, decoupled weight decay 1); the FLOP counter only sees matmul-like ops
ADAMW_FLOPS_PER_PARAM = 14.0
#: a quadratic penalty sum_i c_i (theta_i - a_i)^2: forward sub, square, mul, sum (4) and backward (4)
PENALTY_FLOPS_PER_PARAM = 8.0


@dataclass(frozen=True)
class ExtraCost:
    """What a method costs beyond the CLIP training step, as the budget charges it."""

    step_flops_per_param: float = 0.0  # elementwise work per trainable parameter and step (penalty, path integral)
    task_passes: int = 0               # extra forward+backward passes over task data per task (EWC's Fisher)
    task_flops_per_param: float = 0.0  # elementwise work per trainable parameter and task (consolidation)
    task_gflops: float = 0.0           # counted per-task work beyond the step's shapes (a merge's SVDs, DOP's Adam)
