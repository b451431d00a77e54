"""MLflow tracking, the writer: one parent run per sweep, one child run per trial (with ``ui.py``, the only
``mlflow`` imports; the UI's study views live there).

Layout in the store (what a person sees: docs/TRACKING.md)::

    experiment cfg.tracking.experiment  tags: two saved views of the runs table (ui.study_views)
      parent run  "<sweep name>"        tags fomo_ray.kind=sweep, mlflow.note.content (what the sweep studies);
                                        metrics Best/GM, Median/GM, ... Trials/finished, Trials/failed;
                                        over several seeds Variants/<variant>/final_GM_mean, ..._ci, mean_GM_*;
                                        report figures/tables as artifacts
        child run "<trial name>"        tags mlflow.parentRunId, fomo_ray.trial_id, fomo_ray.config_hash;
                                        params = the settings that apply to its method (methods.applicable_params)
                                        + variant; the whole config as the artifact config.json;
                                        metrics in PERCENT per evaluation point (step = the point, 0..T):
                                        Summary/A_KA, Summary/A_ZS, Summary/GM, datasets/<dataset>/<metric>
                                        (the fixed subsets: the trajectory); at the ends also Summary_full/* and
                                        datasets_full/<dataset>/<metric> (the full test sets);
                                        per training step (step = global step): Training/loss, Training/lr,
                                        Training/grad_norm, Training/samples_per_s; checkpoints as artifacts
      run "<run name>"                  a `fomo-ray run` (fomo_ray.kind=run): a child run's params and metrics
    every run: tags fomo_ray.version, fomo_ray.git_commit and mlflow.source.git.commit (the UI's Version column)

Metric names decide MLflow 3's view: the run page groups charts into sections by the name before the last '/' and
sorts the sections by code point, with unprefixed names ("Model metrics") LAST. Capitalised "Summary" and "Training"
therefore come before the lower-case "datasets/<NAME>" sections (checked in the rendered UI by
tests/test_ui_browser.py).

The default store is SQLite at an *absolute* path under ``cfg.output_dir`` (Ray Tune changes the working directory
of each trial, so MLflow's relative default would scatter one database per trial). Metrics are written with
``log_batch`` because one SQLite metric write costs ~4 ms.
"""
from __future__ import annotations

import math
import os
import queue
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fomo_ray.trial_report import TrialStatus

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (what the UI groups child runs by)
TRIAL_TAG = "fomo_ray.trial_id"
KIND_TAG = "fomo_ray.kind"
REASON_TAG = "fomo_ray.failure_reason"
STOP_TAG = "fomo_ray.stop_reason"  # why the sweep's early-stopping rule ended a run
STATUS_TAG = "fomo_ray.status"  # finished | failed | stopped | interrupted
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
_BATCH = 1000  # MLflow's per-call limit for metrics; params/tags are limited to 100
_BATCH_PARAMS = 100
_INVALID_KEY_CHARS = re.compile(r"[^\w./\- :]")  # MLflow accepts alphanumerics, _ - . / space :
NOTE_TAG = "mlflow.note.content"  # the run's description in MLflow's UI (markdown)
VERSION_TAG = "fomo_ray.version"
COMMIT_TAG = "fomo_ray.git_commit"
ACTIVATION_TAG = "fomo_ray.quick_gelu"  # the activation the run's model was built with (backbones.activation_tags)
PLATFORM_TAG = "fomo_ray.platform"  # the CPU/GPU and kernels the run computed on (provenance.platform_label)
MLFLOW_COMMIT_TAG = "mlflow.source.git.commit"  # what MLflow's runs table shows as "Version"
PERCENT = 100.0  # metrics go to MLflow in percent, the unit of every report and table printout
SUMMARY = "Summary"  # sections of the run page's charts, see the module docstring for their order
TRAINING = "Training"
DATASETS = "datasets"
ZERO_SHOT_SUFFIX = "_zero_shot"  # the full test sets' scores at point 0 (see eval_metrics)
FULL = "Summary_full"  # the summary on the full test sets (at the ends): the section right after Summary
# a sweep's parent-run metrics: short section names, so the runs table's narrow columns (about 12 characters)
# still tell Best/A_KA from Best/A_ZS and Median/GM
BEST, MEDIAN, TRIALS = "Best", "Median", "Trials"
VARIANTS = "Variants"  # a multi-seed sweep's per-variant seed statistics on its parent run
TRAIN_KEYS = tuple(f"{TRAINING}/{k}" for k in ("loss", "lr", "grad_norm", "samples_per_s"))


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
def metric_key(dataset: str, metric: str, full: bool = False) -> str:
    """Per-dataset metric name, e.g. ``datasets/SHAPES/top1`` (``datasets_full/...`` on the full test sets); '@' of
    ``R@5`` becomes ``R_at_5`` (MLflow's key alphabet). Each dataset is a section of the run page, after Summary and
    Training."""
    section = f"{DATASETS}_full" if full else DATASETS
    return _INVALID_KEY_CHARS.sub("_", f"{section}/{dataset}/{metric.replace('@', '_at_')}")


