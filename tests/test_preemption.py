"""Spot preemption is not a failure (issue 28): a node drained for a preemption gives its trial a notice, on which
the loop checkpoints at once; the trial resumes on another node from that checkpoint and finishes, its preemption
counted (trials.csv ``preempted``, MLflow ``fomo_ray.preempted``) and never charged to ``ray.max_failures``.
The cluster scenario runs in ``tests/_preempt_cluster.py`` (a subprocess: Ray's authentication is set before
``ray`` is imported); this file judges what it wrote."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from fomo_ray.engine import preemptions

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- pieces
def test_counts_live_under_the_sweep_storage(tmp_path):
    storage = str(tmp_path)
    assert preemptions.count(storage, "t1") == 0
    assert preemptions.add(storage, "t1", "node lost") == 1 and preemptions.add(storage, "t1", "again") == 2
    assert preemptions.count("s3://bucket/x", "t1") == 0 and preemptions.add("s3://bucket/x", "t1", "x") == 0
    trials = pd.DataFrame({"run": ["a", "b"], "trial_id": ["t1", "t2"]})
    assert preemptions.with_counts(trials, storage)["preempted"].tolist() == [2, 0]


def test_the_drain_watch_notices_its_node_off_the_training_thread():
    asked = threading.Event()
    answers = iter([None, None, 1_700_000_000_000])

    def deadline_of(node_id):
        assert node_id == "node-2"
        value = next(answers)
        if value is not None:
            asked.set()
        return value

    watch = preemptions.DrainWatch("node-2", poll_s=0.01, deadline_of=deadline_of)
    assert asked.wait(10)
    watch._thread.join(10)  # it stops polling once noticed
    assert watch.notice() and watch.deadline_ms == 1_700_000_000_000
    watch.close()


# --------------------------------------------------------------------------------------------------- a cluster
@pytest.fixture(scope="module")
def spot(tmp_path_factory):
    from _data_util import SCALE, small_fifmini

    out = tmp_path_factory.mktemp("spot")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_preempt_cluster.py"), str(out),
                           str(small_fifmini(tmp_path_factory).root), str(SCALE)], capture_output=True, text=True,
                          timeout=840)
    if proc.returncode:
        pytest.fail(f"preemption scenario failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text()), proc.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_preempted_trial_resumes_elsewhere_and_finishes_without_a_failure(spot):
    summary, printed = spot
    assert summary["reclaim"]["drain_accepted"] and summary["reclaim"]["killed_pids"] > 0
    (trial,) = summary["trials"]
    # ray.max_failures = 0: one charged failure would have failed it
    assert trial["status"] == "finished" and trial["preempted"] == 1
    tags = summary["tags"]
    assert summary["status"] == "FINISHED" and tags["fomo_ray.preempted"] == "1"
    # the notice's checkpoint: mid-task (no scheduled mid-task checkpoints), the one the resumed run started from
    mid = [(t, s) for t, s in summary["checkpoints"] if s > 0]
    assert len(mid) == 1 and tags["fomo_ray.resumed_from"] == "cursor_t{:03d}_s{:07d}".format(*mid[0])
    assert summary["held"] == "held after task {} step {}".format(*mid[0])  # the first life waited there to die
    assert "its node was preempted: restarting from its latest checkpoint (not a failure" in printed
    assert summary["needed_sigkill"] == []
