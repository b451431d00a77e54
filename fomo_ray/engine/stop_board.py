"""The sweep's boards: small Ray actors the driver starts by name before the trials, and a trial reaches by that name.

- The early-stopping board: every trial posts its trajectory means and asks whether to stop (the rules are
  ``fomo_ray/planning/stopping.py``; ``ask``). Each (trial, point) is decided once and the answer kept, so a relaunched
  worker or another data-parallel rank gets the same answer.
- The budget board: the sweep budget's ledger (``fomo_ray/planning/sweep_budget.py``). A trial asks whether it may start
  (``admit``) and posts what it spent at every evaluation point (``post_spend``), which answers whether the sweep is
  over its budget; the driver keeps the ledger in the sweep state when the trials end (``snapshot``).

A board that cannot be reached (its driver gone) never costs a trial its run: it goes on, and says so.
"""
from __future__ import annotations

import socket
import sys
import time
from typing import Any, Mapping

import psutil
import ray

from fomo_ray.planning.stopping import StoppingRule, decide
from fomo_ray.planning.sweep_budget import Ledger, SweepBudget

BUDGET_BOARD = "fomo_ray_budget_board"


class StopBoard:
    def __init__(self, rule: Mapping[str, Any], history: Mapping[str, Mapping[int, float]]):
        self.rule = StoppingRule(**rule)
        self.board: dict[str, dict[int, float]] = {t: {int(p): float(v) for p, v in pts.items()}
                                                   for t, pts in history.items()}
        self.decisions: dict[tuple[str, int], str] = {}

    def post(self, trial: str, point: int, value: float) -> str:
        """Record ``trial``'s trajectory mean at ``point`` and return why it stops ("" = go on)."""
        key = (trial, int(point))
        if key not in self.decisions:
            self.decisions[key] = decide(self.rule, trial, int(point), float(value), self.board)
            self.board.setdefault(trial, {})[int(point)] = float(value)
        return self.decisions[key]

    def snapshot(self) -> dict[str, Any]:
        return {"board": self.board, "decisions": {f"{t}@{p}": r for (t, p), r in self.decisions.items() if r}}


def start_board(name: str, rule: StoppingRule, history: Mapping[str, Mapping[int, float]]) -> Any:
    """Start the board actor ``name`` (no CPU reserved: it only keeps a few numbers) for this driver's job."""
    actor = ray.remote(num_cpus=0)(StopBoard)
    return actor.options(name=name, max_restarts=-1).remote(rule.to_dict(), history)


def _board(name: str, trial: str, what: str) -> Any:
    try:
        return ray.get_actor(name)
    except ValueError as e:
        print(f"trial {trial}: the sweep's {what} board is unreachable ({e}); going on without it",
              file=sys.stderr, flush=True)
        return None


def ask(name: str, trial: str, point: int, value: float) -> str:
    """Post to the stopping board ``name`` from a trial; the reason it stops, or ""."""
    board = _board(name, trial, "stopping")
    return "" if board is None else ray.get(board.post.remote(trial, point, value))


# --------------------------------------------------------------------------------------------------- the budget
class BudgetBoard:
    def __init__(self, unit: str, limit: float, saved: Mapping[str, Any] | None):
        self.ledger = Ledger.restored(SweepBudget(unit, limit), saved)

    def admit(self, trial: str, need: float, force: bool) -> str:
        return self.ledger.admit(trial, need, force)

    def post(self, trial: str, attempt: str, units: float, final: bool) -> str:
        return self.ledger.post(trial, attempt, units, final)

    def snapshot(self) -> dict[str, Any]:
        return self.ledger.to_dict()


def start_budget_board(budget: SweepBudget, saved: Mapping[str, Any] | None) -> Any:
    actor = ray.remote(num_cpus=0)(BudgetBoard)
    return actor.options(name=BUDGET_BOARD, max_restarts=-1).remote(budget.unit, budget.limit, saved)


def admit(trial: str, need: float, force: bool = False) -> str:
    """Whether ``trial`` may start under the sweep budget: "" or why not."""
    board = _board(BUDGET_BOARD, trial, "budget")
    return "" if board is None else ray.get(board.admit.remote(trial, need, force))


def post_spend(trial: str, attempt: str, units: float, final: bool = False) -> str:
    """Post an attempt's spend so far; why the sweep is over its budget, or ""."""
    board = _board(BUDGET_BOARD, trial, "budget")
    return "" if board is None else ray.get(board.post.remote(trial, attempt, units, final))


_TRIALS_BEGUN: list[float] = []  # when each Tune trial this process ran began (a process Tune reuses runs several)


def trial_began() -> None:
    """Mark that a Tune trial begins in this process (``tune_sweep.run_trial``, first thing)."""
    _TRIALS_BEGUN.append(time.time())


def attempt() -> tuple[str, float]:
    """This attempt's id and start time: its wall time counts from its process start (imports, building the model
    and loaders included), not from the loop; in a process that ran a trial before (``ray.reuse_trial_processes``),
    from when this trial began, since the imports were the earlier trial's."""
    proc = psutil.Process()
    start = _TRIALS_BEGUN[-1] if len(_TRIALS_BEGUN) > 1 else proc.create_time()
    return f"{socket.gethostname()}:{proc.pid}@{start:.3f}", start
