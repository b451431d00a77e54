"""Autoscaling on one machine (issue 28): a real sweep on a local autoscaling Ray cluster that adds nodes for waiting
trials and removes them once idle.

    python bench/autoscaling.py [--trials 3] [--idle-timeout-s 15] [--json OUT.json] [--keep DIR]

The cluster is shaped like cluster/aws_gpu.yaml: a head with ``resources: {"CPU": 0}`` (the driver and Tune run
there, no trial fits it) and worker types that scale from zero, here ``cpu_1x`` ({CPU: 1}) and ``gpu_1x`` ({CPU: 1,
GPU: 1}, a logical GPU: nothing here uses it), at most ``MAX_WORKERS`` workers in all.

1. ``ray start --head --block --no-monitor`` (CPU 0, its own temp dir and port, its own process session): no monitor,
   because the autoscaler is ours.
2. The autoscaler: Ray's v2 ``Autoscaler`` running in a process of its own (this file with ``--run-autoscaler``, in
   its own session), reconciling every second as Ray's autoscaler/v2/tests/test_autoscaler.py drives it, with Ray's
   fake multi-node provider (``FakeMultiNodeProvider``), which "launches" a worker node by starting a raylet on this
   machine with the node type's resources. Every process of every worker node is a descendant of the autoscaler
   process and stays in its session, so both sessions together hold everything this script started.
3. A driver joins the head and runs a small sweep of the real loop (function trials of 1 CPU each): the trials wait
   for CPUs, the autoscaler adds nodes, the trials run on them. A background thread samples the cluster every second
   (worker nodes by type, idle ones, launches under way, trials waiting / running from Tune's placement groups).
4. After the sweep it waits, polling with a deadline, until the autoscaler has removed the idle worker nodes, prints
   the timeline and the figures, and stops exactly the processes it started (SIGTERM each session's leader: the
   autoscaler first, which stops the nodes it launched, then the head; SIGKILL whatever is left, reported).

The fake provider's type ``fake_multinode`` needs a defaults file (fake_multi_node/example.yaml) that Ray's wheel
does not ship, so the provider is named as an ``external`` module instead: the same class, Ray's minimal defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_node_cluster import RAY, free_port, session_pids, stop_nodes, wait_for_port  # noqa: E402

# The fake provider's fixed names: the head is instance FAKE_HEAD_NODE_ID of type FAKE_HEAD_NODE_TYPE (copied here
# so that nothing imports ray before its authentication is set up in main()).
HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
HEAD_TYPE = "ray.head.default"
MAX_WORKERS = 2  # the cluster's max_workers: with 3 trials of 1 CPU, one trial waits for a free node
OBJECT_STORE = 150 * 1024 * 1024  # per node, as Ray's local test clusters use: /dev/shm is shared with other jobs
UPDATE_S = 1.0  # the autoscaler's reconcile interval (AUTOSCALER_UPDATE_INTERVAL_S is 5 s on a real head)


def cluster_config(port: int, idle_timeout_s: float) -> dict:
    node = {"node_config": {}, "min_workers": 0}
    return {
        "cluster_name": "fomo-ray-local", "max_workers": MAX_WORKERS, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": f"127.0.0.1:{port}", "head_node_id": HEAD_ID, "launch_multiple": True,
                     # the provider starts Ray itself: no SSH setup/start commands to run on its nodes
                     "disable_node_updaters": True},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_1x": {**node, "resources": {"CPU": 1, "object_store_memory": OBJECT_STORE}, "max_workers": 2},
            "gpu_1x": {**node, "resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE},
                       "max_workers": 2},
        },
        "head_node_type": HEAD_TYPE,
        # the keys Ray's defaults file would fill in (nothing to sync or run: the nodes are local processes)
        "auth": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# ------------------------------------------------------------------------------------------- the autoscaler process
def run_autoscaler(config_path: str) -> int:
    """Ray's v2 autoscaler in this process until SIGTERM, then stop the worker nodes it launched (their raylets are
    this process's children: without this they would outlive it)."""
    from ray._raylet import GcsClient
    from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_NODE_KIND
    from ray.autoscaler.v2.autoscaler import Autoscaler
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader

    class ReadOnce(FileConfigReader):
        def refresh_cached_autoscaling_config(self) -> None:
            pass  # the config never changes here, and each read repeats Ray's warnings about its legacy defaults

    reader = ReadOnce(config_path, skip_content_hash=True)
    gcs = GcsClient(address=reader.get_cached_autoscaling_config().get_provider_config()["gcs_address"])
    autoscaler = Autoscaler(session_name="fomo_ray_autoscaling", config_reader=reader, gcs_client=gcs)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(UPDATE_S):
        state = autoscaler.update_autoscaling_state()
        if state:  # what `ray status` and the v2 SDK's get_cluster_status read back
            gcs.report_autoscaling_state(state.SerializeToString())
    provider = autoscaler._cloud_instance_provider.v1_provider  # the FakeMultiNodeProvider (no public handle)
    for node_id in provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}):
        print(f"stopping worker node {node_id}", flush=True)
        provider.terminate_node(node_id)  # SIGTERM, wait, then SIGKILL each of the node's processes
    return 0


