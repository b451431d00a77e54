"""Spot preemptions: noticed in time for a checkpoint, counted apart from failures.

A spot reclaim (or ``ray drain``, or a node's SIGTERM) first drains the node: Ray marks it draining with a deadline,
then the node dies and its actors die ``preempted``. Ray does not charge such a death to the retry budget: Tune
retries the trial without counting it (``RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE`` unset) and Ray Train restarts its
workers under ``max_preemption_failures`` (unlimited), not ``max_failures``. So ``ray.max_failures`` is spent by
crashes only. What this module adds:

- the notice: :class:`DrainWatch` polls Ray's draining nodes off the training thread (a function trial; a Train
  worker asks ``ray.train.get_preemption_info()``), and the loop takes a checkpoint at its next check
  (``RunHooks.checkpoint_now``), so a trial resumes from there rather than from its last scheduled checkpoint;
- the count: every preemption of a trial (Tune restarting it without charging a failure, or Train restarting its
  workers after a preempted one died) adds one to ``<storage>/preempted/<trial id>.json``, which the sweep's
  ``trials.csv`` (column ``preempted``) and the trial's MLflow run (tag ``fomo_ray.preempted``) report.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from fomo_ray.atomic import write_json

POLL_S = 5.0  # Ray Train's own watcher polls every 5 s; a spot notice gives 30 s (GCP) to 2 min (AWS)
TAG = "fomo_ray.preempted"


def _path(storage: str, trial_id: str) -> Path | None:
    return None if "://" in storage or not trial_id else Path(storage, "preempted", f"{trial_id}.json")


def count(storage: str, trial_id: str) -> int:
    """How often trial ``trial_id`` was preempted so far (0 where nothing was recorded, or storage is remote)."""
    path = _path(storage, trial_id)
    try:
        return int(json.loads(path.read_text())["preempted"]) if path is not None else 0
    except (OSError, ValueError, KeyError):
        return 0


def add(storage: str, trial_id: str, what: str) -> int:
    """Count one more preemption of ``trial_id`` (``what`` happened: kept as the last event); returns the count."""
    path = _path(storage, trial_id)
    if path is None:
        return 0
    n = count(storage, trial_id) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"preempted": n, "last": what})
    return n


def with_counts(trials: Any, storage: str) -> Any:
    """The sweep's trials table with a ``preempted`` column (0 for trials never preempted)."""
    if trials is None or trials.empty or "trial_id" not in trials:
        return trials
    return trials.assign(preempted=[count(storage, str(t)) for t in trials["trial_id"]])


def draining_deadline(node_id: str) -> int | None:
    """The drain deadline (ms since the epoch; 0 = none given) of node ``node_id`` if Ray is draining it, else None.
    Ray Train's own preemption watcher reads the same table."""
    import ray

    drained = ray._private.state.state.get_draining_nodes() or {}
    return drained.get(node_id)


class DrainWatch:
    """Polls, every ``poll_s`` seconds on a daemon thread, whether this process's Ray node is being drained;
    :meth:`notice` tells the training thread (a flag read, no RPC)."""

    def __init__(self, node_id: str, poll_s: float = POLL_S,
                 deadline_of: Callable[[str], int | None] = draining_deadline) -> None:
        self.node_id, self.poll_s, self._deadline_of = node_id, poll_s, deadline_of
        self.deadline_ms: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="fomo_ray-drain-watch", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while self.deadline_ms is None and not self._stop.wait(self.poll_s):
            try:
                self.deadline_ms = self._deadline_of(self.node_id)
            except Exception:  # noqa: BLE001 - a GCS hiccup is not a notice; try again next time
                pass

    def notice(self) -> bool:
        return self.deadline_ms is not None

    def close(self) -> None:
        self._stop.set()


def preemption_counter(storage: str, trial_id: str) -> Any:
    """A Ray Train callback (it runs on the run's controller): a worker group that failed because a node was
    preempted adds one to the trial's preemption count (``preemptions.add``). Train restarts such a group under
    ``max_preemption_failures``, never charging ``ray.max_failures``."""
    from ray.train import UserCallback

    class CountPreemptions(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            ranks = sorted(r for r, e in worker_exceptions.items() if getattr(e, "preempted", False))
            if ranks:
                add(storage, trial_id, f"Train workers {ranks} lost to a preempted node")

    return CountPreemptions()
