"""Cluster guards (issue 28): on a Ray cluster of more than one node, a checkpoint storage that a node cannot read
and a tracking store on the driver's disk, with a node on another host, are refused before launch, each naming the
flag to set. A real two-node cluster on this machine: the second node runs in a mount namespace of its own with a
tmpfs over the driver's "private" directory (what a node without the shared mount sees) and registers another
loopback address (another host, as far as Ray's node table says)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fomo_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(700)]


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def guards(tmp_path_factory):
    if not _can_unshare():
        pytest.skip("needs root and `unshare -m` (a node with a mount namespace of its own)")
    from _data_util import SCALE, small_fifmini

    out = tmp_path_factory.mktemp("guards")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_guard_cluster.py"), str(out),
                           str(small_fifmini(tmp_path_factory).root), str(SCALE)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"cluster-guard scenario failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "summary.json").read_text()), out


def test_storage_a_node_cannot_read_is_refused_naming_the_flag(guards):
    summary, out = guards
    assert "127.0.0.2" in summary["node_ips"]
    (problem,) = summary["private_storage"]
    assert problem.startswith(f"checkpoint storage {out / 'private' / 'ray'} is not shared")
    assert "127.0.0.2" in problem and "--storage-path" in problem
    assert summary["private_left"] == []  # the marker is removed again


def test_a_local_tracking_store_with_a_node_on_another_host_is_refused(guards):
    summary, _ = guards
    (problem,) = summary["sqlite"]
    assert "is a store on this node's disk" in problem and "127.0.0.2" in problem and "--tracking-uri" in problem
    assert summary["server"] == [] and summary["remote"] == []  # a server; storage every node reads or a bucket


def test_a_sweep_on_the_cluster_is_refused_before_any_directory(guards):
    """Through the sweep driver with ``ray.address``: inputs are fine, the storage is not; one line, no directory."""
    summary, _ = guards
    assert summary["sweep"].startswith("ConfigError: checkpoint storage") and "--storage-path" in summary["sweep"]
    assert "\n" not in summary["sweep"] and summary["sweep_dirs"] == []
    assert summary["needed_sigkill"] == []


def test_the_check_is_skipped_on_a_local_ray(tmp_path):
    """No address and no Ray joined: the sweep starts its own one-node Ray, nothing to check (nor to start here)."""
    import ray

    from fomo_ray.engine.ray_session import guard_cluster

    assert not ray.is_initialized()
    guard_cluster(load_config(None, {"output_dir": str(tmp_path)}), f"sqlite:///{tmp_path}/mlflow.db")
    assert not ray.is_initialized()
