"""Per-task LR schedules and meta-schedules (fomo_ray/maths/schedules.py, docs/BENCHMARK.md §Schedules)."""
from __future__ import annotations

import math

import pytest

from fomo_ray.maths import schedules as sc
from fomo_ray.config import ConfigError, ExperimentConfig, ScheduleConfig

LR = 1e-5  # the paper's ViT-B/16 lr


def cfg(**kw) -> ScheduleConfig:
    return ScheduleConfig(**kw)


# --------------------------------------------------------------------------------------------------- meta-schedules
def test_autoregressive_cosine_peaks_match_design_at_paper_budget():
    # The paper's values (docs/BENCHMARK.md §Schedules) are for S = 1420 steps per task (ViT-B/16, T = 20),
    # W = ceil(0.1 * 1420) = 142.
    assert sc.warmup_steps(1420, 0.1) == 142
    peaks = [sc.task_peak_lr(t, 1420, cfg(meta="autoregressive_cosine"), LR) / LR for t in range(4)]
    assert [round(p, 3) for p in peaks] == [1.0, 0.5, 0.25, 0.147]
    # without the 1e-3 floor the 4th value would be 0.146: the floor is part of the formula
    v3 = sc.autoregressive_cosine_factor(3, 1420, 142)
    assert round(v3, 3) == 0.146 and round(1e-3 + v3 * (1 - 1e-3), 3) == 0.147


def test_autoregressive_rsqrt_peaks_match_design():
    peaks = [sc.task_peak_lr(t, 1420, cfg(meta="autoregressive_rsqrt"), LR) / LR for t in (0, 1, 2, 19, 199)]
    assert [round(p, 2) for p in peaks] == [1.0, 0.43, 0.38, 0.32, 0.32]
    assert peaks[-1] > math.sqrt(0.1)  # approaches sqrt(W/S) from above
    # depends on W/S only: the tiny default budget (60 steps/task, W = 6) has the same peaks
    assert sc.task_peak_lr(1, 60, cfg(meta="autoregressive_rsqrt"), 1.0) == pytest.approx(peaks[1])


def test_meta_schedule_scales_the_whole_task_curve():
    plain = sc.lr_curve(50, 2, cfg(name="cosine"), LR)
    meta = sc.lr_curve(50, 2, cfg(name="cosine", meta="autoregressive_cosine"), LR)
    assert max(plain) == pytest.approx(LR)
    assert max(meta) == pytest.approx(sc.task_peak_lr(2, 50, cfg(meta="autoregressive_cosine"), LR))
    assert meta[-1] == pytest.approx(LR * 1e-3)  # same floor for every task
    assert sc.lr_curve(10, 0, cfg(meta="autoregressive_cosine"), LR) == sc.lr_curve(10, 0, cfg(), LR)


# --------------------------------------------------------------------------------------------------- per-task
def test_cosine_warmup_endpoints_and_floor_at_last_step():
    s = cfg(name="cosine")
    steps, w = 100, 10
    curve = sc.lr_curve(steps, 0, s, LR)
    assert curve[0] == pytest.approx(LR / w)          # first warmup step
    assert curve[w - 1] == pytest.approx(LR)          # warmup ends at the peak
    assert curve[w] < LR                              # decay starts right after
    assert curve[-1] == pytest.approx(LR * 1e-3)      # floor at the last step
    assert min(curve) == pytest.approx(LR * 1e-3)
    mid = w + (steps - w) // 2 - 1                    # progress exactly 1/2 -> halfway between peak and floor
    assert curve[mid] == pytest.approx(LR * 1e-3 + 0.5 * (LR - LR * 1e-3))
    assert all(a >= b for a, b in zip(curve[w - 1:], curve[w:]))  # monotone after warmup


def test_rsqrt_warmup_decay_and_cooldown_to_floor():
    s = cfg(name="rsqrt")
    steps, w, c = 100, 10, 10
    curve = sc.lr_curve(steps, 0, s, LR)
    assert curve[0] == pytest.approx(LR / w) and curve[w - 1] == pytest.approx(LR)
    assert curve[39] == pytest.approx(LR * math.sqrt(w / 40))    # rsqrt phase
    assert curve[steps - c - 1] == pytest.approx(LR * math.sqrt(w / (steps - c)))
    assert curve[-1] == pytest.approx(LR * 1e-3)                 # cooldown ends on the floor
    cool = curve[steps - c:]
    steps_down = [a - b for a, b in zip(cool, cool[1:])]
    assert steps_down == pytest.approx([steps_down[0]] * (c - 1))  # linear
    zero_floor = sc.lr_curve(steps, 0, cfg(name="rsqrt", min_lr_ratio=0.0), LR)
    assert zero_floor[-1] == 0.0


def test_constant_and_degenerate_tasks():
    assert sc.lr_curve(5, 3, cfg(name="constant"), LR) == [LR] * 5
    assert sc.lr_curve(1, 0, cfg(name="cosine"), LR) == [LR]      # one step: all warmup, at the peak
    assert sc.lr_curve(1, 0, cfg(name="rsqrt"), LR) == pytest.approx([LR])
    no_warmup = sc.lr_curve(10, 0, cfg(name="cosine", warmup_frac=0.0), LR)
    assert no_warmup[0] < LR and no_warmup[-1] == pytest.approx(LR * 1e-3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"step 10 is outside"):
        sc.lr_at(10, 10, 0, cfg(), LR)
    with pytest.raises(ValueError, match="at least one step"):
        sc.lr_at(0, 0, 0, cfg(), LR)
    with pytest.raises(ValueError, match="warmup_frac > 0"):
        sc.task_peak_lr(1, 100, cfg(meta="autoregressive_rsqrt", warmup_frac=0.0), LR)
    with pytest.raises(ConfigError, match="schedule.meta"):
        ExperimentConfig().replace({"schedule.meta": "geometric"})


def test_pure_and_deterministic():
    s = cfg(name="rsqrt", meta="autoregressive_rsqrt")
    assert sc.lr_curve(37, 4, s, LR) == sc.lr_curve(37, 4, s, LR)
