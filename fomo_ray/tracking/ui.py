"""The MLflow UI: the study views (saved views of the runs table, experiment tags a sweep or run writes once,
:func:`ensure_views`), the server command `fomo-ray ui` runs and the pages it prints. The writer of runs is
``writer.py``. `fomo-ray ui` calls this module in a short-lived helper process, so its own process never imports
MLflow."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fomo_ray.tracking.writer import (ARTIFACT_DIR, BEST, KIND_TAG, MEDIAN, STATUS_TAG, TRIALS, TrackingError,
                                      check_reachable, resolve_uri, summary_key)
from fomo_ray.trial_report import SCORES, TrialStatus


# --------------------------------------------------------------------------------------------------- study views
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow 3 keeps the runs table's saved views as experiment tags
TRIALS_VIEW = "fomo_ray-trials"
SWEEPS_VIEW = "fomo_ray-sweeps"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the runs table's column ids: metrics.`A`, params.`p`, tags.`t`, attributes.`Version`


def study_views() -> dict[str, tuple[str, dict[str, Any]]]:
    """``{view id: (name, state)}``: the runs table as the study reads it. MLflow's default table shows no metric
    column and folds a sweep's trials under its parent run; these views list the trials (and `fomo-ray run` runs)
    with A_KA, A_ZS, GM first, then what varies, and the sweeps with their best / median scores and counts.
    ``state`` is MLflow 3.17's view state: the columns (``columnOrder`` puts the metrics before the params) and the
    search facets (``searchFilter``), as its "Save view" writes them."""
    trial_cols = [*(_column("metrics", summary_key(k)) for k in SCORES),
                  _column("params", "variant"), _column("params", "method.name"),
                  _column("tags", STATUS_TAG), _column("attributes", "Version")]
    sweep_cols = [*(_column("metrics", f"{stat}/{k}") for stat in (BEST, MEDIAN) for k in SCORES),
                  *(_column("metrics", f"{TRIALS}/{s}") for s in (TrialStatus.FINISHED, TrialStatus.FAILED)),
                  _column("params", "sweep.trials"), _column("tags", STATUS_TAG), _column("attributes", "Version")]
    return {
        TRIALS_VIEW: ("fomo_ray: trials (A_KA, A_ZS, GM in %)", {
            "selectedColumns": trial_cols, "columnOrder": trial_cols,
            "searchFilter": f"tags.`{KIND_TAG}` != 'sweep'",
            # sorted by anything but the creation time, the table lists runs flat instead of folding a sweep's
            # trials under its parent (which it then shows although the filter excludes it)
            "orderByKey": _column("metrics", summary_key("GM")), "orderByAsc": False}),
        SWEEPS_VIEW: ("fomo_ray: sweeps (best / median over finished trials, %)", {
            "selectedColumns": sweep_cols, "columnOrder": sweep_cols,
            "searchFilter": f"tags.`{KIND_TAG}` = 'sweep'"}),
    }


def ensure_views(client: MlflowClient, experiment_id: str) -> None:
    """Set each study view's experiment tag unless it already holds the same state (keeping its creation time)."""
    tags = client.get_experiment(experiment_id).tags
    now = int(time.time() * 1000)
    for view_id, (name, state) in study_views().items():
        key, text = VIEW_TAG_PREFIX + view_id, json.dumps(state, sort_keys=True)
        try:
            old = json.loads(tags.get(key, ""))
        except ValueError:
            old = {}
        if old.get("name") == name and old.get("state") == text:
            continue
        envelope = {"name": name, "createdAt": old.get("createdAt", now), "updatedAt": now, "state": text}
        client.set_experiment_tag(experiment_id, key, json.dumps(envelope))



# --------------------------------------------------------------------------------------------------- the server
# MLflow 3 opens a new browser on its GenAI pages (the workflow it remembers is per browser): every page fomo-ray ui
# prints carries the training workflow (what the "Model training" switch at the top left selects)
WORKFLOW = "workflowType=machine_learning"
HOME_PATH = f"/#/?{WORKFLOW}"


def runs_path(experiment_id: str | None, view: str = TRIALS_VIEW) -> str:
    """The UI's page for an experiment's runs table in the training workflow, opened on ``view``
    (``#/experiments/<id>/runs``: MLflow 3 otherwise opens an experiment on its GenAI overview); "/" without one."""
    if not experiment_id:
        return HOME_PATH
    return f"/#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={view}"


def prepare_ui(configured_uri: str, output_dir: str, experiment: str, port: int,
               write: bool = True) -> dict[str, Any]:
    """What `fomo-ray ui` needs from the store, computed in a short-lived process (importing MLflow would cost the
    long-lived UI process ~200 MB): the resolved URI, the server command and the path of the runs page of
    ``experiment`` ("/" when the store has none). ``write`` makes sure that experiment has the study views (a dry
    run writes nothing). ``{"error": ...}`` when there is no store at the URI."""
    try:
        uri = resolve_uri(configured_uri, output_dir)
    except TrackingError as e:
        return {"error": str(e)}
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return {"error": f"no MLflow database at {uri[len('sqlite:///'):]} (run a sweep first, or pass --uri)"}
    experiment_id = None
    if write:
        try:
            check_reachable(uri, create=False)
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
                ensure_views(client, experiment_id)
        except (TrackingError, MlflowException) as e:
            return {"error": f"MLflow tracking URI {uri!r}: {str(e).splitlines()[0]}"}
    return {"uri": uri, "command": ui_command(uri, port, Path(output_dir) / ARTIFACT_DIR),
            "path": runs_path(experiment_id),
            "also": [*([["sweeps", runs_path(experiment_id, SWEEPS_VIEW)]] if experiment_id else []),
                     ["home", HOME_PATH]]}


def ui_command(uri: str, port: int, artifact_root: str | Path | None) -> list[str]:
    """``mlflow server`` bound to loopback with one worker (a few hundred MB instead of ~2 GB for the defaults;
    docs/TRACKING.md gives the measured figure)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        cmd += ["--default-artifact-root", Path(artifact_root).expanduser().resolve().as_uri()]
    return cmd
