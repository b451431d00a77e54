"""One continual run in this process (plain PyTorch, no Ray): what ``fomo-ray run`` and ``fomo_ray.run`` execute.

``execute_run(cfg)`` prepares missing inputs, runs the loop with task-end states saved for ``--resume``, logs to MLflow
when ``tracking.enabled`` (:func:`open_tracked_run`), saves the tidy results and exports the deployed model in open_clip's
format. A run refused for bad input leaves no run directory; a diverged one leaves ``FAILED.json``.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable
from pathlib import Path

import pandas as pd

from fomo_ray.config import ExperimentConfig
from fomo_ray.trial_report import TrialStatus


def input_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input (config, data, backbone, budget, merge, evaluation, pretraining), not a
    bug: the command prints them in one line instead of a traceback."""
    from fomo_ray.models.backbones import BackboneError
    from fomo_ray.budgets.budget import BudgetError
    from fomo_ray.config import ConfigError
    from fomo_ray.data.format import DataError
    from fomo_ray.models.evaluation import EvaluationError
    from fomo_ray.maths.merge_ops import MergeError
    from fomo_ray.prep.pretrain import PretrainError

    return ConfigError, DataError, BackboneError, BudgetError, MergeError, EvaluationError, PretrainError


def tracking_errors(cfg) -> tuple[type[Exception], ...]:
    """An unusable MLflow store (``tracking.uri``) is bad input too, named in one line (MLflow is imported only for a
    tracked run)."""
    if not cfg.tracking.enabled:
        return ()
    from fomo_ray.tracking.writer import TrackingError

    return (TrackingError,)


RUN_META = "mlflow_run.json"  # the run's MLflow id, in its run directory: --resume continues the same MLflow run


def open_tracked_run(cfg, out: Path, resumed: bool) -> Any:
    """A `fomo-ray run` in MLflow (``tracking.enabled``): one run (``fomo_ray.kind=run``) with a sweep trial's view:
    the settings that apply to its method as params, the whole config as ``config.json``, metrics in percent per
    evaluation point and the training signal every ``tracking.log_every_n_steps`` steps (a
    :class:`~fomo_ray.tracking.tracked_run.TrackedRun`)."""
    import json

    from fomo_ray.atomic import write_json
    from fomo_ray.config import to_dict
    from fomo_ray.methods import applicable_params
    from fomo_ray.models.backbones import activation_tags
    from fomo_ray.tracking.tracked_run import TrackedRun
    from fomo_ray.tracking.ui import ensure_views
    from fomo_ray.tracking.writer import tracker_for

    tracker = tracker_for(cfg)
    ensure_views(tracker.client, tracker.experiment_id)  # the runs table as the study reads it
    meta = out / RUN_META
    previous = json.loads(meta.read_text()).get("run_id") if resumed and meta.is_file() else None
    run = TrackedRun.open_run(tracker, cfg, out.name, applicable_params(cfg), to_dict(cfg),
                              {"fomo_ray.config_hash": cfg.config_hash(), **activation_tags(cfg)}, run_id=previous)
    write_json(meta, {"run_id": run.run_id, "tracking_uri": tracker.uri}, indent=2)
    return run


def tracked_hooks(hooks: Any, run: Any, cfg: ExperimentConfig) -> Any:
    """``hooks`` plus the run's logging: every evaluation point (on the stream's axis: joint's one point at T) and
    the training steps."""
    import dataclasses

    from fomo_ray.core.assembly import stream_step
    from fomo_ray.models.metrics import point_summary

    inner = hooks.on_eval

    def on_eval(point, records):
        if inner is not None:
            inner(point, records)
        run.log_point(stream_step(cfg, point), point, records, point_summary(records), point_summary(records, "full"))

    return dataclasses.replace(hooks, on_eval=on_eval, on_step=run.on_step if run.steps is not None else hooks.on_step)


@dataclass(frozen=True)
class RunOutput:
    directory: Path           # <output_dir>/<run name>
    results: pd.DataFrame     # the tidy results (run, point, dataset, role, metric, value, eval_set)
    results_file: Path
    model_dir: Path | None    # the deployed model in open_clip's format (None if the export failed)
    export_error: str = ""