def summary_key(name: str) -> str:
    """``A_KA`` -> ``Summary/A_KA``: the first section of the run page and the first columns of the study view."""
    return f"{SUMMARY}/{name}"


def as_percent(value: float) -> float:
    """A fraction as the percent MLflow shows, rounded to 0.01 (100 x 0.305 is 30.4999999... in floats)."""
    return round(PERCENT * float(value), 2)


def eval_metrics(records: Iterable[Mapping[str, Any]], summary: Mapping[str, float],
                 full: Mapping[str, float] | None = None, point: int = -1) -> dict[str, float]:
    """Flat ``{key: percent}`` for evaluation point ``point``: the summary on the fixed subsets (A_KA, A_ZS, GM,
    fractions in ``summary``: the trajectory) plus every subset record; where the full test sets were evaluated too,
    their summary under ``Summary_full/`` and their records under ``datasets_full/`` (never under the trajectory's
    names). The full sets' zero-shot point (``point`` 0) has names of its own (``..._zero_shot``): at the ends only
    (the default), the zero-shot and the final full-set scores are two single values, not a two-point line."""
    tail = ZERO_SHOT_SUFFIX if point == 0 else ""
    out = {summary_key(k): as_percent(v) for k, v in summary.items()}
    out.update({f"{FULL}/{k}{tail}": as_percent(v) for k, v in (full or {}).items()})
    for r in records:
        full_set = r.get("eval_set", "subset") == "full"
        key = metric_key(str(r["dataset"]), str(r["metric"]), full_set)
        out[key + tail if full_set else key] = as_percent(r["value"])
    return out


def sweep_metrics(finals: Mapping[str, Sequence[float]], counts: Mapping[str, int]) -> dict[str, float]:
    """A sweep's parent-run metrics: best and median over its finished trials of each final score (``finals``:
    ``{"GM": [fraction per trial], ...}``; the best A_KA and the best GM may come from different trials), in percent,
    and how many trials ended in each state (``counts``: finished, failed, ...)."""
    out: dict[str, float] = {}
    for name, values in finals.items():
        if len(values):
            out[f"{BEST}/{name}"] = as_percent(max(values))
            out[f"{MEDIAN}/{name}"] = as_percent(statistics.median(values))
    out.update({f"{TRIALS}/{state}": float(n) for state, n in counts.items()})
    return out


def variant_metrics(variants: Iterable[Mapping[str, Any]],
                    scores: Sequence[str] = ("final_GM", "mean_GM")) -> dict[str, float]:
    """A multi-seed sweep's parent-run metrics per variant (``variants``: rows of ``aggregate.variant_table`` with
    ``label``, ``<score>_mean``, ``<score>_ci``): ``Variants/<label>/<score>_mean`` and ``..._ci`` (the 95%
    confidence half-width) in percent, for the final and trajectory-mean GM. The label is put into MLflow's key
    alphabet (``/`` too, so a label is one section); NaN values (the interval of one seed) are left out."""
    out: dict[str, float] = {}
    for row in variants:
        label = _INVALID_KEY_CHARS.sub("_", str(row["label"])).replace("/", "_")[:120]
        for score in scores:
            for stat in ("mean", "ci"):
                value = row.get(f"{score}_{stat}")
                if value is not None and value == value:
                    out[f"{VARIANTS}/{label}/{score}_{stat}"] = as_percent(value)
    return out


