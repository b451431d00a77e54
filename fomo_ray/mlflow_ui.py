"""The MLflow UI as `fomo-ray ui` serves it: the server command and the page it opens (the study views themselves
are experiment tags the tracker writes, ``tracking.study_views``). Run in a short-lived helper process, so the UI's
own process never imports MLflow."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fomo_ray.tracking import (ARTIFACT_DIR, SWEEPS_VIEW, TRIALS_VIEW, TrackingError, check_reachable, ensure_views,
                               resolve_uri)


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
