"""Data-parallel Ray Train runs on a real Ray cluster of up to two nodes on this machine (run as a script by
``tests/test_cluster.py``, because Ray's authentication must be set up before ``ray`` is imported).

    python tests/_two_node_train.py OUT_DIR DATA_ROOT DATA_SCALE

1. Starts a Ray head with ``ray start`` (1 CPU, fast node health checks; the helpers of ``bench/two_node_cluster.py``)
   and connects this driver to it.
2. ``elastic``: a DDP run with ``ray.min_workers=1, ray.num_workers=2`` (gloo, ``ray.cpus_per_worker`` 0.95: one
   worker fits per node) starts on the head alone, at one worker. Once Ray Train has registered a mid-task checkpoint
   of task 0, a second node joins: Ray Train's elastic policy grows the group to two workers, restarted from that
   checkpoint. Once it has registered a mid-task checkpoint of task 1 written by the two workers, every process of
   the added node is SIGKILLed (a lost machine): Ray Train restarts the group with the one worker that still fits and
   the run finishes. Rank 0 is held at the step after each of those checkpoints until the group is restarted
   (:class:`Hold`), so the cluster changes always meet the run at the same place, however fast the machine trains.
3. ``ddp``: a new second node joins; the same run with a fixed two workers, one per node, undisturbed.
4. ``single``: the same config in this process, one worker (``loop.run_stream``), the reference.
5. Stops exactly the node processes it started, and writes ``OUT_DIR/summary.json`` plus each run's final weights
   (``OUT_DIR/<run>.pt``) for the test to judge.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from _cluster_util import cluster_helpers, scenario_main

# Ray Train registers a reported checkpoint only when its controller next polls the workers (every 2 s); a group
# restarted before that continues from the checkpoint before. So each cluster change waits until the controller's own
# snapshot names a mid-task checkpoint of the task as the latest: a registered one, waited for as an event.
SNAPSHOT = "checkpoint_manager_snapshot.json"
HOLD_S = 240.0  # how long rank 0 waits for a restart that never comes (the test then fails on the world sizes)


class Hold:
    """Rank 0 of a group of ``world`` ranks stops after step ``step`` of task ``task`` (the step after a mid-task
    checkpoint) and waits there until Ray Train restarts the group; ``OUT/reached_<name>`` tells the driver it is
    there. Shipped to the workers by value (``_edges_util.train_worker_in_worker`` runs it as a fault hook)."""

    def __init__(self, out: str, holds: dict[str, tuple[int, int, int]]):
        self.out, self.holds = out, holds

    def after_step(self, task: int, step: int) -> None:
        import os
        import time

        import ray.train

        ctx = ray.train.get_context()
        if ctx.get_world_rank() != 0:
            return
        for name, at in self.holds.items():
            reached = os.path.join(self.out, f"reached_{name}")
            if (task, step, ctx.get_world_size()) == at and not os.path.exists(reached):
                open(reached, "w").write(f"task {task} step {step} world {at[2]}\n")
                deadline = time.time() + HOLD_S
                while time.time() < deadline:  # ended by the restart, which kills this process
                    time.sleep(0.2)


def _config(out: Path, data_root: str, scale: float, **overrides):
    from fomo_ray.config import load_config

    return load_config(None, {
        "data.root": data_root, "data.scale": scale, "data.prepare_if_missing": False, "backbone.pretrained": "",
        "output_dir": str(out), "method.name": "finetune", "stream.num_tasks": 2, "budget.mode": "equal_steps",
        "budget.total_ft_steps": 12, "mixture.batch_size": 16, "evaluation.subset_min": 20,
        "evaluation.full_at_ends": False, "data.num_workers": 1, "budget.cache_dir": str(out / "budget"),
        "ray.checkpoint_every_steps": 2, "ray.max_failures": 2, "ray.num_workers": 2, "ray.cpus_per_worker": 0.95,
        "tracking.experiment": "two_node", **overrides})


def _train(cfg, name: str, out: Path, tracker, on_started=None) -> dict:
    """One TorchTrainer run (a sweep trial's body: ``ray_train.fit_train_run``), tracked in its own MLflow run."""
    import torch

    from fomo_ray.engine import ray_train
    from fomo_ray.core.checkpoint import load_state
    from fomo_ray.models.metrics import tidy_frame
    from fomo_ray.tracking.writer import summary_key

    run_id = tracker.start_child(None, name, cfg.flat())
    payload = ray_train.RunPayload(cfg=cfg, run_name=name, tracking_uri=tracker.uri, mlflow_run_id=run_id,
                                   storage_uri=str(out / "train" / name))
    t0 = time.time()
    if on_started is not None:
        on_started(out / "train" / name)
    outcome = ray_train.fit_train_run(payload, name=name, storage_path=str(out / "train"))
    state = load_state(outcome.checkpoint)
    torch.save(state.model, out / f"{name}.pt")
    run = tracker.client.get_run(run_id)
    return {"wall_s": round(time.time() - t0, 1), "mlflow_run_id": run_id, "status": run.info.status,
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("fomo_ray.")},
            "gm_steps": [s for s, _ in tracker.metric_history(run_id, summary_key("GM"))],
            "results": tidy_frame(state.results).to_dict("records")}