def with_progress(hooks: Any, points: int, say: Callable[[str], None]) -> Any:
    """``hooks`` plus one line per evaluation point, as a sweep prints its trials' (``[mm:ss] point t/T  A_KA ...``)."""
    import dataclasses

    from fomo_ray.models.metrics import point_summary
    from fomo_ray.trial_report import point_line

    t0, inner = time.time(), hooks.on_eval

    def on_eval(point, records):
        if inner is not None:
            inner(point, records)
        el = int(time.time() - t0)
        say(f"[{el // 60:02d}:{el % 60:02d}] {point_line(point, points, point_summary(records))}")

    return dataclasses.replace(hooks, on_eval=on_eval)


def execute_run(cfg: ExperimentConfig, resume: bool = False, device: str | None = None,
                progress: Callable[[str], None] | None = None) -> RunOutput:
    """Run ``cfg`` (continuing ``<run dir>/state`` when ``resume``). Raises the input errors (:func:`input_errors`,
    :func:`tracking_errors`) with nothing of the run left behind, and ``TrainingDiverged`` after writing
    ``FAILED.json``; the MLflow run is never left RUNNING. ``progress`` gets a line per evaluation point."""
    from fomo_ray.core.assembly import check_named_files, run_name
    from fomo_ray.atomic import write_json
    from fomo_ray.core.checkpoint import LOOP_STATE_FILE, load_state, save_state_in_background, wait_for_write
    from fomo_ray.config import to_dict
    from fomo_ray.core.loop import RunHooks, TrainingDiverged, run_stream
    from fomo_ray.models.metrics import save_results
    from fomo_ray.prep import ensure_inputs

    check_named_files(cfg)  # a typo in a file name is refused before anything is prepared or written
    out = Path(cfg.output_dir) / run_name(cfg)
    # a run refused for bad input must leave nothing behind: not its directory, nor the output directory made for it
    created = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg), indent=2, sort_keys=True)
    state = load_state(out / "state") if resume and (out / "state" / LOOP_STATE_FILE).is_file() else None
    # task-end states for --resume, written in the background (atomically: a crash leaves the previous one); the
    # next snapshot waits for the write before it, and the run for the last one before it ends
    hooks = RunHooks(on_checkpoint=lambda s: save_state_in_background(s, out / "state"))
    mlrun = None  # the run in MLflow (tracking.enabled), opened once the inputs are ready
    try:
        ensure_inputs(cfg)
        if cfg.tracking.enabled:
            mlrun = open_tracked_run(cfg, out, resumed=state is not None)
            hooks = tracked_hooks(hooks, mlrun, cfg)
        if progress is not None:
            from fomo_ray.core.assembly import planned_tasks

            hooks = with_progress(hooks, planned_tasks(cfg), progress)
        try:
            df = run_stream(cfg, hooks=hooks, resume=state, device=device)
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to report
                wait_for_write(run_name(cfg))
            raise
        wait_for_write(run_name(cfg))
    except TrainingDiverged as e:
        write_json(out / "FAILED.json", {"status": TrialStatus.FAILED, "task": e.task, "step": e.step, "error": str(e)},
                   indent=2, sort_keys=True)
        if mlrun is not None:
            mlrun.finish(failure=f"{type(e).__name__}: {e}")
        raise
    except (*input_errors(), *tracking_errors(cfg)) as e:
        if mlrun is not None:
            mlrun.finish(failure=f"{type(e).__name__}: {e}")
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    except BaseException as e:  # a bug or Ctrl-C: the MLflow run must not stay RUNNING
        if mlrun is not None:
            mlrun.finish(status="KILLED") if isinstance(e, KeyboardInterrupt) else mlrun.finish(
                failure=f"{type(e).__name__}: {e}")
        raise
    if mlrun is not None:
        mlrun.finish()
    path = save_results(df, out / "results.parquet")
    from fomo_ray.results.export import ExportError, export

    try:  # what the run deploys after its last task, for open_clip
        return RunOutput(out, df, path, export(out, out / "model", config=cfg))
    except ExportError as e:  # the results stand; the export can be redone on its own
        return RunOutput(out, df, path, None, str(e))