# ------------------------------------------------------------------------------------------------ the cluster
def start_session(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """``cmd`` in a new process session: everything it spawns can be found (and stopped) by the session id."""
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **env}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_head(port: int, temp_dir: str, log: Path) -> subprocess.Popen:
    # RAY_FAKE_CLUSTER makes `ray start` give the head the fake provider's head node id; the cloud instance id and
    # node type tie that node to the provider's head instance, as AutoscalingCluster's v2 mode sets them
    return start_session([RAY, "start", "--head", "--block", "--disable-usage-stats", "--no-monitor",
                          "--port", str(port), "--num-cpus", "0", "--num-gpus", "0", "--temp-dir", temp_dir,
                          "--object-store-memory", str(OBJECT_STORE), "--include-dashboard=false"], log,
                         {"RAY_FAKE_CLUSTER": "1", "RAY_CLOUD_INSTANCE_ID": HEAD_ID, "RAY_NODE_TYPE_NAME": HEAD_TYPE})


def start_autoscaler(config: dict, out: Path) -> subprocess.Popen:
    path = out / "autoscaling_config.json"
    path.write_text(json.dumps(config, indent=2))
    # FakeMultiNodeProvider refuses to start without RAY_FAKE_CLUSTER
    return start_session([sys.executable, str(Path(__file__).resolve()), "--run-autoscaler", str(path)],
                         out / "autoscaler.log", {"RAY_FAKE_CLUSTER": "1"})


def leftover_pids(temp_dir: str) -> list[str]:
    """Processes whose command line names the cluster's temp dir, in any session: after the sessions are stopped
    there should be none. (Raylets, the GCS and the log monitors name it; Ray's workers retitle themselves
    ``ray::...``, and only the session ids find those: :func:`run` checks both.)"""
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmd:
                left.append(f"{d.name} {cmd[:120]}")
    return left


