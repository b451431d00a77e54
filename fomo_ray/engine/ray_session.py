"""The sweep driver's Ray: start or join it (:func:`ensure_ray`), and refuse, before launch, a sweep on a multi-node
cluster whose checkpoints or tracking would stay on one node (:func:`guard_cluster`).

A trial restarted on another node (a lost node, a spot reclaim, an elastic resize) resumes from checkpoints under
``ray.storage_path``: a path only the driver's node can read leaves it nothing to resume from. A local SQLite tracking
store is written by every node on its own disk, so the head's MLflow UI shows no trial runs (and SQLite on a network
file system corrupts under concurrent writers). Both are checked as soon as the driver has joined the cluster, each
failure named with the flag that fixes it (docs/SCALING.md).

"Shared" is tested, not assumed: the driver writes a marker file under the storage path and a zero-CPU task pinned
to every other alive node looks for it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from fomo_ray.atomic import write_text
from fomo_ray.config import ConfigError, ExperimentConfig

MARKER_PREFIX = ".fomo_ray_shared_"


#: what the driver's environment hands to every Ray worker: the tracking server's credentials (fomo-ray
#: tracking-server), so that trials on other nodes can log; never written to a file or a config
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def worker_env() -> dict[str, Any] | None:
    """The job's runtime environment: :data:`FORWARDED_ENV` as set where the driver runs (None: nothing to add)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


def ensure_ray(cfg: ExperimentConfig, show_worker_logs: bool) -> bool:
    """Start or join Ray (``ray.address``); True if this call started it (and must shut it down)."""
    import ray

    # a local Ray has nothing to preempt (its controller inherits this); a joined cluster keeps Ray's default (on)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Tune warns on every checkpoint of short trials that snapshotting "may become a bottleneck"; it is not here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # a failing trial prints one line (Progress: its reason and the path of its full log), not ~55 lines of Ray
    # traceback per attempt; Tune's own banners and tables are replaced by Progress too
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return False
    try:
        with deferred_interrupt():
            ray.init(address=cfg.ray.address or None, include_dashboard=False, log_to_driver=show_worker_logs,
                     configure_logging=show_worker_logs, runtime_env=worker_env())
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    return True


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block, then raise it after the block.

    Raised inside ``ray.init``, a KeyboardInterrupt can land in a fork handler or a finalizer, where Python only
    prints "Exception ignored in ..." and goes on: the sweep then ran to completion. Held, it stops the sweep once
    Ray has started (a few seconds later), and the driver shuts Ray down and exits as interrupted."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def is_remote_uri(path: str) -> bool:
    """A URI Ray persists through pyarrow (``s3://``, ``gs://``, ...): reachable from every node by design."""
    return "://" in path and not path.startswith("file://")


def local_tracking_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a store on one node's disk (SQLite or a file store), not a server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _sees(path: str) -> bool:
    return os.path.exists(path)


def nodes_missing(path: Path, nodes: Sequence[dict[str, Any]]) -> list[str]:
    """The alive ``nodes`` (``ray.nodes()`` entries, other than the driver's) that cannot read a marker the driver
    wrote under ``path``; each is asked by a zero-CPU task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path.mkdir(parents=True, exist_ok=True)
    marker = path / f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    write_text(marker, "written by the sweep driver; removed once every node looked for it\n")
    try:
        look = ray.remote(num_cpus=0)(_sees)
        refs = {n["NodeID"]: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes}
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
    finally:
        marker.unlink(missing_ok=True)
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in nodes if not seen[n["NodeID"]]]


def cluster_problems(storage: str, tracking_uri: str) -> list[str]:
    """What would keep a multi-node cluster's trials from resuming on another node or from being tracked in one
    place; empty on a single-node cluster. ``storage``: where the sweep's checkpoints go (``ray.storage_path``, or
    the local default); ``tracking_uri``: "" when tracking is off. A local store is refused only where a node runs on
    another host (nodes of one host share its disk, as in the local test clusters)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    host = next((n["NodeManagerAddress"] for n in alive if n["NodeID"] == here), "")
    others = [n for n in alive if n["NodeID"] != here]
    problems = []
    missing = nodes_missing(Path(storage.removeprefix("file://")), others) \
        if others and not is_remote_uri(storage) else []
    if missing:
        problems.append(f"checkpoint storage {storage} is not shared: node(s) {', '.join(missing)} of this "
                        f"{len(alive)}-node cluster cannot read it, so a trial could not resume there; set "
                        f"--storage-path (ray.storage_path) to shared storage (an NFS/EFS mount, s3://, gs://)")
    remote = [n["NodeManagerAddress"] for n in others if n["NodeManagerAddress"] != host]
    if tracking_uri and local_tracking_store(tracking_uri) and remote:
        problems.append(f"tracking URI {tracking_uri} is a store on this node's disk, and node(s) on "
                        f"{', '.join(sorted(set(remote)))} would each write their own; set --tracking-uri "
                        f"(tracking.uri) to the cluster's MLflow server (http://<head>:5000, docs/SCALING.md)")
    return problems


def guard_cluster(cfg: ExperimentConfig, tracking_uri: str) -> None:
    """On a cluster (``ray.address``, or a Ray this process already joined), check the sweep's checkpoint storage
    (``ray.storage_path``, else the local output directory they default to) and tracking URI
    (:func:`cluster_problems`) and raise one ``ConfigError`` naming every problem. Joins for the check and leaves
    again when it joined: the sweep joins itself once the plan is settled."""
    import ray

    if not cfg.ray.address and not ray.is_initialized():
        return  # a local Ray started for this sweep: one node
    joined = ensure_ray(cfg, show_worker_logs=False)
    try:
        problems = cluster_problems(cfg.ray.storage_path or str(Path(cfg.output_dir).resolve()), tracking_uri)
    finally:
        if joined:
            ray.shutdown()
    if problems:
        raise ConfigError("; and ".join(problems))
