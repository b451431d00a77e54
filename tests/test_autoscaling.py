"""Autoscaling on one machine (issue 28): a real sweep on a local autoscaling cluster shaped like the cluster files (a
head with CPU 0, worker types that scale from zero), Ray's v2 autoscaler with Ray's fake multi-node provider. Trials
waiting for CPUs make it add nodes, the sweep finishes on them, and the idle nodes are removed after the idle timeout.
The cluster, the sweep and the timeline live in ``bench/autoscaling.py`` (a subprocess: Ray's authentication must be
set before ``ray`` is imported; it polls the cluster with a deadline); this file judges the summary it wrote.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _data_util import SCALE, budget_cache, small_fifmini

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
TRIALS = 3  # one more than the cluster's max_workers (2 one-CPU nodes): the third trial waits for a node to free up
IDLE_TIMEOUT_S = 15
SAMPLE_S = 1  # the timeline's sampling interval: an idle stretch seen from the samples may look this much shorter


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    bench = small_fifmini(tmp_path_factory)
    out = tmp_path_factory.mktemp("autoscaling")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "autoscaling.py"), "--data-root", str(bench.root),
                           "--data-scale", str(SCALE), "--trials", str(TRIALS), "--idle-timeout-s",
                           str(IDLE_TIMEOUT_S), "--keep", str(out / "run"), "--json", str(out / "summary.json"),
                           "--budget-cache", budget_cache(bench.root)],
                          capture_output=True, text=True, timeout=840)
    if proc.returncode:
        pytest.fail(f"autoscaling scenario failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text())


def test_waiting_trials_make_the_autoscaler_add_nodes(summary):
    # the head has no CPU for trials: they waited before any worker node existed, and nodes came while they waited
    assert summary["first_trial_waiting_s"] is not None
    assert summary["first_trial_waiting_s"] < summary["first_node_s"]
    assert summary["nodes_added_while_trials_waited"] >= 1
    assert 1 <= summary["peak_workers"] <= 2  # the cluster's max_workers


def test_every_trial_finished_on_a_node_the_autoscaler_added(summary):
    assert summary["trial_status"] == {run: "finished" for run in summary["trial_status"]}
    assert len(summary["trial_status"]) == TRIALS
    launched = set(summary["nodes_launched"])  # the fake instance ids' last 5 digits (the head is 00000)
    used = {node[-5:] for nodes in summary["trial_nodes"].values() for node in nodes}
    assert used and used <= launched


def test_idle_nodes_are_removed_after_the_idle_timeout(summary):
    assert summary["back_to_min"] and summary["back_to_min_s"] >= summary["sweep_end_s"]
    last = summary["timeline"][-1]
    assert not last["nodes"] and not last["requested"] and not last["starting"]  # the minimum: no worker node
    removed = summary["idle_to_removed_s"]
    assert set(removed) == set(summary["nodes_launched"])  # every node was seen idle, then removed
    assert all(s >= IDLE_TIMEOUT_S - 2 * SAMPLE_S for s in removed.values()), removed  # not before the timeout


def test_nothing_is_left_running(summary):
    assert summary["needed_sigkill"] == [] and summary["leftover"] == []
