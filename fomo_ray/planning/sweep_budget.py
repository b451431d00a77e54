"""A sweep-wide compute budget (pure; no Ray): how much a whole sweep may spend, and the ledger that decides which
trials start and when running ones stop.

A sweep YAML may set ``sweep_budget: {gpu_hours: H}`` or ``{pflops: F}`` (also ``fomo-ray sweep --max-gpu-hours H``
or ``--max-pflops F``). ``budget.*`` stays what it is in the config: one trial's training budget (docs/BENCHMARK.md
§Budgets).

- **gpu_hours**: the wall time of every attempt of every trial (from its process start: building the model and the
  loaders, evaluation and checkpoints included) times the devices it holds: workers x ``ray.gpus_per_worker``; a
  CPU-only worker counts as one device, so a laptop rehearsal of a budget behaves like the cluster run. Time while the
  sweep is not running (interrupted, waiting for nodes) is never spent.
- **pflops**: the compute the budget's own count gives a trial (training GFLOPs plus evaluation forwards,
  ``cost_estimate``), spent in proportion to the evaluation points it reached.

A trial starts only while what is spent, plus what the running trials are still expected to spend, plus its own
estimate fits the budget; otherwise it ends at once, ``stopped`` with a reason that names the budget. Once the
spend reaches the budget, running trials stop at their next task boundary (the loop's ``should_stop``). The ledger
is kept in the sweep state, so a resumed sweep goes on from what was spent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

UNITS = {"gpu_hours": "GPU-hours", "pflops": "PFLOPs"}
REASON = "budget"  # how every budget decision begins (trials.csv's reason, the MLflow stop tag)


class SweepBudgetError(ValueError):
    """A ``sweep_budget:`` entry or budget flag is invalid; the message names it."""


@dataclass(frozen=True)
class SweepBudget:
    unit: str      # gpu_hours | pflops
    limit: float

    def describe(self, value: float | None = None) -> str:
        amount = f"{value:.4g} of " if value is not None else ""
        return f"{amount}{self.limit:g} {UNITS[self.unit]}"


def parse_sweep_budget(raw: Any, source: str = "sweep") -> SweepBudget | None:
    """``{gpu_hours: 40}`` or ``{pflops: 500}`` -> a budget (None when absent)."""
    if raw in (None, {}, ""):
        return None
    if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in UNITS:
        raise SweepBudgetError(f"{source}: sweep_budget must name one of {list(UNITS)} with a number, e.g. "
                               f"{{gpu_hours: 40}}, not {raw!r}")
    unit, limit = next(iter(raw.items()))
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise SweepBudgetError(f"{source}: sweep_budget.{unit} must be a number > 0, got {limit!r}")
    return SweepBudget(unit, float(limit))


def devices(world_size: int, gpus_per_worker: float) -> float:
    """The devices an attempt holds: its GPUs, or one per worker on CPU."""
    return world_size * gpus_per_worker if gpus_per_worker > 0 else float(world_size)


def trial_need(unit: str, seconds: float | None, total_gflops: float, workers: int, gpus_per_worker: float,
               label: str = "") -> float:
    """A trial's estimated spend in ``unit`` (from its cost estimate)."""
    if unit == "pflops":
        return total_gflops / 1e6
    if seconds is None:
        raise SweepBudgetError(f"trial {label or '?'}: a gpu_hours budget needs a time estimate, and this GPU trial "
                               "has none on this driver: declare the device (--device-tflops, --mfu) or use pflops")
    return seconds / 3600 * devices(workers, gpus_per_worker)


def needs_by_label(budget: SweepBudget, costs: Sequence[Any], gpus_per_worker: float) -> dict[str, float]:
    """label -> estimated spend of each trial (``cost_estimate.TrialCost``) in the budget's unit."""
    return {c.label: trial_need(budget.unit, c.seconds, c.total_gflops, c.workers, gpus_per_worker, c.label)
            for c in costs}


def attempt_spend(unit: str, need: float, seconds: float, world_size: int, gpus_per_worker: float, point: int,
                  last_point: int) -> float:
    """What one attempt of a trial has spent after ``seconds`` of wall time, at evaluation point ``point`` of
    ``last_point``."""
    if unit == "pflops":
        return need * (point / last_point if last_point > 0 else 1.0)
    return seconds / 3600 * devices(world_size, gpus_per_worker)


