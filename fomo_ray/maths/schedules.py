"""Per-task learning-rate schedules and LR meta-schedules over tasks: pure functions of (step, task).

The formulas are those of docs/BENCHMARK.md §Schedules.

Every task restarts its schedule: ``S`` steps, a linear warmup of ``W = ceil(warmup_frac * S)`` steps
(step ``i < W`` gets ``peak * (i + 1) / W``, so step ``W - 1`` is at the peak), then

- ``constant``: the peak (no warmup);
- ``cosine`` (Loshchilov & Hutter 2017, "SGDR"): ``floor + (peak - floor) * (1 + cos(pi * p)) / 2`` with
  ``p = (i - W + 1) / (S - W)``, so the last step lands exactly on ``floor = min_lr_ratio * lr``;
- ``rsqrt``, the "infinite" schedule (Zhai et al. 2022, "Scaling Vision Transformers"; Ibrahim et al. 2024,
  "Simple and Scalable Strategies to Continually Pre-train LLMs"): ``peak * sqrt(W / (i + 1))`` after warmup,
  and over the last ``C = ceil(cooldown_frac * S)`` steps a linear cooldown from the rsqrt value to the floor,
  reached at the last step.

**Meta-schedules** (Roth et al. 2024, arXiv 2408.14471) scale each task's peak with the task index ``t``:

- autoregressive cosine: ``peak_t = min + v_t (lr - min)``, ``v_0 = 1``,
  ``v_t = (1 + cos(pi (t (S-W) + 1) / ((t+1)(S-W)))) / 2`` -- the value at task ``t``'s first decay step of one
  long cosine stretched over the decay phases of tasks ``0..t`` (same ``p`` convention as the per-task cosine);
- autoregressive rsqrt: ``peak_t = lr * sqrt((t+1) W / (t S + W))``.

With the paper's ``S = 1420`` (ViT-B/16, T = 20) and ``W = ceil(0.1 S) = 142`` the peaks are
cosine 1, 0.4999, 0.2504, 0.1471 (the paper's 1, .50, .25, .147; the floor ``min = 1e-3 lr`` is what lifts
0.1462 to .147) and rsqrt 1, 0.4264, 0.3780, ... -> sqrt(W/S) = 0.316 (the paper's 1, .43, .38, ... .32). Shorter
tasks shift the cosine peaks a little (S = 142, W = 15: 1, .494, .247, .145); the rsqrt peaks depend only on ``W/S``
(identical for S = 1420, 60, 20, where ``W = S/10`` exactly).
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = [
    "warmup_steps", "cooldown_steps", "constant_lr", "cosine_lr", "rsqrt_lr", "SCHEDULES",
    "autoregressive_cosine_factor", "autoregressive_rsqrt_factor", "META_SCHEDULES",
    "task_peak_lr", "lr_at", "lr_curve",
]


def _check(step: int, steps: int) -> None:
    if steps < 1:
        raise ValueError(f"a task needs at least one step, got steps={steps}")
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside the task's steps [0, {steps})")


def warmup_steps(steps: int, warmup_frac: float) -> int:
    """``W = ceil(warmup_frac * S)``, at most ``S`` (a one-step task is all warmup)."""
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"schedule.warmup_frac must be in [0, 1), got {warmup_frac}")
    # round() first so 0.1 * 1420 = 142.00000000000003 does not become 143
    return min(steps, math.ceil(round(warmup_frac * steps, 9)))


def cooldown_steps(steps: int, cooldown_frac: float) -> int:
    """``C = ceil(cooldown_frac * S)`` (0 disables the cooldown)."""
    if not 0.0 <= cooldown_frac <= 1.0:
        raise ValueError(f"schedule.cooldown_frac must be in [0, 1], got {cooldown_frac}")
    return min(steps, math.ceil(round(cooldown_frac * steps, 9)))


def _warmup(step: int, warmup: int, peak: float) -> float:
    return peak * (step + 1) / warmup


# --------------------------------------------------------------------------------------------------- per task
def constant_lr(step: int, steps: int, peak: float, *, warmup: int = 0, cooldown: int = 0,
                floor: float = 0.0) -> float:
    """The peak at every step (warmup, cooldown and floor are ignored, as in the paper's constant baseline)."""
    _check(step, steps)
    return peak


def cosine_lr(step: int, steps: int, peak: float, *, warmup: int, cooldown: int = 0, floor: float = 0.0) -> float:
    """Linear warmup then cosine decay from ``peak`` to ``floor``, reached at the last step."""
    _check(step, steps)
    if step < warmup:
        return _warmup(step, warmup, peak)
    progress = (step - warmup + 1) / (steps - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rsqrt_lr(step: int, steps: int, peak: float, *, warmup: int, cooldown: int, floor: float = 0.0) -> float:
    """Linear warmup, ``peak * sqrt(W / (step + 1))``, then a linear cooldown to ``floor`` at the last step."""
    _check(step, steps)
    if step < warmup:
        return _warmup(step, warmup, peak)
    w = max(warmup, 1)  # without warmup the decay is anchored at step 1

    def rsqrt(i: int) -> float:
        return peak * math.sqrt(w / (i + 1))

    start = steps - cooldown
    if cooldown == 0 or step < start:
        return rsqrt(step)
    top = rsqrt(start) if start >= warmup else peak  # a cooldown longer than the decay starts from the peak
    frac = (step - start + 1) / cooldown  # 1/C at the first cooldown step, 1 at the last
    return top + (floor - top) * frac


SCHEDULES: dict[str, Callable[..., float]] = {"constant": constant_lr, "cosine": cosine_lr, "rsqrt": rsqrt_lr}


# --------------------------------------------------------------------------------------------------- meta
def autoregressive_cosine_factor(task: int, steps: int, warmup: int) -> float:
    """``v_t = (1 + cos(pi (t(S-W) + 1) / ((t+1)(S-W)))) / 2``, ``v_0 = 1`` (docs/BENCHMARK.md §Schedules)."""
    if task == 0:
        return 1.0
    decay = max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (task * decay + 1) / ((task + 1) * decay)))


