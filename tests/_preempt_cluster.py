"""The spot-preemption scenario of tests/test_preemption.py, in a process of its own (Ray's token authentication
must be set before ``ray`` is imported). A head with no CPU for trials and a one-CPU node 2 on this machine; a
one-trial sweep (``ray.max_failures=0``: a single charged failure would end it) runs on node 2. Once the trial's
task-0 checkpoint exists, node 2 is reclaimed as a spot instance is: the GCS drains it for a preemption with a
deadline (what the autoscaler does on a provider's notice), a one-CPU node 3 joins, and at the deadline every process
of node 2 is killed. The trial's worker is held (:class:`Hold`) so that the notice meets the run mid-task however fast
the machine trains. Writes what happened to ``OUT/summary.json``; stops every node it started, by PID.

    python tests/_preempt_cluster.py OUT FIFMINI_ROOT FIFMINI_SCALE
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from _cluster_util import REPO, cluster_helpers, scenario_main

sys.path.insert(0, str(REPO))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
DRAIN_S = 20  # the notice (a spot reclaim gives 30 s on GCP, 2 min on AWS)
HOLD_S = 240.0  # the longest the held worker waits for an event that never comes (the test then fails)


class Hold:
    """In the trial's worker (shipped by value as a fault: ``_edges_util.trial_in_worker``), on its first life only:
    after step 0 of task 1 it waits until Ray drains its node; at the next check it answers ``checkpoint_now`` once
    the run's own drain watch has noticed (so the notice's checkpoint is taken there, mid-task); from the step after
    that checkpoint it waits to die with its node. ``OUT/held`` marks the first life, so the resumed run trains
    through. Events, not step counts or timings, order the scenario."""

    def __init__(self, out: str):
        self.out, self.draining, self.checkpointed = out, False, False

    def _first_life(self) -> bool:
        return not os.path.exists(os.path.join(self.out, "held"))

    def after_step(self, task: int, step: int) -> None:
        if not self._first_life():
            return
        if self.checkpointed:
            Path(self.out, "held").write_text(f"held after task {task} step {step}\n")
            _wait(lambda: False)  # ended by the reclaim, which kills this process
        elif (task, step) == (1, 0):
            import ray

            from fomo_ray.engine.preemptions import draining_deadline

            node = ray.get_runtime_context().get_node_id()
            self.draining = _wait(lambda: draining_deadline(node) is not None)

    def checkpoint_now(self, host) -> bool:
        if not (self.draining and self._first_life()) or self.checkpointed:
            return host()
        self.checkpointed = _wait(host)
        return self.checkpointed


def _wait(ready) -> bool:
    deadline = time.time() + HOLD_S
    while time.time() < deadline:
        if ready():
            return True
        time.sleep(0.2)
    return False


def _drain(node_id: str, deadline_s: float) -> bool:
    """Ask the GCS to drain ``node_id`` for a preemption (what a cloud provider's notice makes Ray's autoscaler
    do), with a deadline ``deadline_s`` from now."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._private.worker.global_worker.gcs_client
    accepted, _ = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                 "spot instance reclaimed", int(time.time() * 1000 + deadline_s * 1000))
    return bool(accepted)


def _reclaim_when_checkpointed(storage: Path, node_id: str, sid: int, helpers, start_node3, done: threading.Event,
                               log: dict) -> None:
    """Once the trial's first (task-0) checkpoint is persisted: drain node 2 (preemption, DRAIN_S seconds of
    notice), bring node 3 up, and at the deadline kill every process of node 2 (the instance is gone)."""
    while not done.is_set():
        if list(storage.glob("sweeps/*/tune/*/checkpoint_000000")):
            log["drain_accepted"] = _drain(node_id, DRAIN_S)
            log["drained_at"] = time.time()
            log["node3"] = start_node3()
            done.wait(DRAIN_S)
            log["killed_pids"], log["killed_at"] = helpers.kill_session(sid), time.time()
            return
        time.sleep(0.2)


def main(out: Path, data_root: str, scale: float) -> dict:
    helpers = cluster_helpers()
    import ray

    from fomo_ray.planning.sweep_spec import spec_from_dict
    from fomo_ray.tracking.writer import Tracker, default_uri
    from fomo_ray.engine import tune_sweep

    from _data_util import budget_cache
    from _edges_util import register_by_value, trial_in_worker

    summary: dict = {}
    done, log = threading.Event(), {}
    with helpers.local_cluster(out, head_cpus=0, prefix="frp_") as cluster:
        def start_worker(name: str) -> int:
            cluster.nodes.append(helpers.start_node(["--address", f"127.0.0.1:{cluster.port}", "--num-cpus", "1",
                                                     "--num-gpus", "0", "--temp-dir", cluster.temp_dir],
                                                    out / f"{name}.log"))
            return cluster.nodes[-1].pid

        try:
            start_worker("node2")
            ray.init(address=f"127.0.0.1:{cluster.port}", log_to_driver=False)
            helpers.wait_for_nodes(2, 90)
            summary["node2"] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")][0]
            storage = out / "storage"
            threading.Thread(target=_reclaim_when_checkpointed, daemon=True,
                             args=(storage, summary["node2"], cluster.nodes[1].pid, helpers,
                                   lambda: start_worker("node3"), done, log)).start()
            spec = spec_from_dict({"name": "spot", "base": {
                "output_dir": str(out / "runs"), "data.root": data_root, "data.scale": scale,
                "backbone.pretrained": "", "stream.num_tasks": 3, "budget.mode": "equal_steps",
                "budget.total_ft_steps": 30, "mixture.batch_size": 16, "evaluation.subset_min": 20,
                "evaluation.full_at_ends": False, "data.num_workers": 1, "budget.cache_dir": budget_cache(data_root),
                "ray.storage_path": str(storage), "ray.max_failures": 0, "ray.checkpoint_every_steps": 0,
                "tracking.log_every_n_steps": 2, "tracking.experiment": "spot"}, "space": {"seed": {"grid": [0]}}})
            register_by_value()
            tune_sweep.run_trial = trial_in_worker(fault=Hold(str(out)))
            res = tune_sweep.run_sweep(spec, progress=True)
        finally:
            done.set()  # the reclaim thread stops waiting
        summary["trials"] = res.trials.to_dict("records")
        (child,) = Tracker(default_uri(out / "runs"), "spot").children(res.parent_run_id)
        summary["tags"], summary["status"] = dict(child.data.tags), child.info.status
        reports = [json.loads(line) for f in storage.glob("sweeps/*/tune/*/result.json")
                   for line in f.read_text().splitlines() if line.strip()]
        summary["checkpoints"] = [(r["task"], r["step"]) for r in reports if r.get("kind") == "checkpoint"]
        summary["reclaim"] = log
        summary["held"] = (out / "held").read_text().strip() if (out / "held").exists() else ""
    summary["needed_sigkill"] = cluster.needed_sigkill
    return summary


if __name__ == "__main__":
    scenario_main(main)
