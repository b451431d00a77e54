"""Cooperative early stopping of sweep trials on their evaluation trajectories (pure rules; no Ray).

A sweep YAML may set ``stopping:``; at every task boundary (evaluation point t >= ``min_tasks``, never the last) a
trial posts the trajectory mean of ``metric`` over its points 0..t and learns whether to stop:

- ``trails_best``: stop when it trails the best trial at the same point by more than ``margin`` (percent points);
- ``median``: stop when it is more than ``margin`` below the median of the *other* trials at the same point (the
  median stopping rule of Golovin et al. 2017, "Google Vizier", on running means).

Only trials that already reached the point are compared, and only once ``min_trials`` (this one included) have. The
reference trials (``references:``: zero-shot, fine-tune, joint) are left out: never stopped, never compared with. The
trial then leaves its loop through the ``should_stop`` hook, at a task boundary, with its checkpoint and partial
trajectory; no scheduler kills its workers. The decision depends on which trials reached the point first, so with
concurrent trials it can differ between two runs of a sweep; every decision is written down with its numbers.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

RULES = ("trails_best", "median")
METRICS = ("GM", "A_KA", "A_ZS")


class StoppingError(ValueError):
    """A ``stopping:`` entry is invalid; the message names the key."""


@dataclass(frozen=True)
class StoppingRule:
    rule: str
    metric: str = "GM"
    min_tasks: int = 1      # the first evaluation point at which a trial may be stopped
    margin: float = 0.0     # percent points
    min_trials: int = 2     # trials at the point (this one included) before the rule may stop one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_stopping(raw: Any, source: str = "sweep") -> StoppingRule | None:
    """``stopping: {rule: trails_best, min_tasks: 2, margin: 5}`` -> a validated rule (None when absent)."""
    if raw in (None, {}, ""):
        return None
    if not isinstance(raw, Mapping):
        raise StoppingError(f"{source}: 'stopping' must be a mapping, e.g. {{rule: trails_best, margin: 5}}")
    fields = set(StoppingRule.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise StoppingError(f"{source}: unknown key(s) {unknown} in 'stopping'; valid: {sorted(fields)}")
    if raw.get("rule") not in RULES:
        raise StoppingError(f"{source}: stopping.rule must be one of {list(RULES)}, got {raw.get('rule')!r}")
    rule = StoppingRule(**{k: raw[k] for k in raw})
    if rule.metric not in METRICS:
        raise StoppingError(f"{source}: stopping.metric must be one of {list(METRICS)}, got {rule.metric!r}")
    if not isinstance(rule.min_tasks, int) or rule.min_tasks < 1:
        raise StoppingError(f"{source}: stopping.min_tasks must be an integer >= 1, got {rule.min_tasks!r}")
    if not isinstance(rule.min_trials, int) or rule.min_trials < 2:
        raise StoppingError(f"{source}: stopping.min_trials must be an integer >= 2, got {rule.min_trials!r}")
    if not isinstance(rule.margin, (int, float)) or rule.margin < 0:
        raise StoppingError(f"{source}: stopping.margin must be a number >= 0 (percent points), got {rule.margin!r}")
    return rule


def trajectory_mean(values: Sequence[float]) -> float:
    """The mean over the evaluation points so far (point 0, the zero-shot model, included)."""
    return sum(values) / len(values)


def decide(rule: StoppingRule, trial: str, point: int, value: float,
           board: Mapping[str, Mapping[int, float]]) -> str:
    """Why ``trial`` stops at ``point`` with trajectory mean ``value`` (a fraction) given every trial's posted means
    (``board``: trial -> point -> mean); "" when it goes on."""
    if point < rule.min_tasks:
        return ""
    at = {t: v[point] for t, v in board.items() if point in v and t != trial}
    if len(at) + 1 < rule.min_trials:
        return ""
    name = f"trajectory-mean {rule.metric}"
    if rule.rule == "trails_best":
        best_trial, best = max(at.items(), key=lambda kv: kv[1])
        if best - value > rule.margin / 100:
            return (f"stopped at point {point}: {name} {100 * value:.1f} trails the best trial ({best_trial}, "
                    f"{100 * best:.1f}) by more than {rule.margin:g}")
        return ""
    median = statistics.median(at.values())
    if value < median - rule.margin / 100:
        return (f"stopped at point {point}: {name} {100 * value:.1f} is more than {rule.margin:g} below the median "
                f"of {len(at)} other trial(s) ({100 * median:.1f})")
    return ""


def history_from_results(results: Any, metric: str) -> dict[str, dict[int, float]]:
    """trial -> point -> trajectory mean of ``metric``, from a sweep's results table (one row per trial x point),
    so a resumed sweep's rule still sees the trials that ran before the interrupt."""
    out: dict[str, dict[int, float]] = {}
    if results is None or len(results) == 0 or metric not in results:
        return out
    for run, rows in results.sort_values(["run", "point"]).groupby("run"):
        values = [float(v) for v in rows[metric]]
        out[str(run)] = {int(p): trajectory_mean(values[:i + 1]) for i, p in enumerate(rows["point"])}
    return out
