"""A real two-node Ray cluster on this one machine, running a small sweep whose trials land on both nodes.

    python bench/two_node_cluster.py [--json OUT.json] [--keep DIR]

What it does (and undoes):
1. ``ray start --head --block`` (1 CPU, its own temp dir and port) and ``ray start --address 127.0.0.1:PORT --block``
   (1 CPU): two raylets, i.e. two Ray nodes, each in its own process session started here.
2. Connects a driver (``ray.address``) and runs a 2-trial sweep of the real loop (tiniest model, 1 task, function
   trials of 1 CPU each -- so the two trials can only run on different nodes), tracked in MLflow.
3. Asserts that the trials ran on two distinct nodes, prints a JSON summary, and stops exactly the processes it
   started: SIGTERM to each ``ray start`` session, then SIGKILL to anything left in those sessions.

Only loopback and the machine's own interface are used (Ray registers the machine's own address as the node IP).
The head gets its own ``--temp-dir``, so a plain ``ray.init()`` elsewhere on the machine never joins this cluster.
On a real cluster the same sweep runs with ``--address`` pointing at the head and ``--storage-path`` at shared
storage (docs/SCALING.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in a new session (so that every process it spawns can be found and stopped).

    Token authentication comes from the environment :func:`run` set up (its own token, shared by the nodes and the
    driver); nothing is left to drain when we stop the nodes, so SIGTERM tears them down at once."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def session_pids(sid: int) -> list[int]:
    """Live PIDs in session ``sid`` (all descendants of one ``ray start`` that did not leave it); zombies, which
    hold nothing and only wait for their parent to reap them, are not counted."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                state = stat[stat.rindex(")") + 2]
                if os.getsid(int(d.name)) == sid and state != "Z":
                    pids.append(int(d.name))
            except (OSError, ValueError):  # gone meanwhile, or not ours to inspect
                pass
    return pids


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def kill_session(sid: int) -> int:
    """SIGKILL every live process of session ``sid`` (a node lost at once, or what SIGTERM left); returns how many."""
    pids = session_pids(sid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


@dataclass
class LocalCluster:
    port: int
    temp_dir: str
    nodes: list  # the ``ray start --block`` processes: the head first; append every node you start
    needed_sigkill: list = field(default_factory=list)


@contextlib.contextmanager
def local_cluster(out: Path, head_cpus: int, prefix: str = "frc_") -> Iterator[LocalCluster]:
    """A Ray head started here (its own port and temp dir, ``head_cpus`` CPUs, no GPUs, no dashboard, log in
    ``out/head.log``). On exit the driver leaves Ray, every node in ``.nodes`` is stopped by PID (what needed SIGKILL
    is in ``.needed_sigkill``) and the temp dir is removed."""
    import ray

    port, temp_dir = free_port(), tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths
    cluster = LocalCluster(port, temp_dir, [start_node(
        ["--head", "--port", str(port), "--num-cpus", str(head_cpus), "--num-gpus", "0", "--temp-dir", temp_dir,
         "--include-dashboard=false"], out / "head.log")])
    try:
        wait_for_port(port, 60)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.needed_sigkill = stop_nodes(list(reversed(cluster.nodes)))
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_nodes(procs: list[subprocess.Popen], grace_s: float = 30.0) -> list[str]:
    """Stop the nodes we started: SIGTERM each ``ray start --block`` (it tears its raylet, GCS and workers down),
    wait, then SIGKILL whatever is still in those sessions. Returns the processes that needed SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    sids = [proc.pid for proc in procs]  # start_new_session: each session id is its ray start's pid
    deadline = time.time() + grace_s
    while time.time() < deadline and any(session_pids(sid) for sid in sids):
        time.sleep(0.5)
    names = [f"{pid} {_cmd(pid)}" for sid in sids for pid in session_pids(sid)]
    for sid in sids:
        kill_session(sid)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    return names


def wait_for_nodes(n: int, timeout_s: float) -> list[dict]:
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = [nd for nd in ray.nodes() if nd["Alive"]]
        if len(alive) >= n:
            return alive
        time.sleep(0.5)
    raise TimeoutError(f"only {len([nd for nd in ray.nodes() if nd['Alive']])} of {n} Ray nodes came up "
                       f"within {timeout_s:.0f} s")


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"the Ray head did not open port {port} within {timeout_s:.0f} s")


def sweep_spec(out: Path, data_root: str, data_scale: float = 1.0, budget_cache: str = "") -> dict:
    return {
        "name": "two_node",
        "base": {"output_dir": str(out), "data.root": data_root, "data.scale": data_scale, "backbone.pretrained": "",
                 "stream.num_tasks": 1, "budget.total_ft_steps": 4, "budget.mode": "equal_steps",
                 "mixture.batch_size": 16, "evaluation.subset_min": 20, "evaluation.full_at_ends": False,
                 "data.num_workers": 1, "budget.cache_dir": budget_cache or str(out / "budget"),
                 "ray.cpus_per_worker": 1.0},
        "space": {"seed": {"grid": [0, 1]}},
    }


def run(out: Path, data_root: str, data_scale: float = 1.0, budget_cache: str = "") -> dict:
    import ray

    from fomo_ray.engine import tune_sweep as sweep
    from fomo_ray.planning.sweep_spec import spec_from_dict

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="fr2n_", dir="/tmp")  # short: Ray's socket paths live under it
    t0 = time.time()
    head = start_node(["--head", "--port", str(port), "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", temp_dir,
                       "--include-dashboard=false", "--resources", json.dumps({"head_node": 1})], out / "head.log")
    nodes = [head]
    try:
        wait_for_port(port, 60)
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--num-gpus", "0",
                                 "--temp-dir", temp_dir, "--resources", json.dumps({"second_node": 1})],
                                out / "worker.log"))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        alive = wait_for_nodes(2, 90)
        t_up = time.time() - t0
        spec = spec_from_dict(sweep_spec(out, data_root, data_scale, budget_cache))
        res = sweep.run_sweep(spec, progress=True)
        ray.shutdown()
        trial_nodes = res.results.groupby("run")["node_id"].agg(lambda s: sorted(set(s))).to_dict()
        summary = {"port": port, "cluster_nodes": sorted(nd["NodeID"] for nd in alive),
                   "node_ips": sorted({nd["NodeManagerAddress"] for nd in alive}),
                   "trial_nodes": trial_nodes, "trial_status": res.trials.set_index("run")["status"].to_dict(),
                   "cluster_up_s": round(t_up, 1), "sweep_s": round(res.wall_s, 1)}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        killed = stop_nodes(list(reversed(nodes)))
        shutil.rmtree(temp_dir, ignore_errors=True)  # the nodes' sessions (their logs are in out/*.log)
    summary["stopped_cleanly"] = not killed
    summary["needed_sigkill"] = killed
    summary["total_s"] = round(time.time() - t0, 1)
    used = sorted({n for ns in trial_nodes.values() for n in ns})
    if len(used) != 2 or set(used) != set(summary["cluster_nodes"]):
        raise AssertionError(f"trials did not land on both nodes: {trial_nodes} (cluster {summary['cluster_nodes']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(REPO / "data" / "fifmini"), help="FiF-mini (built if missing)")
    ap.add_argument("--data-scale", type=float, default=1.0, help="FiF-mini size multiplier of --data-root")
    ap.add_argument("--keep", default="", help="output directory to keep (default: a temporary one)")
    ap.add_argument("--budget-cache", default="", help="the budget.cache_dir to read and store step speeds and fixed "
                    "costs in (default: one under the output directory)")
    ap.add_argument("--json", default="", help="also write the summary here")
    args = ap.parse_args(argv)
    if "ray" in sys.modules:
        raise RuntimeError("set up the cluster's authentication before ray is imported")
    # The cluster listens on the machine's interface: keep it authenticated, with a token of its own shared by the
    # nodes and this driver. Ray reads these when it is imported, so they are set before anything imports it.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    out = Path(args.keep or tempfile.mkdtemp(prefix="two_node_"))
    out.mkdir(parents=True, exist_ok=True)
    summary = run(out, str(Path(args.data_root).resolve()), args.data_scale, args.budget_cache)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
