"""Cooperative early stopping (issue 15): the pure rules of fomo_ray/planning/stopping.py, the sweep YAML's
``stopping:`` entry and the board actor's once-per-point decisions. The rule stopping real trials through the loop is in
test_sweep.py."""
from __future__ import annotations

import pandas as pd
import pytest

from fomo_ray.engine.stop_board import StopBoard
from fomo_ray.planning.stopping import StoppingRule, decide, history_from_results, parse_stopping, trajectory_mean
from fomo_ray.planning.sweep_spec import SweepError, spec_from_dict

BEST = StoppingRule("trails_best", min_tasks=2, margin=5.0)


def test_trails_best_stops_only_beyond_the_margin_and_from_min_tasks():
    board = {"a": {1: 0.50, 2: 0.60}, "b": {2: 0.40}}
    assert decide(BEST, "c", 2, 0.56, board) == ""                        # 4 points behind: within the margin
    reason = decide(BEST, "c", 2, 0.549, board)                          # 5.1 points behind
    assert reason == ("stopped at point 2: trajectory-mean GM 54.9 trails the best trial (a, 60.0) by more than 5")
    assert decide(BEST, "c", 1, 0.10, board) == ""                        # before min_tasks: never
    assert decide(BEST, "c", 3, 0.10, board) == ""                        # nobody else reached point 3 yet
    assert decide(BEST, "a", 2, 0.10, {"a": {2: 0.9}}) == ""              # its own earlier post is not a rival


def test_median_rule_compares_with_the_other_trials_median():
    rule = StoppingRule("median", min_tasks=1, min_trials=3)
    board = {"a": {1: 0.3}, "b": {1: 0.5}, "c": {1: 0.9}}
    assert decide(rule, "d", 1, 0.49, board).endswith("below the median of 3 other trial(s) (50.0)")
    assert decide(rule, "d", 1, 0.50, board) == ""
    assert decide(rule, "d", 1, 0.0, {"a": {1: 0.3}}) == ""  # 2 trials at the point, 3 required


def test_trajectory_mean_and_history_from_a_results_table():
    assert trajectory_mean([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    results = pd.DataFrame({"run": ["x", "x", "x", "y"], "point": [0, 2, 1, 0], "GM": [0.2, 0.9, 0.4, 0.7]})
    assert history_from_results(results, "GM") == {"x": {0: 0.2, 1: pytest.approx(0.3), 2: pytest.approx(0.5)},
                                                  "y": {0: 0.7}}
    assert history_from_results(pd.DataFrame(), "GM") == {}


@pytest.mark.parametrize("raw, match", [
    ({"rule": "asha"}, r"stopping.rule must be one of \['trails_best', 'median'\], got 'asha'"),
    ({"rule": "median", "patience": 2}, r"unknown key\(s\) \['patience'\]"),
    ({"rule": "median", "metric": "top1"}, "stopping.metric must be one of"),
    ({"rule": "median", "min_tasks": 0}, "stopping.min_tasks must be an integer >= 1"),
    ({"rule": "median", "min_trials": 1}, "stopping.min_trials must be an integer >= 2"),
    ({"rule": "trails_best", "margin": -1}, "stopping.margin must be a number >= 0"),
    ("median", "'stopping' must be a mapping"),
])
def test_bad_stopping_entries_name_the_key(raw, match):
    with pytest.raises(SweepError, match=match):
        spec_from_dict({"name": "s", "space": {}, "stopping": raw}, "s.yaml")


def test_a_sweep_spec_carries_its_rule_and_order():
    spec = spec_from_dict({"name": "s", "stopping": {"rule": "median", "min_tasks": 2}, "order": "fifo"})
    assert spec.stopping == StoppingRule("median", min_tasks=2) and spec.order == "fifo"
    assert spec_from_dict({"name": "s"}).stopping is None and spec_from_dict({"name": "s"}).order == "cost"
    assert parse_stopping(None) is None
    with pytest.raises(SweepError, match="order 'random' is not one of"):
        spec_from_dict({"name": "s", "order": "random"}, "s.yaml")


def test_the_board_decides_each_trial_and_point_once():
    board = StopBoard(BEST.to_dict(), {"a": {2: 0.9}})  # a resumed sweep's earlier trial
    first = board.post("b", 2, 0.5)
    assert first.startswith("stopped at point 2") and first.endswith("(a, 90.0) by more than 5")
    assert board.post("b", 2, 0.95) == first   # a relaunched worker or another rank asks again: the same answer
    assert board.post("c", 2, 0.92) == ""      # b's 0.5 counts, the best is still a's 0.9
    assert board.snapshot()["decisions"] == {"b@2": first}