def autoregressive_rsqrt_factor(task: int, steps: int, warmup: int) -> float:
    """``vmul_t = sqrt((t+1) W / (t S + W))`` (docs/BENCHMARK.md §Schedules); 1 at ``t = 0``."""
    if warmup < 1:
        raise ValueError("the autoregressive rsqrt meta-schedule needs a warmup: set schedule.warmup_frac > 0")
    return math.sqrt((task + 1) * warmup / (task * steps + warmup))


META_SCHEDULES: dict[str, Callable[[int, int, int], float] | None] = {
    "none": None,
    "autoregressive_cosine": autoregressive_cosine_factor,
    "autoregressive_rsqrt": autoregressive_rsqrt_factor,
}


def _lookup(table: dict, name: str, key: str):
    if name not in table:
        raise ValueError(f"config key '{key}': unknown value '{name}'; valid: {', '.join(table)}")
    return table[name]


def task_peak_lr(task: int, steps: int, cfg, base_lr: float) -> float:
    """Peak lr of task ``task`` (0-based) under ``cfg.meta`` (a ``config.ScheduleConfig``)."""
    if task < 0:
        raise ValueError(f"task index must be >= 0, got {task}")
    meta = _lookup(META_SCHEDULES, cfg.meta, "schedule.meta")
    if meta is None:
        return base_lr
    v = meta(task, steps, warmup_steps(steps, cfg.warmup_frac))
    if cfg.meta == "autoregressive_cosine":
        floor = base_lr * cfg.min_lr_ratio
        return floor + v * (base_lr - floor)
    return base_lr * v


def lr_at(step: int, steps: int, task: int, cfg, base_lr: float) -> float:
    """The lr of ``step`` (0-based) of a task with ``steps`` steps; ``cfg`` is a ``config.ScheduleConfig``.

    The floor is ``min_lr_ratio * base_lr`` for every task (the meta-schedule lowers the peaks, not the floor).
    """
    schedule = _lookup(SCHEDULES, cfg.name, "schedule.name")
    peak = task_peak_lr(task, steps, cfg, base_lr)
    return schedule(step, steps, peak, warmup=warmup_steps(steps, cfg.warmup_frac),
                    cooldown=cooldown_steps(steps, cfg.cooldown_frac), floor=base_lr * cfg.min_lr_ratio)


def lr_curve(steps: int, task: int, cfg, base_lr: float) -> list[float]:
    """``[lr_at(i, ...) for i in range(steps)]`` (plots, tests)."""
    return [lr_at(i, steps, task, cfg, base_lr) for i in range(steps)]