def provenance_tags() -> dict[str, str]:
    """The code a run comes from (``provenance.code_version``) and the platform it computes on; the clean commit also
    as MLflow's own tag, which the UI shows as "Version"."""
    from fomo_ray.provenance import code_version, platform_label

    version, commit = code_version()
    tags = {VERSION_TAG: version, COMMIT_TAG: commit, PLATFORM_TAG: platform_label()}
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        tags[MLFLOW_COMMIT_TAG] = commit
    return tags


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

    def start_parent(self, sweep_name: str, tags: Mapping[str, str] = (), description: str = "") -> str:
        """The sweep's parent run (reused when the sweep is resumed); ``description`` (markdown) is its note in the
        UI."""
        found = self.find_run({KIND_TAG: "sweep", "fomo_ray.sweep": sweep_name})
        if found:
            self.client.update_run(found, status="RUNNING")
            self.set_tags(found, provenance_tags())  # the code that last wrote to the run
            return found
        note = {NOTE_TAG: description} if description else {}
        run = self.client.create_run(self.experiment_id, run_name=sweep_name,
                                     tags={KIND_TAG: "sweep", "fomo_ray.sweep": sweep_name, **dict(tags), **note,
                                           **provenance_tags()})
        return run.info.run_id

    def start_child(self, parent_run_id: str | None, trial_id: str, params: Mapping[str, Any],
                    tags: Mapping[str, str] = (), run_id: str | None = None, run_name: str = "",
                    config: Mapping[str, Any] | None = None) -> str:
        """A trial's run: ``run_id`` (from a checkpoint) or the trial's existing run (found by its trial id) is
        reopened, else created with the name ``run_name`` (default: the trial id), ``params`` and, as the artifact
        ``config.json``, the whole nested ``config`` (params hold only what applies to the run's method)."""
        if run_id is None:
            want = {TRIAL_TAG: trial_id, **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
            run_id = self.find_run(want)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, provenance_tags())
            return run_id
        all_tags = {TRIAL_TAG: trial_id, KIND_TAG: "trial", **dict(tags)}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        return self._create(run_name or trial_id, params, all_tags, config)

    def start_run(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str] = (),
                  config: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """A `fomo-ray run`'s own run (no parent; ``fomo_ray.kind=run``): ``run_id`` (kept in its run directory)
        is reopened when it resumes, else a new run is created as for a trial (:meth:`start_child`)."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, provenance_tags())
            return run_id
        return self._create(name, params, {KIND_TAG: "run", **dict(tags)}, config)

    def _create(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                config: Mapping[str, Any] | None) -> str:
        run_id = self.client.create_run(self.experiment_id, run_name=name,
                                        tags={**dict(tags), **provenance_tags()}).info.run_id
        self.log_params(run_id, params)
        if config is not None:
            self.client.log_dict(run_id, dict(config), "config.json")
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

    def finish(self, run_id: str, failure: str | None = None, status: str = "", stopped: str = "") -> None:
        """FINISHED, or FAILED with the reason as a tag (visible in the UI's run table), or ``status`` (e.g. KILLED
        for an interrupted sweep; reopened as RUNNING when it resumes). The trial status (finished, failed, stopped,
        interrupted) is also a tag, ``fomo_ray.status``. ``stopped``: why the sweep's early-stopping rule ended the
        run (MLflow has no such state: the run ends FINISHED, tagged ``stopped``, the reason in ``fomo_ray.stop_reason``)."""
        if failure:
            self.set_tags(run_id, {REASON_TAG: failure})
        if stopped:
            self.set_tags(run_id, {STOP_TAG: stopped})
        status = status or ("FAILED" if failure else "FINISHED")
        label = TrialStatus.STOPPED if stopped else {"FAILED": TrialStatus.FAILED,
                                                      "KILLED": TrialStatus.INTERRUPTED}.get(status, TrialStatus.FINISHED)
        self.set_tags(run_id, {STATUS_TAG: label})
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))

    # -------------------------------------------------------------------------------------------- reading back
    def children(self, parent_run_id: str) -> list[Any]:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10_000)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def logged_so_far(self, run_id: str) -> tuple[set[int], int]:
        """(evaluation points, newest training step) a run has logged: a run resumed from a checkpoint older than
        its last logged point repeats those steps and must not log them twice (MLflow appends, it never replaces)."""
        points = {s for s, _ in self.metric_history(run_id, summary_key("GM"))}
        steps = [s for s, _ in self.metric_history(run_id, TRAIN_KEYS[0])]
        return points, max(steps, default=-1)


class StepLogger:
    """The training signal of one run: loss, lr, the pre-clip gradient norm and samples/s of every step, buffered
    and sent every ``every`` steps in ONE ``log_batch`` call (MLflow takes up to 1000 metrics a call, i.e. 250
    steps; a SQLite write costs ~4 ms, too much per step). Call :meth:`flush` before anything else is logged (an
    evaluation point) and when the run ends, so the tail is not lost.

    Off the training thread: :meth:`step` only appends a row (``loss`` and ``grad_norm`` may be 0-d tensors still on
    the accelerator, queued by the loop without reading them); every ``every`` steps the rows go to a background
    thread, which reads the tensors (waiting for those steps there, not in the training loop) and writes them. An
    error of that thread is raised on the training thread by the next :meth:`flush`. ``background=False`` writes
    on the calling thread instead (same batches, same order).

    samples/s = the global batch over the wall time since the previous step; it is left out for the first step of a
    task or after a resume (the time since the previous step then holds an evaluation or the restart), but includes
    a mid-task checkpoint written between two steps (the run really spent that time). Rows after the first
    non-finite loss are dropped: those steps trained on the weights a diverged step left (the loop then fails the run
    naming that step, ``loop.TrainingDiverged``), and their numbers would only draw a misleading curve. Steps up to
    ``logged_up_to``, which a resumed run repeats, are not sent again."""

    def __init__(self, tracker: Tracker, run_id: str, every: int, global_batch: int,
                 clock: Any = time.perf_counter, background: bool = True, logged_up_to: int = -1):
        self.tracker, self.run_id, self.every, self.global_batch = tracker, run_id, every, global_batch
        self.logged_up_to = logged_up_to  # a resumed run's steps up to this global step are in MLflow already
        self.clock = clock
        self.rows: list[tuple[int, int, Any, float, Any, float | None]] = []
        self.previous: tuple[int, int, float] | None = None  # (task, step, clock) of the step before
        self.background = background
        self.diverged = False  # a non-finite loss was written: later rows are dropped
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def step(self, task: int, step: int, loss: Any, lr: float, grad_norm: Any, global_step: int) -> None:
        now = self.clock()
        if global_step <= self.logged_up_to:
            self.previous = (task, step, now)
            return
        rate = None
        if self.previous is not None and self.previous[:2] == (task, step - 1) and now > self.previous[2]:
            rate = self.global_batch / (now - self.previous[2])
        self.previous = (task, step, now)
        self.rows.append((int(global_step), int(time.time() * 1000), loss, float(lr), grad_norm, rate))
        if len(self.rows) >= self.every:
            self._send()

    def _send(self) -> None:
        rows, self.rows = self.rows, []
        if not rows:
            return
        if not self.background:
            self._write(rows)
            return
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name=f"fomo_ray-steps-{self.run_id[:8]}", daemon=True)
            self._thread.start()
        self._queue.put(rows)

    def _work(self) -> None:
        while True:
            rows = self._queue.get()
            try:
                if rows is None:
                    return
                if self._error is None:
                    self._write(rows)
            except BaseException as e:  # noqa: BLE001 - raised on the training thread by flush()
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, rows: list[tuple[int, int, Any, float, Any, float | None]]) -> None:
        loss_key, lr_key, norm_key, rate_key = TRAIN_KEYS
        items = []
        for g, ts, loss, lr, norm, rate in rows:
            if self.diverged:
                break
            loss = float(loss)  # a device tensor is read here, off the training thread
            self.diverged = not math.isfinite(loss)
            items += [Metric(loss_key, loss, ts, g), Metric(lr_key, lr, ts, g)]
            if norm is not None:
                items.append(Metric(norm_key, float(norm), ts, g))
            if rate is not None:
                items.append(Metric(rate_key, rate, ts, g))
        for chunk in _chunks(items, _BATCH):
            self.tracker.client.log_batch(self.run_id, metrics=list(chunk))

    def wait(self) -> None:
        """Wait until every batch sent so far is written (the rows not yet sent stay); raise the writer's error."""
        if self._queue is not None:
            self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def flush(self) -> None:
        """Send the buffered rows and wait until everything is written."""
        self._send()
        self.wait()

    def close(self) -> None:
        """:meth:`flush`, then stop the background thread."""
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = self._queue = None


