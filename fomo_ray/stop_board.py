"""The sweep's early-stopping board: one small Ray actor that every trial of a sweep posts its trajectory means to
and asks whether to stop (the rules are ``fomo_ray/stopping.py``). The driver starts it by name before the trials;
a trial reaches it by that name (``ask``). Each (trial, point) is decided once and the answer kept, so a relaunched
worker or another data-parallel rank gets the same answer.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import ray

from fomo_ray.stopping import StoppingRule, decide


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


def ask(name: str, trial: str, point: int, value: float) -> str:
    """Post to the board ``name`` from a trial; the reason it stops, or "". A board that cannot be reached (its
    driver gone) never costs the trial its run: it goes on, and says so."""
    try:
        board = ray.get_actor(name)
    except ValueError as e:
        print(f"trial {trial}: the sweep's stopping board is unreachable ({e}); going on without early stopping",
              file=sys.stderr, flush=True)
        return ""
    return ray.get(board.post.remote(trial, point, value))
