"""Data-parallel Ray Train runs on a real two-node Ray cluster on this machine (run as a script by
``tests/test_cluster.py``, because Ray's authentication must be set up before ``ray`` is imported).

    python tests/_two_node_train.py OUT_DIR DATA_ROOT DATA_SCALE

1. Starts two Ray nodes with ``ray start`` (the head and one worker node, 1 CPU each, fast node health checks) using
   the helpers of ``bench/two_node_cluster.py``, and connects this driver to them.
2. ``ddp``: a 2-worker DDP TorchTrainer run (gloo, ``ray.cpus_per_worker`` 0.95, so one worker fits per node).
3. ``elastic``: the same run with ``ray.min_workers=1``. Once Ray Train has registered a mid-task checkpoint of task 0,
   every process of the worker node is SIGKILLed (a lost machine). Ray Train must restart the group with the one worker that still
   fits, from the latest checkpoint, and finish.
4. ``single``: the same config in this process, one worker (``loop.run_stream``), the reference.
5. Stops exactly the node processes it started, and writes ``OUT_DIR/summary.json`` plus each run's final weights
   (``OUT_DIR/<run>.pt``) for the test to judge.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

from _cluster_util import cluster_helpers

# Ray Train registers a reported checkpoint only when its controller next polls the workers (every 2 s); a node lost
# before that takes the report with it and the run restarts from the checkpoint before. So the node is killed once the
# controller's own snapshot names a mid-task checkpoint of task 0 as the latest: a registered one, waited for as an
# event, not a delay.
SNAPSHOT, MID_TASK = "checkpoint_manager_snapshot.json", "cursor_t000_s"


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

    from fomo_ray import ray_train
    from fomo_ray.checkpoint import load_state
    from fomo_ray.metrics import tidy_frame
    from fomo_ray.tracking import summary_key

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

    from fomo_ray import loop

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


def _kill_session_when(directory: Path, sid: int, helpers, done: threading.Event, log: dict) -> None:
    """SIGKILL every process of session ``sid`` (one Ray node) once Ray Train has registered a mid-task checkpoint
    of task 0 under ``directory``: the node is lost in the middle of task 0."""
    while not done.is_set():
        latest = _registered(directory)
        if latest.startswith(MID_TASK):
            log.update(killed_pids=helpers.kill_session(sid), killed_at=time.time(), registered=latest,
                       seen=sorted(p.name for p in directory.rglob("cursor_*")))
            return
        time.sleep(0.2)


def main(out: Path, data_root: str, scale: float) -> dict:
    helpers = cluster_helpers()
    import ray

    from fomo_ray.tracking import Tracker, default_uri

    summary: dict = {}
    port = helpers.free_port()
    temp_dir = tempfile.mkdtemp(prefix="fr2t_", dir="/tmp")
    nodes = [helpers.start_node(["--head", "--port", str(port), "--num-cpus", "1", "--num-gpus", "0",
                                 "--temp-dir", temp_dir, "--include-dashboard=false"], out / "head.log")]
    try:
        helpers.wait_for_port(port, 60)
        nodes.append(helpers.start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--num-gpus", "0",
                                         "--temp-dir", temp_dir], out / "worker.log"))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        alive = helpers.wait_for_nodes(2, 90)
        summary["cluster_nodes"] = sorted(nd["NodeID"] for nd in alive)
        head_id = ray.get_runtime_context().get_node_id()
        summary["head_node"] = head_id
        tracker = Tracker(default_uri(out), "two_node")

        summary["ddp"] = _train(_config(out, data_root, scale), "ddp", out, tracker)

        done, kill_log = threading.Event(), {}

        def watch(directory: Path) -> None:
            threading.Thread(target=_kill_session_when, args=(directory, nodes[1].pid, helpers, done, kill_log),
                             daemon=True).start()

        try:
            summary["elastic"] = _train(_config(out, data_root, scale, **{"ray.min_workers": 1}), "elastic", out,
                                        tracker, on_started=watch)
        finally:
            done.set()
        summary["kill"] = kill_log
        summary["kill_to_end_s"] = round(time.time() - kill_log.get("killed_at", time.time()), 1)
        summary["alive_after"] = sorted(nd["NodeID"] for nd in ray.nodes() if nd["Alive"])
        ray.shutdown()
        summary["single"] = _single(_config(out, data_root, scale), out)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        summary["needed_sigkill"] = helpers.stop_nodes(list(reversed(nodes)))
        summary["left_in_sessions"] = [pid for n in nodes for pid in helpers.session_pids(n.pid)]
    return summary


if __name__ == "__main__":
    # its own cluster token, and node health checks fast enough that a lost node is noticed in seconds
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                       "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                       "RAY_health_check_failure_threshold": "3", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       # a restart that first waits for the lost node's worker gives up after 20 s, not 60
                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
                       "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    result = main(target, sys.argv[2], float(sys.argv[3]))
    (target / "summary.json").write_text(json.dumps(result, indent=1, default=str))