def tracker_for(cfg: Any) -> Tracker:
    """The tracker a config asks for (URI resolved as in :func:`resolve_uri`)."""
    # a local database keeps its artifacts beside it (Tracker's default); a tracking server decides for itself
    return Tracker(resolve_uri(cfg.tracking.uri, cfg.output_dir), cfg.tracking.experiment)


# --------------------------------------------------------------------------------------------------- reading a run
def _reader(uri: str, run_id: str) -> MlflowClient:
    """A client for reading ``run_id`` back (``fomo_ray.results.export``); a missing SQLite file or an unknown run
    raises TrackingError naming both (MLflow would create an empty database instead)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise TrackingError(f"MLflow tracking URI {uri!r}: no database at {uri[len('sqlite:///'):]}")
    check_reachable(uri, create=False)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"MLflow run {run_id!r} not found at {uri!r}: {str(e).splitlines()[0]}") from e
    return client


def run_params(uri: str, run_id: str) -> dict[str, str]:
    """The params of an MLflow run (a trial's flat config, values as strings)."""
    return dict(_reader(uri, run_id).get_run(run_id).data.params)


def download_run_artifacts(uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path | None:
    """Download the artifact directory (or file) ``artifact_path`` of a run into ``dst``; ``None`` when the run has
    no such artifact."""
    client = _reader(uri, run_id)
    parent = artifact_path.rstrip("/").rpartition("/")[0]
    listed = {f.path for f in client.list_artifacts(run_id, parent or None)}
    if artifact_path.rstrip("/") not in listed:
        return None
    return Path(client.download_artifacts(run_id, artifact_path.rstrip("/"), str(dst)))