# ----------------------------------------------------------------------------------------------- the timeline
def cluster_sample(gcs_address: str) -> dict:
    """One look at the cluster: alive worker nodes (the fake instance id's last 5 digits: their type) and which are
    idle, launches under way, and trials waiting / running (each Tune trial holds one placement group: PENDING =
    waiting for resources, CREATED = running)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address)
    pgs = Counter(pg["state"] for pg in ray.util.placement_group_table().values())
    return {"nodes": {n.instance_id[-5:]: n.ray_node_type_name for n in status.active_nodes + status.idle_nodes
                      if n.instance_id != HEAD_ID},
            "idle": sorted(n.instance_id[-5:] for n in status.idle_nodes if n.instance_id != HEAD_ID),
            # asked of the provider, not yet an instance / an instance whose Ray is not up yet
            "requested": sum(r.count for r in status.pending_launches), "starting": sum(n.instance_id != HEAD_ID for n in status.pending_nodes),
            "waiting": pgs.get("PENDING", 0) + pgs.get("RESCHEDULING", 0), "running": pgs.get("CREATED", 0)}


class Timeline(threading.Thread):
    """Samples the cluster every ``every_s`` seconds (times in seconds from ``t0``) until :meth:`stop`."""

    def __init__(self, gcs_address: str, t0: float, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.gcs_address, self.t0, self.every_s = gcs_address, t0, every_s
        self.samples: list[dict] = []
        self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.samples.append({"t": round(time.time() - self.t0, 1), **cluster_sample(self.gcs_address)})
            except Exception:  # noqa: BLE001 - a missed look (the GCS busy) is only a gap in the timeline
                self.errors += 1
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=30)

    def at_minimum_since(self, t: float) -> bool:
        """A sample taken after ``t`` saw no worker node alive or launching (every type's min_workers is 0)."""
        s = self.samples[-1] if self.samples else None
        return bool(s and s["t"] > t and not (s["nodes"] or s["requested"] or s["starting"]))


def by_type(s: dict) -> dict:
    return dict(sorted(Counter(s["nodes"].values()).items()))


def describe(s: dict) -> str:
    nodes = " ".join(f"{k}={v}" for k, v in by_type(s).items()) or "-"
    return (f"{s['t']:7.1f} s  workers {len(s['nodes'])} ({nodes}; idle {len(s['idle'])})  "
            f"requested {s['requested']} starting {s['starting']}  trials waiting {s['waiting']} "
            f"running {s['running']}")


def print_timeline(samples: list[dict]) -> None:
    """The samples where something changed (every sample is in the JSON summary)."""
    key = None
    for s in samples:
        now = [v for k, v in s.items() if k != "t"]
        if now != key:
            print(describe(s))
            key = now


def figures(samples: list[dict], sweep_start: float, sweep_end: float, idle_timeout_s: float) -> dict:
    """What the timeline shows (times in seconds from the head's start; sweep_* on the same clock)."""
    first_wait = next((s["t"] for s in samples if s["waiting"]), None)
    first_node = next((s["t"] for s in samples if s["nodes"]), None)
    # a node added while trials waited: it is in a sample whose previous sample had trials waiting and lacked it
    added_waiting = sum(len(set(b["nodes"]) - set(a["nodes"])) for a, b in zip(samples, samples[1:]) if a["waiting"])
    peak = max(samples, key=lambda s: len(s["nodes"]), default={"nodes": {}})
    back = next((s["t"] for s in samples
                 if s["t"] >= sweep_end and not (s["nodes"] or s["requested"] or s["starting"])), None)
    return {"sweep_start_s": round(sweep_start, 1), "sweep_end_s": round(sweep_end, 1),
            "sweep_s": round(sweep_end - sweep_start, 1), "first_trial_waiting_s": first_wait,
            "first_node_s": first_node,
            "first_node_after_sweep_start_s": round(first_node - sweep_start, 1) if first_node is not None else None,
            "first_wait_to_first_node_s": round(first_node - first_wait, 1) if None not in (first_node, first_wait)
            else None,
            "nodes_added_while_trials_waited": added_waiting,
            "nodes_launched": sorted({n for s in samples for n in s["nodes"]}),
            "peak_workers": len(peak["nodes"]), "peak_workers_by_type": by_type(peak),
            "idle_timeout_s": idle_timeout_s, "back_to_min_s": back,
            "sweep_end_to_min_s": round(back - sweep_end, 1) if back is not None else None,
            "idle_to_removed_s": idle_to_removed(samples)}


def idle_to_removed(samples: list[dict]) -> dict:
    """Per removed worker node: seconds from the first sample of its last idle stretch to the first sample without
    the node. At least the idle timeout (less a sampling interval) when idle nodes go after the timeout, not before."""
    idle_since: dict[str, float] = {}
    removed: dict[str, float] = {}
    for a, b in zip(samples, samples[1:]):
        for node in set(b["idle"]) - set(a["idle"]):
            idle_since[node] = b["t"]
        for node in set(a["nodes"]) - set(b["nodes"]):
            removed[node] = b["t"]
    return {n: round(t - idle_since[n], 1) for n, t in sorted(removed.items()) if n in idle_since}


def wait_for_min_workers(timeline: Timeline, since: float, deadline_s: float) -> bool:
    """Poll the timeline, up to ``deadline_s``, until a sample after ``since`` shows the minimum of worker nodes."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        if timeline.at_minimum_since(since):
            return True
        time.sleep(0.5)
    return False


# -------------------------------------------------------------------------------------------------- the sweep
def sweep_spec(out: Path, data_root: str, data_scale: float, trials: int, budget_cache: str = "") -> dict:
    return {
        "name": "autoscaling",
        "base": {"output_dir": str(out), "data.root": data_root, "data.scale": data_scale, "backbone.pretrained": "",
                 "stream.num_tasks": 1, "budget.total_ft_steps": 4, "budget.mode": "equal_steps",
                 "mixture.batch_size": 16, "evaluation.subset_min": 20, "evaluation.full_at_ends": False,
                 "data.num_workers": 1, "budget.cache_dir": budget_cache or str(out / "budget"),
                 "ray.cpus_per_worker": 1.0,
                 # every node is on this machine, so one local directory is shared storage to the cluster guards
                 "ray.storage_path": str(out / "storage")},
        "space": {"seed": {"grid": list(range(trials))}},
    }


def run(out: Path, data_root: str, data_scale: float, trials: int, idle_timeout_s: float,
        budget_cache: str = "") -> dict:
    import ray

    from fomo_ray.planning.sweep_spec import spec_from_dict
    from fomo_ray.engine.tune_sweep import run_sweep

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="fras_", dir="/tmp")  # short: Ray's socket paths live under it
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    timeline = None
    summary: dict = {"port": port, "temp_dir": temp_dir}
    try:
        procs.append(start_head(port, temp_dir, out / "head.log"))
        wait_for_port(port, 60)
        procs.insert(0, start_autoscaler(cluster_config(port, idle_timeout_s), out))  # stopped first
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        timeline = Timeline(f"127.0.0.1:{port}", t0)
        timeline.start()
        sweep_start = time.time() - t0
        res = run_sweep(spec_from_dict(sweep_spec(out, data_root, data_scale, trials, budget_cache)), progress=True,
                        use_cache=False)  # real trials, never replayed from the trial cache
        sweep_end = time.time() - t0
        # a node stays idle_timeout_s, then the autoscaler drains and stops it: allow that plus a minute of slack
        back = wait_for_min_workers(timeline, sweep_end, idle_timeout_s + 90)
        timeline.stop()
        summary.update(figures(timeline.samples, sweep_start, sweep_end, idle_timeout_s))
        summary.update(back_to_min=back, trial_status=res.trials.set_index("run")["status"].to_dict(),
                       trial_nodes=res.results.groupby("run")["node_id"].agg(lambda s: sorted(set(s))).to_dict(),
                       timeline=timeline.samples, timeline_errors=timeline.errors)
    finally:
        if timeline is not None and timeline.is_alive():
            timeline.stop()
        if ray.is_initialized():
            ray.shutdown()
        # the autoscaler first (it stops the nodes it launched and launches no more), then the head
        killed = [name for proc in procs for name in stop_nodes([proc], grace_s=60)]
        left = leftover_pids(temp_dir) + [str(p) for proc in procs for p in session_pids(proc.pid)]
        shutil.rmtree(temp_dir, ignore_errors=True)  # the nodes' sessions (the logs that matter are in out/)
    summary.update(needed_sigkill=killed, leftover=left, stopped_cleanly=not killed and not left,
                   total_s=round(time.time() - t0, 1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="", help="a FiF-mini (default: a small one built in the output dir)")
    ap.add_argument("--data-scale", type=float, default=0.05, help="FiF-mini size multiplier of --data-root")
    ap.add_argument("--trials", type=int, default=3, help="trials of 1 CPU each (the cluster has at most "
                                                          f"{MAX_WORKERS} one-CPU workers)")
    ap.add_argument("--idle-timeout-s", type=float, default=15.0, help="the autoscaler's idle timeout")
    ap.add_argument("--keep", default="", help="output directory to keep (default: a temporary one)")
    ap.add_argument("--budget-cache", default="", help="the budget.cache_dir to read and store step speeds and fixed "
                    "costs in (default: one under the output directory)")
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--run-autoscaler", default="", help=argparse.SUPPRESS)  # internal: the autoscaler process
    args = ap.parse_args(argv)
    if "ray" in sys.modules:
        raise RuntimeError("set up the cluster's authentication before ray is imported")
    if args.run_autoscaler:  # the authentication came with the environment of the process that started this one
        return run_autoscaler(args.run_autoscaler)
    # The cluster listens on the machine's interface: keep it authenticated, with a token of its own shared by the
    # head, the autoscaler (and the nodes it starts) and this driver. Ray reads these when it is imported. The GCS
    # runs the v2 autoscaler's protocol only with the flag set, so every process gets it.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
                      RAY_enable_autoscaler_v2="1")
    out = Path(args.keep or tempfile.mkdtemp(prefix="autoscaling_"))
    out.mkdir(parents=True, exist_ok=True)
    data_root = args.data_root
    if not data_root:
        from fomo_ray.prep.fifmini import ensure_fifmini

        data_root = str(ensure_fifmini(out / "fifmini", seed=0, image_size=32, scale=args.data_scale,
                                       progress=False).root)
    summary = run(out, str(Path(data_root).resolve()), args.data_scale, args.trials, args.idle_timeout_s,
                  args.budget_cache)
    print("\ntimeline (samples where something changed; seconds from the head's start):")
    print_timeline(summary["timeline"])
    print(json.dumps({k: v for k, v in summary.items() if k != "timeline"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
