"""The cluster-guard scenario of tests/test_cluster_guards.py, in a process of its own (Ray's token authentication
must be set before ``ray`` is imported): a head and a second node on this machine, the second in a mount namespace
of its own with a tmpfs over ``OUT/private`` (a node without the shared mount) and registered under 127.0.0.2
(another host in Ray's node table). Writes what the guards said to ``OUT/summary.json``; stops its nodes by PID.

    python tests/_guard_cluster.py OUT FIFMINI_ROOT FIFMINI_SCALE
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from _cluster_util import REPO, cluster_helpers, scenario_main

sys.path.insert(0, str(REPO))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")


def _refusal(call) -> str:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the summary records what was raised
        return f"{type(e).__name__}: {e}"
    return ""


def main(out: Path, data_root: str, scale: float) -> dict:
    helpers = cluster_helpers()
    import ray

    from fomo_ray.engine.ray_session import cluster_problems
    from fomo_ray.planning.sweep_spec import spec_from_dict
    from fomo_ray.engine.tune_sweep import run_sweep

    private, shared = out / "private", out / "shared"
    private.mkdir(parents=True)
    shared.mkdir(parents=True)
    summary: dict = {}
    with helpers.local_cluster(out, head_cpus=1, prefix="frg_") as cluster:
        node = (f"mount -t tmpfs none {private} && exec {helpers.RAY} start --block --disable-usage-stats "
                f"--address 127.0.0.1:{cluster.port} --num-cpus 1 --num-gpus 0 --temp-dir {cluster.temp_dir} "
                f"--node-ip-address 127.0.0.2")
        env = {**os.environ, "RAY_ADDRESS": "", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        cluster.nodes.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", node],
                                              stdout=(out / "node2.log").open("w"), stderr=subprocess.STDOUT,
                                              env=env, start_new_session=True))
        ray.init(address=f"127.0.0.1:{cluster.port}", log_to_driver=False)
        alive = helpers.wait_for_nodes(2, 90)
        summary["node_ips"] = sorted(n["NodeManagerAddress"] for n in alive)
        summary["private_storage"] = cluster_problems(str(private / "ray"), "")
        summary["private_left"] = sorted(p.name for p in (private / "ray").iterdir())
        summary["sqlite"] = cluster_problems(str(shared), f"sqlite:///{shared}/mlflow.db")
        summary["server"] = cluster_problems(str(shared), "http://127.0.0.1:5000")
        summary["remote"] = cluster_problems("s3://bucket/fomo_ray", "")
        runs = out / "runs"
        spec = spec_from_dict({"name": "guarded", "base": {
            "output_dir": str(runs), "ray.address": f"127.0.0.1:{cluster.port}", "tracking.enabled": False,
            "backbone.pretrained": "", "data.root": data_root, "data.scale": scale, "stream.num_tasks": 2,
            "ray.storage_path": str(private / "store")}, "space": {"seed": {"grid": [0]}}})
        ray.shutdown()  # the sweep joins by its address, as `fomo-ray sweep --address` does
        summary["sweep"] = _refusal(lambda: run_sweep(spec, progress=False))
        summary["sweep_dirs"] = sorted(p.name for p in runs.rglob("*")) if runs.exists() else []
    summary["needed_sigkill"] = cluster.needed_sigkill
    return summary


if __name__ == "__main__":
    scenario_main(main)
