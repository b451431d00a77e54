"""MLflow tracking: one parent run per sweep, one child run per trial (the only ``mlflow`` import).

Layout in the store (DESIGN §8)::

    experiment cfg.tracking.experiment
      parent run  "<sweep name>"        tags fomo_ray.kind=sweep; report figures/tables as artifacts
        child run "<trial id>"          tags mlflow.parentRunId, fomo_ray.trial_id, fomo_ray.config_hash
                                        params = cfg.flat(); metrics per evaluation point (step = task index):
                                        A_KA, A_ZS, GM and "<dataset>/<metric>"; checkpoints as artifacts

The default store is SQLite at an *absolute* path under ``cfg.output_dir`` (Ray Tune changes the working directory
of each trial, so MLflow's relative default would scatter one database per trial). Metrics are written with
``log_batch`` because one SQLite metric write costs ~4 ms.
"""
from __future__ import annotations

import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (what the UI groups child runs by)
TRIAL_TAG = "fomo_ray.trial_id"
KIND_TAG = "fomo_ray.kind"
REASON_TAG = "fomo_ray.failure_reason"
STATUS_TAG = "fomo_ray.status"  # finished | failed | stopped | interrupted
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
_BATCH = 1000  # MLflow's per-call limit for metrics; params/tags are limited to 100
_BATCH_PARAMS = 100
_INVALID_KEY_CHARS = re.compile(r"[^\w./\- :]")  # MLflow accepts alphanumerics, _ - . / space :


class TrackingError(RuntimeError):
    """The tracking store is unusable; the message names the URI."""


# --------------------------------------------------------------------------------------------------- URIs
def default_uri(output_dir: str | Path) -> str:
    """``sqlite:////abs/path/mlflow.db`` under ``output_dir`` (made absolute here, never cwd-relative later)."""
    return f"sqlite:///{Path(output_dir).expanduser().resolve() / DB_NAME}"


def resolve_uri(configured: str, output_dir: str | Path, env: Mapping[str, str] | None = None) -> str:
    """The tracking URI a run uses: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under output_dir.

    A relative SQLite path is made absolute against the current directory (call this in the driver, before Ray
    moves trials into their own directories). The file store (``./mlruns``) is refused: MLflow >= 3.13 rejects it.
    """
    env = os.environ if env is None else env
    uri = configured or env.get("MLFLOW_TRACKING_URI", "") or default_uri(output_dir)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            uri = f"sqlite:///{Path(path).resolve()}"
        return uri
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file"):
        raise TrackingError(
            f"MLflow tracking URI {uri!r} is a file store, which MLflow 3.13+ refuses; use a database such as "
            f"{default_uri(output_dir)!r} or a tracking server (http://127.0.0.1:5000)")
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0, create: bool = True) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when the store cannot be used; names the URI.
    ``create=False`` (a dry run) writes nothing: a database's nearest existing folder must then be writable."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        folder = db.parent
        if create:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingError(f"MLflow tracking URI {uri!r}: cannot create directory {folder}: {e}") from e
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow tracking URI {uri!r}: directory {folder} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri!r} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {uri!r} is unreachable: {e}") from e


# --------------------------------------------------------------------------------------------------- pure helpers
def metric_key(dataset: str, metric: str) -> str:
    """Per-dataset metric name, e.g. ``SHAPES/top1``; '@' of ``R@5`` becomes ``R_at_5`` (MLflow's key alphabet)."""
    return _INVALID_KEY_CHARS.sub("_", f"{dataset}/{metric.replace('@', '_at_')}")


def eval_metrics(records: Iterable[Mapping[str, Any]], summary: Mapping[str, float]) -> dict[str, float]:
    """Flat ``{key: value}`` for one evaluation point: the summary (A_KA, A_ZS, GM) plus every record."""
    out = {k: float(v) for k, v in summary.items()}
    for r in records:
        out[metric_key(str(r["dataset"]), str(r["metric"]))] = float(r["value"])
    return out


