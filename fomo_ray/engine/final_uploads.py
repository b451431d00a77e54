"""A finished run's MLflow uploads, off the trial's critical path: the final checkpoint is recorded as a pointer
(``fomo_ray.final_checkpoint``), the deployed model (and, unless the state lives on shared storage, the final state)
is uploaded, and an upload that fails after training finished is recorded (``fomo_ray.upload_pending`` /
``fomo_ray.upload_error``) and retried later (:func:`retry_uploads`, :func:`retry_pending_uploads`), never failing a
run whose results are in."""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

from fomo_ray.config import ExperimentConfig
from fomo_ray.engine.scratch import scratch_dir

EXPORT_ERROR_TAG = "fomo_ray.export_error"  # why a finished run's deployed model could not be logged
FINAL_CHECKPOINT_TAG = "fomo_ray.final_checkpoint"  # the URI of the final checkpoint Ray persisted (a pointer)
UPLOAD_PENDING_TAG = "fomo_ray.upload_pending"  # comma-separated MLflow uploads still to do: checkpoints/final, model
UPLOAD_ERROR_TAG = "fomo_ray.upload_error"  # why the last try of those uploads failed
FINAL_ARTIFACT = "checkpoints/final"
MODEL_UPLOAD = "model"


def checkpoint_uri(ckpt: Any) -> str:
    """Where a (persisted) Ray checkpoint lives, as a path or ``scheme://path`` URI; "" without one."""
    if ckpt is None:
        return ""
    fs = getattr(ckpt, "filesystem", None)
    scheme = getattr(fs, "type_name", "local") if fs is not None else "local"
    return str(ckpt.path) if scheme in ("local", "") else f"{scheme}://{ckpt.path}"


def upload_final(run: Any, cfg: ExperimentConfig, run_name: str, state_dir: str | Path,
                 uploads: list[str]) -> list[str]:
    """Do ``uploads`` to ``run`` (a :class:`~fomo_ray.tracking.tracked_run.TrackedRun`) (``checkpoints/final``, ``model``) of a finished run from its final checkpoint directory and
    update its ``fomo_ray.upload_pending`` / ``fomo_ray.upload_error`` tags; returns what is still pending. Never
    raises: the run's results are in already."""
    pending, errors = [], []
    for what in uploads:
        try:
            if what == FINAL_ARTIFACT:
                # the final state only: one full state per task and trial would multiply the store's size by T
                run.log_artifacts(state_dir, artifact_path=FINAL_ARTIFACT)
            elif not log_deployed_model(run, cfg, run_name, str(state_dir)):
                raise RuntimeError(f"the deployed model was not logged (tag {EXPORT_ERROR_TAG})")
        except Exception as e:  # noqa: BLE001 - see the docstring
            pending.append(what)
            errors.append(f"{what}: {type(e).__name__}: {e}")
    try:
        if pending:
            warn(run_name, f"MLflow upload(s) failed and will be retried ({'; '.join(errors)})")
            run.set_tags({UPLOAD_PENDING_TAG: ",".join(pending), UPLOAD_ERROR_TAG: "; ".join(errors)})
        else:
            for tag in (UPLOAD_PENDING_TAG, UPLOAD_ERROR_TAG):
                with contextlib.suppress(Exception):
                    run.delete_tag(tag)
    except Exception as e:  # noqa: BLE001
        warn(run_name, f"its pending uploads could not be recorded in MLflow ({type(e).__name__}: {e})")
    return pending


def retry_uploads(run: Any) -> list[str]:
    """Retry the pending MLflow uploads of a finished ``run`` (a ``TrackedRun``) (tag ``fomo_ray.upload_pending``) from the final checkpoint
    its ``fomo_ray.final_checkpoint`` tag points at (with the ``config.json`` there); returns what is still
    pending. A run without pending uploads costs one read. Never raises."""
    try:
        tags = run.tags()
        uploads = [u for u in tags.get(UPLOAD_PENDING_TAG, "").split(",") if u]
        if not uploads:
            return []
        uri = tags.get(FINAL_CHECKPOINT_TAG, "")
        if not uri:
            raise FileNotFoundError("the run has no fomo_ray.final_checkpoint tag")
        from fomo_ray.config import load_config

        with _checkpoint_directory(uri) as d:
            cfg = load_config(Path(d, "config.json"))
            return upload_final(run, cfg, tags.get("mlflow.runName", run.run_id), d, uploads)
    except Exception as e:  # noqa: BLE001
        warn(run.run_id, f"pending MLflow uploads not retried ({type(e).__name__}: {e})")
        return ["?"]