def _single(cfg, out: Path) -> dict:
    import torch

    from fomo_ray.core import loop

    states = []
    torch.set_num_threads(1)  # as in the workers (cpus_per_worker < 2)
    t0 = time.time()
    df = loop.run_stream(cfg.replace({"ray.num_workers": 1}), hooks=loop.RunHooks(on_checkpoint=states.append),
                         device="cpu")
    torch.save(states[-1].model, out / "single.pt")
    return {"wall_s": round(time.time() - t0, 1), "results": df.to_dict("records")}


def _registered(directory: Path) -> str:
    try:
        snapshot = json.loads((directory / SNAPSHOT).read_text())
        return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name", "")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return ""


def _mid_task(name: str, task: int) -> bool:
    """Whether checkpoint ``name`` is a mid-task one of ``task`` (``cursor_t001_s0000000`` is task 0's end state: the
    one of task 1 the held rank reported last may still be on its way, and the group would restart from it)."""
    return name.startswith(f"cursor_t{task:03d}_s") and not name.endswith("_s0000000")


def _wait(done: threading.Event, ready) -> bool:
    while not done.is_set():
        if ready():
            return True
        time.sleep(0.2)
    return False


def _change_cluster(directory: Path, out: Path, add_node, helpers, done: threading.Event, log: dict) -> None:
    """Grow, then shrink, the cluster under the elastic run (see the module docstring); ``log`` says when and at which
    registered checkpoint."""
    if not _wait(done, lambda: (out / "reached_grow").exists() and _mid_task(_registered(directory), 0)):
        return
    node = add_node("worker_added")
    log.update(grow_registered=_registered(directory), grown_at=time.time())
    if not _wait(done, lambda: (out / "reached_shrink").exists() and _mid_task(_registered(directory), 1)):
        return
    log.update(killed_pids=helpers.kill_session(node.pid), killed_at=time.time(), registered=_registered(directory),
               seen=sorted(p.name for p in directory.rglob("cursor_*")))


def main(out: Path, data_root: str, scale: float) -> dict:
    helpers = cluster_helpers()
    import ray

    from fomo_ray.engine import ray_train
    from fomo_ray.tracking.writer import Tracker, default_uri

    from _edges_util import register_by_value, train_worker_in_worker

    summary: dict = {}
    with helpers.local_cluster(out, 1, prefix="fr2t_") as cluster:
        def add_node(log_name: str):
            cluster.nodes.append(helpers.start_node(["--address", f"127.0.0.1:{cluster.port}", "--num-cpus", "1",
                                                     "--num-gpus", "0", "--temp-dir", cluster.temp_dir],
                                                    out / f"{log_name}.log"))
            return cluster.nodes[-1]

        ray.init(address=f"127.0.0.1:{cluster.port}", log_to_driver=False)
        summary["head_node"] = ray.get_runtime_context().get_node_id()
        tracker = Tracker(default_uri(out), "two_node")

        done, log = threading.Event(), {}

        def watch(directory: Path) -> None:
            threading.Thread(target=_change_cluster, args=(directory, out, add_node, helpers, done, log),
                             daemon=True).start()

        register_by_value()
        real = ray_train.train_worker
        ray_train.train_worker = train_worker_in_worker(fault=Hold(str(out), {"grow": (0, 2, 1), "shrink": (1, 2, 2)}))
        t0 = time.time()
        try:
            summary["elastic"] = _train(_config(out, data_root, scale, **{"ray.min_workers": 1,
                                                                         "ray.resize_check_s": 1.0}),
                                        "elastic", out, tracker, on_started=watch)
        finally:
            done.set()
            ray_train.train_worker = real
        summary["changes"] = {k: round(v - t0, 1) if k.endswith("_at") else v for k, v in log.items()}
        summary["alive_after_elastic"] = sorted(nd["NodeID"] for nd in ray.nodes() if nd["Alive"])

        add_node("worker_ddp")
        summary["cluster_nodes"] = sorted(nd["NodeID"] for nd in helpers.wait_for_nodes(2, 90))
        summary["ddp"] = _train(_config(out, data_root, scale), "ddp", out, tracker)
        ray.shutdown()
        summary["single"] = _single(_config(out, data_root, scale), out)
    summary["needed_sigkill"] = cluster.needed_sigkill
    summary["left_in_sessions"] = [pid for n in cluster.nodes for pid in helpers.session_pids(n.pid)]
    return summary


if __name__ == "__main__":
    # its own cluster token, and node health checks fast enough that a lost node is noticed in seconds
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                       "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                       "RAY_health_check_failure_threshold": "3", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       # a restart that first waits for the lost node's worker gives up after 20 s, not 60
                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
                       "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    scenario_main(main)
