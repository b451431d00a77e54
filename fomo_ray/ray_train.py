"""One continual run under Ray: the loop of ``loop.py``, unchanged, inside a Ray Train worker (the only
``ray.train`` import).

Two ways to host a run, sharing :func:`continual_run`:

* :func:`fit_train_run` -- a Ray Train ``TorchTrainer`` (Train V2, ray 2.60): CPU workers locally, GPU workers
  with DDP on clusters (the loop shards each global batch over the ranks: ``fomo_ray/distributed.py``), optional
  elastic ``(min, max)`` worker counts, worker restarts from ``ray.train.FailureConfig``.
  Inside a Ray Tune trial it is launched from the trial's function (``Tuner(trainer)`` no longer exists) and forwards
  results with ``TuneReportCallback``; the Train run is named after the Tune trial id, so relaunching a trial with the
  same name and storage path resumes the Train run from its latest checkpoint.
* the plain Tune function trainable of ``tune_sweep.py`` for runs of one worker and <= 1 GPU (no Train controller, so
  trials start in ~1 s and fractional GPUs pack several trials per device).

The worker makes sure the run's inputs exist first (``fomo_ray.prep.ensure_inputs``, rank 0 before the others), so
a node without the sweep driver's data builds its own copy; the loop itself never builds inputs.

A trial talks to the sweep driver through the report protocol of ``trial_report.py``.

A checkpoint is a directory: ``checkpoint.save_state`` output (weights, method state, optimizer/scheduler state
mid-task, RNG states, stream cursor) plus ``fomo_ray_run.json`` with the MLflow run id, so a restarted worker continues
exactly where the checkpoint was taken *and* logs into the same MLflow run. It is reported at the end of every task
and every ``ray.checkpoint_every_steps`` steps.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import ray

from fomo_ray import trial_report
from fomo_ray.config import ExperimentConfig
from fomo_ray.trial_report import ReportKind

# ray.train (and TorchTrainer, which imports torch) are imported where used: a plain Tune function trial never
# needs them, and eight such trials starting on two cores should not each pay seconds of imports. The loop, the
# checkpoint module and the input preparation are imported where used too, and always called through their module
# (``loop.run_stream``), never bound at import, so what runs is looked up when it runs.

CHECKPOINT_TAG = "fomo_ray.checkpoint_uri"  # where Ray keeps this run's newest ray.keep_checkpoints checkpoints
RESUMED_TAG = "fomo_ray.resumed_from"  # the cursor a restarted worker continued from
WORLD_TAG = "fomo_ray.world_size"  # data-parallel workers of the (latest) attempt
NODES_TAG = "fomo_ray.worker_nodes"  # the Ray node of each rank of the (latest) attempt, in rank order
RUN_META = "fomo_ray_run.json"  # beside the loop's own files in every checkpoint directory
STATUS_FILE = "fomo_ray_status.json"  # only in the final checkpoint: how the run ended
EXPORT_ERROR_TAG = "fomo_ray.export_error"  # why a finished run's deployed model could not be logged


class RunFailed(RuntimeError):
    """A run ended without finishing its stream (Ray gave up after max_failures, or it diverged)."""


class RunDiverged(RunFailed):
    """The run failed deterministically (its ``failed`` report): retrying cannot help. ``evals``: the evaluation
    reports it made before (a TorchTrainer's, from its result), so a sweep can keep them."""

    def __init__(self, message: str, evals: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.evals = list(evals or [])


@dataclass(frozen=True)
class RunPayload:
    """Everything the process that runs the loop needs (picklable; travels to Ray workers)."""
    cfg: ExperimentConfig
    run_name: str
    tracking_uri: str = ""            # "" = no MLflow logging
    mlflow_run_id: str = ""           # the trial's run, created by the driver; a checkpoint's id wins on resume
    log_checkpoints: bool = True
    storage_uri: str = ""             # where Ray persists this run's checkpoints (a pointer for MLflow)
    stopping: Mapping[str, Any] | None = None  # the sweep's early-stopping rule (``stopping.StoppingRule`` fields)
    stop_board: str = ""              # the name of the sweep's board actor the rule is asked through


class Session(Protocol):
    """What :func:`continual_run` needs from its host (Ray Train worker or Tune function)."""
    rank: int
    world_size: int

    def get_checkpoint(self) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None: ...


# --------------------------------------------------------------------------------------------------- pure helpers
def checkpoint_position(state: Any) -> tuple[int, int, bool]:
    """(task, step, at_boundary) of a LoopState. Its cursor is the *next* (task, step) to run, so a task-end
    checkpoint after task t reads (t + 1, 0) with no optimizer state (the next task starts a fresh AdamW)."""
    task, step = int(state.task), int(state.step)
    return task, step, step == 0 and getattr(state, "optimizer", None) is None


def checkpoint_name(task: int, step: int) -> str:
    """Deterministic, sortable checkpoint directory name from the cursor (never a timestamp)."""
    return f"cursor_t{task:03d}_s{step:07d}"


def write_run_meta(directory: str | Path, mlflow_run_id: str, run_name: str) -> None:
    Path(directory, RUN_META).write_text(json.dumps({"mlflow_run_id": mlflow_run_id, "run_name": run_name}))


def read_run_meta(directory: str | Path) -> dict[str, str]:
    path = Path(directory, RUN_META)
    return json.loads(path.read_text()) if path.is_file() else {}


def set_threads(cpus: float) -> None:
    """Pin torch's intra-op threads to the CPUs the worker reserved: the same thread count gives the same float
    reduction order, which bitwise-exact resume relies on (and it stops oversubscription on shared nodes)."""
    n = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)  # read by torch at import
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


# --------------------------------------------------------------------------------------------------- the run body
class _Bridge:
    """The loop's hooks on one host: per-point reports to the session, MLflow logging (rank 0: evaluation points
    and, every ``tracking.log_every_n_steps`` steps, the training signal), checkpoints (rank 0 writes, every rank
    reports)."""

    def __init__(self, p: RunPayload, session: Session, run_id: str, tracker: Any):
        self.p, self.session, self.run_id, self.tracker = p, session, run_id, tracker
        self.rank0 = session.rank == 0
        # the final evaluation point, never a stopping point (only needed, and only built, under a stopping rule)
        self.last_point = planned_tasks(p.cfg) if p.stopping else 0
        self.last: dict[str, Any] = {}  # newest A_KA/A_ZS/GM, carried in every report (searchers read the last one)
        self.kept: list[str] = []  # the newest task-end checkpoint directory (rank 0), reused for the final report
        self.steps = None  # the per-step training signal (tracking.StepLogger): rank 0, when tracked and asked for
        self.trajectory: list[float] = []  # the stopping rule's metric at every evaluation point so far
        self.stop_reason = ""  # the board's answer at the newest point ("" = go on); rank 0 asks, the loop agrees
        self.stopped = False   # the loop left early because of it
        if tracker is not None and p.cfg.tracking.log_every_n_steps > 0:
            from fomo_ray.tracking import StepLogger

            self.steps = StepLogger(tracker, run_id, p.cfg.tracking.log_every_n_steps, p.cfg.mixture.batch_size)

    def on_step(self, task: int, step: int, loss: float, lr: float, grad_norm: Any, global_step: int) -> None:
        if self.steps is not None:
            self.steps.step(task, step, loss, lr, grad_norm, global_step)

    def flush_steps(self) -> None:
        """Send the buffered training steps (before an evaluation point, at a checkpoint, at the end)."""
        if self.steps is not None:
            self.steps.flush()

    def on_eval(self, task: int, records: list[Mapping[str, Any]]) -> None:
        from fomo_ray.metrics import point_summary

        summary = point_summary(records)
        full = point_summary(records, "full")  # {} where only the subsets were evaluated
        self.last.update(summary)
        if self.tracker is not None:
            from fomo_ray.tracking import eval_metrics

            self.flush_steps()
            # percent, as the reports; the session's report below keeps fractions (the results tables' unit)
            self.tracker.log_metrics(self.run_id, eval_metrics(records, summary, full), step=task)
        self.session.report({**trial_report.eval_report(task, records, summary, full), "node_id": _node_id()},
                            None, None)
        self._post(task, summary)

    def seed_trajectory(self, results: list[Mapping[str, Any]]) -> None:
        """The points a resumed run evaluated before its checkpoint, so the rule sees its whole trajectory."""
        from fomo_ray.metrics import point_summary

        rule = self.p.stopping
        if rule:
            points = sorted({int(r["task"]) for r in results})
            self.trajectory = [point_summary([r for r in results if int(r["task"]) == t])[rule["metric"]]
                               for t in points]  # (the subsets: the trajectory)

    def _post(self, point: int, summary: Mapping[str, float]) -> None:
        """Ask the sweep's stopping rule at a task boundary (rank 0: the loop agrees across ranks)."""
        rule = self.p.stopping
        if not rule:
            return
        self.trajectory.append(summary[rule["metric"]])
        if self.rank0 and rule["min_tasks"] <= point < self.last_point:
            from fomo_ray import stop_board
            from fomo_ray.stopping import trajectory_mean

            self.stop_reason = stop_board.ask(self.p.stop_board, self.p.run_name, point,
                                              trajectory_mean(self.trajectory))

    def should_stop(self) -> bool:
        if self.stop_reason:
            self.stopped = True
        return bool(self.stop_reason)

    def on_checkpoint(self, state: Any) -> None:
        from fomo_ray import checkpoint

        self.flush_steps()  # every step before a checkpoint is in MLflow: a resumed run does not leave a gap
        task, step, boundary = checkpoint_position(state)
        tmp = tempfile.mkdtemp(prefix="fomo_ckpt_") if self.rank0 else None
        if tmp is not None:
            checkpoint.save_state(state, tmp)
            write_run_meta(tmp, self.run_id, self.p.run_name)
            if self.tracker is not None and boundary:
                self.tracker.set_tags(self.run_id, {CHECKPOINT_TAG: self.p.storage_uri,
                                                    "fomo_ray.last_checkpoint": checkpoint_name(task, step)})
        self.session.report(trial_report.checkpoint_report(task, step, self.last), tmp, checkpoint_name(task, step))
        if tmp is not None and boundary:
            self.kept.append(tmp)
            while len(self.kept) > 1:
                shutil.rmtree(self.kept.pop(0), ignore_errors=True)
        elif tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """Report the outcome *with a checkpoint* (Ray Train's result carries the metrics of its newest checkpoint):
        the newest task-end state plus a status file, so a relaunch of an ended run does not redo it."""
        self.flush_steps()
        d = None
        if self.rank0:
            d = self.kept[-1] if self.kept else tempfile.mkdtemp(prefix="fomo_ckpt_")
            Path(d, STATUS_FILE).write_text(json.dumps(final))
            if not self.kept:
                write_run_meta(d, self.run_id, self.p.run_name)
            done = trial_report.is_kind(final, ReportKind.DONE)
            if self.kept:  # the run's config beside its final state, so that state loads on its own (export)
                from fomo_ray.atomic import write_json
                from fomo_ray.config import to_dict

                write_json(Path(d, "config.json"), to_dict(self.p.cfg), indent=2, sort_keys=True)
            if self.tracker is not None and done and self.kept:
                if self.p.log_checkpoints:
                    # the final state only: one full state per task and trial would multiply the store's size by T.
                    # Ray keeps only the newest ray.keep_checkpoints checkpoints (under the fomo_ray.checkpoint_uri
                    # tag); earlier task ends are deleted, so this artifact is the one state that always stays
                    self.tracker.log_artifacts(self.run_id, d, artifact_path="checkpoints/final")
                log_deployed_model(self.tracker, self.run_id, self.p, d)
        try:
            self.session.report(final, d, f"final_{trial_report.kind_of(final).value}")
        finally:
            for k in {*self.kept, *([d] if d else [])}:
                shutil.rmtree(k, ignore_errors=True)
        return final


def log_deployed_model(tracker: Any, run_id: str, p: RunPayload, state_dir: str) -> None:
    """Log the deployed model of a finished run, read from its final task-end state, as the MLflow artifact directory
    ``model/`` in open_clip's format (``fomo_ray.export``). The results are in already: a failure here is reported
    (a warning line and the ``fomo_ray.export_error`` tag) and never fails the run."""
    from fomo_ray import checkpoint, export

    tmp = tempfile.mkdtemp(prefix="fomo_model_")
    try:
        state = checkpoint.load_state(state_dir)
        export.save_open_clip(tmp, p.cfg, export.deployed_state(p.cfg, state), run=p.run_name,
                              source=f"final task-end state of MLflow run {run_id}")
        tracker.log_artifacts(run_id, tmp, artifact_path=export.MODEL_ARTIFACT)
    except Exception as e:  # noqa: BLE001 - see the docstring
        reason = f"{type(e).__name__}: {e}"
        print(f"run {p.run_name!r}: its deployed model was not logged to MLflow ({reason})", file=sys.stderr,
              flush=True)
        tracker.set_tags(run_id, {EXPORT_ERROR_TAG: reason})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resume_point(session: Session) -> tuple[Any, dict[str, str], dict[str, Any] | None]:
    """(loop state to resume or None, run meta, final status if the run already ended) from the host's checkpoint."""
    from fomo_ray import checkpoint

    ckpt = session.get_checkpoint()
    if ckpt is None:
        return None, {}, None
    with ckpt.as_directory() as d:
        status = Path(d, STATUS_FILE)
        if status.is_file():
            return None, read_run_meta(d), json.loads(status.read_text())
        return checkpoint.load_state(d), read_run_meta(d), None


def continual_run(p: RunPayload, session: Session) -> dict[str, Any]:
    """Run (or resume) one continual stream and report every evaluation point and checkpoint to ``session``.

    Rank 0 alone logs to MLflow and writes checkpoints; every rank calls ``report`` equally often (Train V2's
    report is a barrier). A diverged run ends with a ``failed`` report instead of raising, so Ray does not retry a
    deterministic failure. Returns the final report (``done`` or ``failed``, :mod:`fomo_ray.trial_report`).
    Before the loop, the run's inputs are made sure of (:func:`ensure_inputs`).
    """
    from fomo_ray import distributed, loop

    resume, meta, ended = _resume_point(session)
    if ended is not None:  # relaunched after it ended (e.g. a restored sweep): nothing to redo
        return ended
    ensure_inputs(p.cfg)
    nodes = distributed.gather_objects(_node_id())  # every rank takes part in the collective
    run_id = meta.get("mlflow_run_id") or p.mlflow_run_id
    tracker = None
    if session.rank == 0 and p.tracking_uri and run_id:
        from fomo_ray.provenance import platform_label
        from fomo_ray.tracking import PLATFORM_TAG, Tracker, activation_tags

        tracker = Tracker(p.tracking_uri, p.cfg.tracking.experiment)
        # the platform of rank 0, which trains, not of the Tune trial that opened the run (another node, maybe)
        tracker.set_tags(run_id, {WORLD_TAG: session.world_size, NODES_TAG: ",".join(nodes),
                                  PLATFORM_TAG: platform_label(), **activation_tags(p.cfg)})
        if resume is not None:  # visible proof in the UI that this run continued from a checkpoint
            tracker.set_tags(run_id, {RESUMED_TAG: checkpoint_name(*checkpoint_position(resume)[:2])})
    bridge = _Bridge(p, session, run_id, tracker)
    if resume is not None:
        bridge.seed_trajectory(resume.results)
    hooks = loop.RunHooks(on_eval=bridge.on_eval, on_checkpoint=bridge.on_checkpoint,
                          on_step=bridge.on_step if bridge.steps is not None else None,
                          should_stop=bridge.should_stop if p.stopping else None)
    try:
        results = loop.run_stream(p.cfg, hooks=hooks, resume=resume)
    except loop.TrainingDiverged as e:
        return bridge.finish(trial_report.failed_report(f"{type(e).__name__}: {e}", bridge.last))
    if bridge.stopped or (p.stopping and int(results["task"].max()) < bridge.last_point):
        # every rank leaves together (the loop agrees on should_stop); rank 0 holds the reason
        return bridge.finish(trial_report.stopped_report(bridge.stop_reason or "stopped by the sweep's rule",
                                                         int(results["task"].max()), bridge.last))
    return bridge.finish(trial_report.done_report(bridge.last))


def planned_tasks(cfg: ExperimentConfig) -> int:
    """How many tasks the run's method trains (the stream's T; joint training: 1), i.e. its final point."""
    import numpy as np

    from fomo_ray.methods import build_method

    return len(build_method(cfg).task_plan([np.zeros(0, dtype=np.int64)] * cfg.stream.num_tasks, 1))


def ensure_inputs(cfg: ExperimentConfig) -> None:
    """Make sure the run's benchmark and base checkpoint exist (``fomo_ray.prep.ensure_inputs``), rank 0 first: on
    shared storage the other ranks then find them, on a node of its own a rank builds its own copy. The sweep
    driver prepared them already where it runs, so this is quick there; the loop itself never builds inputs."""
    from fomo_ray import distributed, prep

    with distributed.rank_zero_first():
        prep.ensure_inputs(cfg)


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (direct calls in tests)
        return ""


# --------------------------------------------------------------------------------------------------- Ray Train host
class TrainSession:
    """:class:`Session` inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def get_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None)


def train_worker(payload: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the same body on every worker (torch.distributed is set up by Ray Train)."""
    p: RunPayload = payload["payload"]
    set_threads(p.cfg.ray.cpus_per_worker)
    continual_run(p, TrainSession())


def scaling_config(cfg: ExperimentConfig) -> Any:
    """Workers from ``cfg.ray``: a fixed count, or elastic ``(min_workers, num_workers)``."""
    import ray.train

    r = cfg.ray
    workers: int | tuple[int, int] = (r.min_workers, r.num_workers) if 0 < r.min_workers < r.num_workers \
        else r.num_workers
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=r.gpus_per_worker > 0,
                                   resources_per_worker=resources)