def _param_value(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# --------------------------------------------------------------------------------------------------- the tracker
class Tracker:
    """Thin wrapper over :class:`MlflowClient` with the project's run layout.

    Uses the client API (explicit run ids) rather than mlflow's global "active run", so a Tune driver thread and a
    Train worker in the same process can never log into each other's run.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None):
        self.uri = uri
        check_reachable(uri)
        if artifact_root is None and uri.startswith("sqlite:///"):
            # MLflow's default would be ./mlruns relative to whatever directory creates the experiment
            artifact_root = Path(uri[len("sqlite:///"):]).parent / ARTIFACT_DIR
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment, artifact_root)

    def _experiment(self, name: str, artifact_root: str | Path | None) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = None
            if artifact_root is not None:  # absolute, so artifacts land in one place whatever the trial's cwd
                location = Path(artifact_root).expanduser().resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if self.client.get_experiment_by_name(name) is not None:  # created concurrently by another trial
                return self.client.get_experiment_by_name(name).experiment_id
            raise TrackingError(f"MLflow tracking URI {self.uri!r}: cannot open experiment {name!r}: {e}") from e

    # -------------------------------------------------------------------------------------------- runs
    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """Id of the newest run carrying all ``tags`` (how a restored sweep/trial finds its original run)."""
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def start_parent(self, sweep_name: str, tags: Mapping[str, str] = ()) -> str:
        """The sweep's parent run (reused when the sweep is resumed)."""
        found = self.find_run({KIND_TAG: "sweep", "fomo_ray.sweep": sweep_name})
        if found:
            self.client.update_run(found, status="RUNNING")
            return found
        run = self.client.create_run(self.experiment_id, run_name=sweep_name,
                                     tags={KIND_TAG: "sweep", "fomo_ray.sweep": sweep_name, **dict(tags)})
        return run.info.run_id

    def start_child(self, parent_run_id: str | None, trial_id: str, params: Mapping[str, Any],
                    tags: Mapping[str, str] = (), run_id: str | None = None, run_name: str = "") -> str:
        """A trial's run: ``run_id`` (from a checkpoint) or the trial's existing run (found by its trial id) is
        reopened, else created with the name ``run_name`` (default: the trial id)."""
        if run_id is None:
            want = {TRIAL_TAG: trial_id, **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
            run_id = self.find_run(want)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {TRIAL_TAG: trial_id, KIND_TAG: "trial", **dict(tags)}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run_id = self.client.create_run(self.experiment_id, run_name=run_name or trial_id, tags=all_tags).info.run_id
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for chunk in _chunks(items, _BATCH_PARAMS):
            self.client.log_batch(run_id, params=list(chunk))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """All metrics of one evaluation point in as few calls as possible (step = evaluation point index)."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for chunk in _chunks(items, _BATCH):
            self.client.log_batch(run_id, metrics=list(chunk))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for chunk in _chunks(items, _BATCH_PARAMS):
            self.client.log_batch(run_id, tags=list(chunk))

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path=artifact_path)

    def finish(self, run_id: str, failure: str | None = None, status: str = "") -> None:
        """FINISHED, or FAILED with the reason as a tag (visible in the UI's run table), or ``status`` (e.g. KILLED
        for an interrupted sweep; reopened as RUNNING when it resumes). The trial status (finished, failed, stopped,
        interrupted) is also a tag, ``fomo_ray.status``."""
        if failure:
            self.set_tags(run_id, {REASON_TAG: failure})
        status = status or ("FAILED" if failure else "FINISHED")
        self.set_tags(run_id, {STATUS_TAG: {"FAILED": "failed", "KILLED": "interrupted"}.get(status, "finished")})
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))

    # -------------------------------------------------------------------------------------------- reading back
    def children(self, parent_run_id: str) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10_000)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))


def tracker_for(cfg: Any) -> Tracker:
    """The tracker a config asks for (URI resolved as in :func:`resolve_uri`)."""
    # a local database keeps its artifacts beside it (Tracker's default); a tracking server decides for itself
    return Tracker(resolve_uri(cfg.tracking.uri, cfg.output_dir), cfg.tracking.experiment)


# --------------------------------------------------------------------------------------------------- `fomo-ray ui`
def ui_command(uri: str, port: int, artifact_root: str | Path | None) -> list[str]:
    """``mlflow server`` bound to loopback with one worker (~0.5 GB instead of ~2 GB for the defaults)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        cmd += ["--default-artifact-root", Path(artifact_root).expanduser().resolve().as_uri()]
    return cmd