def retry_pending_uploads(tracker: Any, parent_run_id: str | None = None) -> dict[str, list[str]]:
    """:func:`retry_uploads` for every run of the tracker's experiment (or the children of ``parent_run_id``, a
    sweep) tagged ``fomo_ray.upload_pending``: run id -> what is still pending (empty lists: done now)."""
    flt = f"tags.`{UPLOAD_PENDING_TAG}` != ''"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=flt, max_results=10_000)
    from fomo_ray.tracking.tracked_run import TrackedRun

    return {r.info.run_id: retry_uploads(TrackedRun(tracker, r.info.run_id, resumed=False)) for r in runs}


@contextlib.contextmanager
def _checkpoint_directory(uri: str):
    """A local directory with the files of the checkpoint at ``uri`` (a path, or a URI Ray's storage reads)."""
    if "://" not in uri and Path(uri).is_dir():
        yield uri
        return
    from ray.train import Checkpoint

    with Checkpoint(uri).as_directory() as d:
        yield d


def warn(run: str, message: str) -> None:
    print(f"run {run!r}: {message}", file=sys.stderr, flush=True)


def log_deployed_model(run: Any, cfg: ExperimentConfig, run_name: str, state_dir: str) -> bool:
    """Log the deployed model of a finished run, read from its final task-end state, as the MLflow artifact directory
    ``model/`` in open_clip's format (``fomo_ray.results.export``). The results are in already: a failure here is
    reported (a warning line and the ``fomo_ray.export_error`` tag; False) and never fails the run."""
    from fomo_ray.core import checkpoint
    from fomo_ray.results import export

    tmp = scratch_dir("fomo_model_")
    try:
        if export.is_deployed_form(state_dir):  # a final state already trimmed to its export (ray.keep_after_run)
            run.log_artifacts(str(Path(state_dir, export.DEPLOYED_DIR)), artifact_path=export.MODEL_ARTIFACT)
            return True
        state = checkpoint.load_state(state_dir)
        export.save_open_clip(tmp, cfg, export.deployed_state(cfg, state), run=run_name,
                              source=f"final task-end state of MLflow run {run.run_id}")
        run.log_artifacts(tmp, artifact_path=export.MODEL_ARTIFACT)
        return True
    except Exception as e:  # noqa: BLE001 - see the docstring
        reason = f"{type(e).__name__}: {e}"
        print(f"run {run_name!r}: its deployed model was not logged to MLflow ({reason})", file=sys.stderr,
              flush=True)
        run.set_tags({EXPORT_ERROR_TAG: reason})
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def settle_ended(run: Any, cfg: ExperimentConfig, run_name: str, root: str) -> None:
    """Trim the checkpoints of an ended trial under ``root`` (``retention.settle``, ``ray.keep_after_run``), sharing
    the export's weights with the run's MLflow ``model/`` artifact where both are local files. Never raises: the
    run's results are in; a failure leaves its checkpoints as they are, with a warning line."""
    from fomo_ray.results import retention
    from fomo_ray.results.export import MODEL_ARTIFACT

    try:
        mlflow_model = None
        if run is not None:
            mlflow_model = retention.local_artifact_dir(run.artifact_uri(), MODEL_ARTIFACT)
        retention.settle(root, cfg.ray.keep_after_run, cfg, run_name, mlflow_model)
    except Exception as e:  # noqa: BLE001 - see the docstring
        warn(run_name, f"its checkpoints were kept whole ({type(e).__name__}: {e})")
