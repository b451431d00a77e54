"""The sweep's budget board: one small Ray actor holding the sweep's compute ledger (``fomo_ray/sweep_budget.py``).
A trial asks it whether it may start (``admit``) and posts what it spent at every evaluation point (``post``), which
answers whether the sweep is over its budget. The driver starts it by name before the trials and keeps its ledger in
the sweep state when the trials end (``snapshot``).
"""
from __future__ import annotations

import socket
import sys
from typing import Any, Mapping

import psutil
import ray

from fomo_ray.sweep_budget import Ledger, SweepBudget

BOARD = "fomo_ray_budget_board"


class BudgetBoard:
    def __init__(self, unit: str, limit: float, saved: Mapping[str, Any] | None):
        self.ledger = Ledger.restored(SweepBudget(unit, limit), saved)

    def admit(self, trial: str, need: float, force: bool) -> str:
        return self.ledger.admit(trial, need, force)

    def post(self, trial: str, attempt: str, units: float, final: bool) -> str:
        return self.ledger.post(trial, attempt, units, final)

    def snapshot(self) -> dict[str, Any]:
        return self.ledger.to_dict()


def start_board(budget: SweepBudget, saved: Mapping[str, Any] | None) -> Any:
    """Start the board actor (no CPU reserved: it only keeps a few numbers) for this driver's job."""
    actor = ray.remote(num_cpus=0)(BudgetBoard)
    return actor.options(name=BOARD, max_restarts=-1).remote(budget.unit, budget.limit, saved)


def _call(trial: str, method: str, *args: Any) -> str:
    """A board that cannot be reached (its driver gone) never costs a trial its run: it goes on, and says so."""
    try:
        board = ray.get_actor(BOARD)
    except ValueError as e:
        print(f"trial {trial}: the sweep's budget board is unreachable ({e}); going on without the budget",
              file=sys.stderr, flush=True)
        return ""
    return ray.get(getattr(board, method).remote(trial, *args))


def admit(trial: str, need: float, force: bool = False) -> str:
    return _call(trial, "admit", need, force)


def post(trial: str, attempt: str, units: float, final: bool = False) -> str:
    return _call(trial, "post", attempt, units, final)


def attempt() -> tuple[str, float]:
    """This process's id and start time: an attempt's wall time counts from its process start (building the model
    and loaders included), not from the loop."""
    proc = psutil.Process()
    return f"{socket.gethostname()}:{proc.pid}@{proc.create_time():.3f}", proc.create_time()