@dataclass(frozen=True)
class TrainOutcome:
    metrics: dict[str, Any]   # the last report (a ``done`` report)
    checkpoint: str | None    # the newest checkpoint directory (the final state of the stream)
    path: str                 # the Train run's directory under storage_path


def fit_train_run(payload: RunPayload, *, name: str, storage_path: str,
                  callbacks: list[Any] = ()) -> TrainOutcome:
    """Run ``payload`` as a ``TorchTrainer`` named ``name`` under ``storage_path``.

    A run relaunched with the same (name, storage_path) resumes from its latest checkpoint (Train V2 restoration),
    which is how a retried or restored Tune trial continues instead of starting over. Raises :class:`RunFailed`.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = payload.cfg
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"payload": payload},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: workers failed more than max_failures times
        raise RunFailed(f"run {payload.run_name!r} (Train run {name}) failed after {cfg.ray.max_failures} worker "
                        f"restart(s): {e}") from e
    metrics = dict(result.metrics or {})
    if trial_report.is_kind(metrics, ReportKind.FAILED):
        evals = trial_report.eval_rows(result.metrics_dataframe)
        raise RunDiverged(f"run {payload.run_name!r} (Train run {name}) failed: {metrics.get('reason')}",
                          [] if evals is None else [r.dropna().to_dict() for _, r in evals.iterrows()])
    return TrainOutcome(metrics, result.checkpoint.path if result.checkpoint else None, str(result.path))


def train_storage(storage_root: str | Path) -> str:
    return str(Path(storage_root, "train"))