def fitting(limit: float, needs: Sequence[float]) -> int:
    """How many trials, taken in start order, fit ``limit`` one after the other."""
    total, n = 0.0, 0
    for need in needs:
        if total + need > limit:
            break
        total, n = total + need, n + 1
    return n


def plan_line(budget: SweepBudget, needs_in_order: Sequence[float], spent: float = 0.0) -> str:
    """What the sweep (and its dry run) says before launch: how many trials, in start order, the budget holds."""
    n = fitting(budget.limit - spent, needs_in_order)
    fits = f"{spent:.4g} spent before; {n} more" if spent else str(n)
    return (f"sweep budget {budget.describe()}: the estimate ({sum(needs_in_order):.4g} for all) fits {fits} of "
            f"{len(needs_in_order)} trial(s) in start order")


@dataclass
class Ledger:
    """What a sweep spent and committed. ``spent``: trial -> attempt -> units (an attempt reports its running total,
    so a repeated post never counts twice); ``admitted``: trial -> its estimate; ``ended``: trials that finished
    spending; ``refused``: trials the budget did not start."""
    budget: SweepBudget
    spent: dict[str, dict[str, float]] = field(default_factory=dict)
    admitted: dict[str, float] = field(default_factory=dict)
    ended: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def total(self) -> float:
        return sum(sum(attempts.values()) for attempts in self.spent.values())

    def _trial_spent(self, trial: str) -> float:
        return sum(self.spent.get(trial, {}).values())

    def committed(self) -> float:
        """Spent, plus what the admitted trials still running are expected to spend (at least their estimate)."""
        running = sum(max(0.0, need - self._trial_spent(t)) for t, need in self.admitted.items()
                      if t not in self.ended)
        return self.total() + running

    def admit(self, trial: str, need: float, force: bool = False) -> str:
        """"" when ``trial`` may start (a trial admitted before, restarted, always may; ``force``: a reference
        trial, which always runs and is counted), else why not."""
        if trial in self.admitted:
            return ""
        committed = self.committed()
        if not force and committed + need > self.budget.limit:
            if trial not in self.refused:
                self.refused.append(trial)
            return (f"{REASON}: not started, the sweep's budget of {self.budget.describe()} holds {committed:.4g} "
                    f"spent or committed and this trial needs about {need:.4g}")
        self.admitted[trial] = need
        return ""

    def post(self, trial: str, attempt: str, units: float, final: bool = False) -> str:
        """Record an attempt's running total; "" while the sweep is within its budget, else why running trials
        stop."""
        attempts = self.spent.setdefault(trial, {})
        attempts[attempt] = max(attempts.get(attempt, 0.0), float(units))
        if final and trial not in self.ended:
            self.ended.append(trial)
        total = self.total()
        if total >= self.budget.limit:
            return f"{REASON}: the sweep spent {self.budget.describe(total)}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.budget.unit, "limit": self.budget.limit, "spent": self.spent,
                "admitted": self.admitted, "ended": self.ended, "refused": self.refused}

    @classmethod
    def restored(cls, budget: SweepBudget, saved: Mapping[str, Any] | None) -> "Ledger":
        """A ledger under ``budget`` (the limit may have changed) that goes on from ``saved`` (a resumed sweep)."""
        saved = saved or {}
        return cls(budget, spent={t: dict(a) for t, a in saved.get("spent", {}).items()},
                   admitted=dict(saved.get("admitted", {})), ended=list(saved.get("ended", [])),
                   refused=list(saved.get("refused", [])))


def budget_metrics(saved: Mapping[str, Any]) -> dict[str, float]:
    """The sweep's parent-run metrics: its budget, what it spent (in the budget's unit), the trials it refused."""
    ledger = Ledger.restored(SweepBudget(saved["unit"], float(saved["limit"])), saved)
    return {"Budget/limit": ledger.budget.limit, "Budget/spent": float(f"{ledger.total():.6g}"),
            "Budget/not_started": float(len(ledger.refused))}


def summary_line(saved: Mapping[str, Any]) -> str:
    """What the sweep prints and records at its end: the spend against the budget, and what the budget cost."""
    ledger = Ledger.restored(SweepBudget(saved["unit"], float(saved["limit"])), saved)
    line = f"budget: spent {ledger.budget.describe(ledger.total())}"
    if ledger.refused:
        line += f"; {len(ledger.refused)} trial(s) not started for it"
    return line
