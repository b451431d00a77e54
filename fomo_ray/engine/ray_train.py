"""One continual run under Ray: the loop of ``loop.py``, unchanged, inside a Ray Train worker (the only
``ray.train`` import).

Two ways to host a run, sharing :func:`continual_run`:

* :func:`fit_train_run` -- a Ray Train ``TorchTrainer`` (Train V2, ray 2.60): CPU workers locally, GPU workers
  with DDP on clusters (the loop shards each global batch over the ranks: ``fomo_ray/core/distributed.py``), optional
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

Checkpoints stay off the critical path: only rank 0 takes a snapshot (the others get a ``CheckpointMarker``); every
rank reports at once, and rank 0's state is written and persisted afterwards by Ray Train's checkpoint upload thread
(``checkpoint_upload_mode=ASYNC`` with a ``checkpoint_upload_fn`` that writes the directory first), while training
goes on. The run's next snapshot waits for that write (``checkpoint.wait_for_write``), so two never overlap. A plain
Tune function trial (one process, nobody waiting at a barrier) writes before it reports.

At the end, the final checkpoint (the newest task-end state, its config and how the run ended) is reported first;
MLflow gets it afterwards: on shared storage (``ray.storage_path``) a pointer (the tag ``fomo_ray.final_checkpoint``,
the persisted checkpoint's URI) instead of a second copy, unless ``RunPayload.keep_uploads``; elsewhere the
``checkpoints/final`` artifact. The deployed model (``model/``) is logged either way. An upload that fails then is
recorded (``fomo_ray.upload_pending`` / ``fomo_ray.upload_error``) and never fails the finished run; it is retried
when the trial starts again and by :func:`retry_pending_uploads` (e.g. at the end of a sweep).

A trial that reserved GPUs (``ray.gpus_per_worker`` > 0) on a process where CUDA is unavailable ends before any
step with a ``failed`` report naming the torch build, its CUDA version and the driver's
(``assembly.gpu_problem``): deterministic, so neither Ray Train nor Tune retries it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import ray

from fomo_ray import trial_report
from fomo_ray.core.assembly import planned_tasks, stream_step
from fomo_ray.atomic import write_json
from fomo_ray.config import ExperimentConfig
from fomo_ray.trial_report import ReportKind
from fomo_ray.engine.final_uploads import (  # noqa: F401 (re-exported)
    EXPORT_ERROR_TAG, FINAL_ARTIFACT, FINAL_CHECKPOINT_TAG, MODEL_UPLOAD, UPLOAD_ERROR_TAG, UPLOAD_PENDING_TAG,
    checkpoint_uri, log_deployed_model, retry_pending_uploads, retry_uploads, upload_final, warn)
from fomo_ray.engine.scratch import scratch_dir

# ray.train (and TorchTrainer, which imports torch) are imported where used: a plain Tune function trial never
# needs them, and eight such trials starting on two cores should not each pay seconds of imports. The loop, the
# checkpoint module and the input preparation are imported where used too, and always called through their module
# (``loop.run_stream``), never bound at import, so what runs is looked up when it runs.

CHECKPOINT_TAG = "fomo_ray.checkpoint_uri"  # where Ray keeps this run's newest ray.keep_checkpoints checkpoints
RESUMED_TAG = "fomo_ray.resumed_from"  # the cursor a restarted worker continued from
WORLD_TAG = "fomo_ray.world_size"  # data-parallel workers of the (latest) attempt
NODES_TAG = "fomo_ray.worker_nodes"  # the Ray node of each rank of the (latest) attempt, in rank order
WORLD_HISTORY_TAG = "fomo_ray.world_sizes"  # the world size of every attempt, in order ("1,2,1": grew, then shrank)
RUN_META = "fomo_ray_run.json"  # beside the loop's own files in every checkpoint directory
STATUS_FILE = "fomo_ray_status.json"  # only in the final checkpoint: how the run ended
CHECKPOINT_SCRATCH = "fomo_ckpt_"  # rank 0's local copy of a checkpoint until Ray has persisted it (.scratch)


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
    keep_uploads: bool = False        # upload the final checkpoint to MLflow even on shared storage (else a pointer)
    stopping: Mapping[str, Any] | None = None  # the sweep's early-stopping rule (``stopping.StoppingRule`` fields)
    stop_board: str = ""              # the name of the sweep's board actor the rule is asked through
    spend: Mapping[str, Any] | None = None  # under a sweep budget: {"unit", "need"} (fomo_ray/planning/sweep_budget.py)


class Session(Protocol):
    """What :func:`continual_run` needs from its host (Ray Train worker or Tune function)."""
    rank: int
    world_size: int

    def get_checkpoint(self) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None: ...

    # optional: ``preempting() -> bool``, whether this worker's node is being preempted (a notice, checked at the
    # loop's finiteness reads); ``report_in_background(metrics, checkpoint_dir, name, write, future, delete_after)`` reports a
    # checkpoint whose files ``write`` fills later, off the training thread (:meth:`TrainSession.report_in_background`);
    # a host without it gets the files written before ``report``


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
    write_json(Path(directory, RUN_META), {"mlflow_run_id": mlflow_run_id, "run_name": run_name}, indent=None)


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
    and, every ``tracking.log_every_n_steps`` steps, the training signal, written off the training thread),
    checkpoints (rank 0 writes, in the background where the host can; every rank reports)."""

    def __init__(self, p: RunPayload, session: Session, run_id: str, run: Any):
        # run: the trial's TrackedRun (rank 0, when tracked): every MLflow write of this process goes through it
        self.p, self.session, self.run_id, self.run = p, session, run_id, run
        self.rank0 = session.rank == 0
        # the final evaluation point, never a stopping point (only needed, and only built, under a stopping rule
        # or a sweep budget)
        self.last_point = planned_tasks(p.cfg) if p.stopping or p.spend else 0
        self.attempt = ("", 0.0)  # under a sweep budget: (id, start time) of this process, whose spend it counts
        if p.spend:
            from fomo_ray.engine.stop_board import attempt

            self.attempt = attempt()
        self.last: dict[str, Any] = {}  # newest A_KA/A_ZS/GM, carried in every report (searchers read the last one)
        self.kept: list[str] = []  # the newest task-end checkpoint directory (rank 0), reused for the final report
        self.state_run = ""  # the loop's run name of the snapshots written (the key of checkpoint.wait_for_write)
        self.trajectory: list[float] = []  # the stopping rule's metric at every evaluation point so far
        self.stop_reason = ""  # the board's answer at the newest point ("" = go on); rank 0 asks, the loop agrees
        self.stopped = False   # the loop left early because of it
        self.noticed = False   # a preemption notice was answered by a checkpoint

    def flush_steps(self) -> None:
        """Send the buffered training steps (before an evaluation point, at a checkpoint, at the end)."""
        if self.run is not None:
            self.run.flush()

    def on_eval(self, point: int, records: list[Mapping[str, Any]]) -> None:
        from fomo_ray.models.metrics import point_summary

        summary = point_summary(records)
        full = point_summary(records, "full")  # {} where only the subsets were evaluated
        self.last.update(summary)
        step = stream_step(self.p.cfg, point)  # on the stream's axis (joint's one point at T)
        if self.run is not None:  # percent; the session's report below keeps fractions (the results tables' unit)
            self.run.log_point(step, point, records, summary, full)
        self.session.report({**trial_report.eval_report(point, records, summary, full), "node_id": _node_id()},
                            None, None)
        self._post(point, summary)

    def seed_trajectory(self, results: list[Mapping[str, Any]]) -> None:
        """The points a resumed run evaluated before its checkpoint, so the rule sees its whole trajectory."""
        from fomo_ray.models.metrics import point_summary

        rule = self.p.stopping
        if rule:
            points = sorted({int(r["point"]) for r in results})
            self.trajectory = [point_summary([r for r in results if int(r["point"]) == p])[rule["metric"]]
                               for p in points]  # (the subsets: the trajectory)

    def _post(self, point: int, summary: Mapping[str, float]) -> None:
        """Ask the sweep's stopping rule and its budget at a task boundary (rank 0: the loop agrees across ranks)."""
        rule = self.p.stopping
        if rule:
            self.trajectory.append(summary[rule["metric"]])
        if self.rank0 and rule and rule["min_tasks"] <= point < self.last_point:
            from fomo_ray.engine import stop_board
            from fomo_ray.planning.stopping import trajectory_mean

            self.stop_reason = stop_board.ask(self.p.stop_board, self.p.run_name, point,
                                              trajectory_mean(self.trajectory))
        over = self._spend(point)
        if over and self.p.spend.get("stoppable", True) and not self.stop_reason and point < self.last_point:
            self.stop_reason = over

    def _spend(self, point: int, final: bool = False) -> str:
        """Rank 0, under a sweep budget: post this attempt's spend so far; why the sweep is over budget, or ""."""
        if not (self.rank0 and self.p.spend):
            return ""
        from fomo_ray.engine.stop_board import post_spend
        from fomo_ray.planning.sweep_budget import attempt_spend

        s = self.p.spend
        units = attempt_spend(s["unit"], s["need"], time.time() - self.attempt[1], self.session.world_size,
                              self.p.cfg.ray.gpus_per_worker, point, self.last_point)
        return post_spend(self.p.run_name, self.attempt[0], units, final)

    def checkpoint_now(self) -> bool:
        """True once per preemption notice (the session's ``preempting()``): the loop checkpoints at once, so the run
        restarted elsewhere loses only the steps since (``fomo_ray/engine/preemptions.py``)."""
        if self.noticed or not self.session.preempting():
            return False
        self.noticed = True
        warn(self.p.run_name, "its node is being preempted: taking a checkpoint now")
        return True

    def should_stop(self) -> bool:
        if self.stop_reason:
            self.stopped = True
        return bool(self.stop_reason)

    def on_checkpoint(self, state: Any) -> None:
        """Report a checkpoint on every rank (Train V2's report is a barrier); rank 0 (which alone holds the state:
        ``checkpoint.take_snapshot``) has it written in the background (:meth:`_report_state`)."""
        self.flush_steps()  # every step before a checkpoint is in MLflow: a resumed run does not leave a gap
        task, step, boundary = checkpoint_position(state)
        name = checkpoint_name(task, step)
        metrics = trial_report.checkpoint_report(task, step, self.last)
        if not self.rank0:
            self.session.report(metrics, None, name)
            return
        if self.run is not None and boundary:
            self.run.set_tags({CHECKPOINT_TAG: self.p.storage_uri, "fomo_ray.last_checkpoint": name})
        tmp = scratch_dir(CHECKPOINT_SCRATCH)
        self._report_state(state, tmp, metrics, name, keep=boundary)
        if boundary:  # the newest task-end state stays for the final report; the one before is persisted already
            for old in self.kept:
                shutil.rmtree(old, ignore_errors=True)
            self.kept = [tmp]

    def _report_state(self, state: Any, directory: str, metrics: dict[str, Any], name: str, keep: bool) -> None:
        """Rank 0: report ``state`` as checkpoint ``name`` from ``directory``, written off the training thread where
        the host can (``report_in_background``: Ray Train's upload thread), else right before the report (a plain
        Tune function trial: one process, nobody waits for it). ``keep``: the directory outlives the upload."""
        from fomo_ray.core import checkpoint

        def write() -> None:
            checkpoint.save_state(state, directory)
            write_run_meta(directory, self.run_id, self.p.run_name)

        self.state_run = state.run
        background = getattr(self.session, "report_in_background", None)
        if background is not None:
            future: Future = Future()
            checkpoint.register_write(state.run, future)  # the run's next snapshot waits for it
            background(metrics, directory, name, write, future, delete_after=not keep)
            return
        write()
        self.session.report(metrics, directory, name)
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """Report the outcome *with a checkpoint* (Ray Train's result carries the metrics of its newest checkpoint):
        the newest task-end state plus a status file, so a relaunch of an ended run does not redo it. MLflow gets
        the final state only after that report (:meth:`_log_final`): its failure never fails the run."""
        from fomo_ray.core import checkpoint

        if self.run is not None:
            self.run.close_steps()  # the tail of the training signal; the trial's driver ends the run
        if not trial_report.is_kind(final, ReportKind.FAILED):  # a failed attempt may be retried: not its end
            self._spend(int(final.get("stopped_at", self.last_point)), final=True)
        d = None
        done = trial_report.is_kind(final, ReportKind.DONE)
        if self.rank0:
            if self.state_run:
                checkpoint.wait_for_write(self.state_run)  # the newest task-end state is complete on disk
            d = self.kept[-1] if self.kept else scratch_dir(CHECKPOINT_SCRATCH)
            write_json(Path(d, STATUS_FILE), final, indent=None)
            if not self.kept:
                write_run_meta(d, self.run_id, self.p.run_name)
            if self.kept:  # the run's config beside its final state, so that state loads on its own (export)
                from fomo_ray.config import to_dict

                write_json(Path(d, "config.json"), to_dict(self.p.cfg), indent=2, sort_keys=True)
        try:
            self.session.report(final, d, f"final_{trial_report.kind_of(final).value}")
            if self.rank0 and self.run is not None and done and self.kept:
                self._log_final(d)
        finally:
            for k in {*self.kept, *([d] if d else [])}:
                shutil.rmtree(k, ignore_errors=True)
        return final

    def _log_final(self, d: str) -> None:
        """After the final report: the pointer to the persisted final checkpoint, then the uploads (the final state
        unless it stays on shared storage; the deployed model). Never raises: a failure is recorded and retried
        later (:func:`retry_uploads`)."""
        uploads = final_uploads(self.p)
        try:
            uri = checkpoint_uri(self.session.get_checkpoint())
            self.run.set_tags({FINAL_CHECKPOINT_TAG: uri, UPLOAD_PENDING_TAG: ",".join(uploads)})
        except Exception as e:  # noqa: BLE001 - the run finished; MLflow's troubles are reported, not raised
            warn(self.p.run_name, f"its final checkpoint could not be recorded in MLflow ({type(e).__name__}: {e})")
            return
        upload_final(self.run, self.p.cfg, self.p.run_name, d, uploads)


def final_uploads(p: RunPayload) -> list[str]:
    """What a finished run uploads to MLflow: its deployed model, and its final state (``checkpoints/final``) only
    when ``log_checkpoints`` and ``keep_uploads`` ask for the copy: else the ``fomo_ray.final_checkpoint`` tag points
    at Ray's (on ``ray.storage_path``, or the sweep directory on the driver's disk: multi-node needs the former)."""
    copy = p.log_checkpoints and p.keep_uploads
    return [FINAL_ARTIFACT, MODEL_UPLOAD] if copy else [MODEL_UPLOAD]


def _resume_point(session: Session) -> tuple[Any, dict[str, str], dict[str, Any] | None]:
    """(loop state to resume or None, run meta, final status if the run already ended) from the host's checkpoint."""
    from fomo_ray.core import checkpoint

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
    deterministic failure. Returns the final report (``done``, ``failed`` or ``stopped``, :mod:`fomo_ray.trial_report`).
    Before the loop, the run's inputs are made sure of (:func:`ensure_inputs`).
    """
    from fomo_ray.core import distributed, loop
    from fomo_ray.core.assembly import gpu_problem

    resume, meta, ended = _resume_point(session)
    run_id = meta.get("mlflow_run_id") or p.mlflow_run_id
    if ended is not None:  # relaunched after it ended (e.g. a restored sweep): nothing to redo but failed uploads
        if session.rank == 0 and p.tracking_uri and run_id:
            _retry_quietly(p, run_id)
        return ended
    # GPU asked, GPU used: every rank checks its own CUDA before any step or NCCL collective, and the ranks agree
    # over gloo (distributed.gather_objects needs no CUDA), so all of them end with the same failed report
    checks = distributed.gather_objects((_node_id(), gpu_problem(p.cfg.ray.gpus_per_worker)))
    nodes = [node for node, _ in checks]
    refused = next((problem if len(checks) == 1 else f"rank {r} (Ray node {node or '?'}): {problem}"
                    for r, (node, problem) in enumerate(checks) if problem), "")
    if not refused:
        prepare_inputs_rank_zero_first(p.cfg)
    run = None
    if session.rank == 0 and p.tracking_uri and run_id:
        from fomo_ray.tracking.tracked_run import TrackedRun

        run = TrackedRun.attach(p.tracking_uri, p.cfg, run_id)
        _tag_attempt(run, p.cfg, session.world_size, nodes, resume)
    bridge = _Bridge(p, session, run_id, run)
    if refused:
        return bridge.finish(trial_report.failed_report(f"DeviceUnavailable: {refused}", bridge.last))
    if resume is not None:
        bridge.seed_trajectory(resume.results)
    hooks = loop.RunHooks(on_eval=bridge.on_eval, on_checkpoint=bridge.on_checkpoint,
                          on_step=run.on_step if run is not None and run.steps is not None else None,
                          should_stop=bridge.should_stop if p.stopping or p.spend else None,
                          checkpoint_now=bridge.checkpoint_now if hasattr(session, "preempting") else None)
    try:
        results = loop.run_stream(p.cfg, hooks=hooks, resume=resume)
    except loop.TrainingDiverged as e:
        return bridge.finish(trial_report.failed_report(f"{type(e).__name__}: {e}", bridge.last))
    if bridge.stopped or ((p.stopping or p.spend) and int(results["point"].max()) < bridge.last_point):
        # every rank leaves together (the loop agrees on should_stop); rank 0 holds the reason
        return bridge.finish(trial_report.stopped_report(bridge.stop_reason or "stopped by the sweep's rule",
                                                         int(results["point"].max()), bridge.last))
    return bridge.finish(trial_report.done_report(bridge.last))


def _tag_attempt(run: Any, cfg: ExperimentConfig, world_size: int, nodes: list[str],
                 resume: Any) -> None:
    """Rank 0, at every (re)start: where this attempt runs, visible in the UI (an elastic run that grew or shrank
    shows it in ``fomo_ray.world_sizes``, a restarted one the checkpoint it continued from)."""
    from fomo_ray.models.backbones import activation_tags
    from fomo_ray.provenance import platform_label
    from fomo_ray.tracking.writer import PLATFORM_TAG

    before = run.tags().get(WORLD_HISTORY_TAG, "")  # earlier attempts' sizes
    # the platform of rank 0, which trains, not of the Tune trial that opened the run (another node, maybe)
    tags = {WORLD_TAG: world_size, WORLD_HISTORY_TAG: ",".join(filter(None, [before, str(world_size)])),
            NODES_TAG: ",".join(nodes), PLATFORM_TAG: platform_label(), **activation_tags(cfg)}
    if resume is not None:
        tags[RESUMED_TAG] = checkpoint_name(*checkpoint_position(resume)[:2])
    run.set_tags(tags)


def _retry_quietly(p: RunPayload, run_id: str) -> None:
    try:
        from fomo_ray.tracking.tracked_run import TrackedRun
        from fomo_ray.tracking.writer import Tracker

        retry_uploads(TrackedRun(Tracker(p.tracking_uri, p.cfg.tracking.experiment), run_id, resumed=False))
    except Exception as e:  # noqa: BLE001 - an ended run stays ended whatever MLflow says
        warn(p.run_name, f"pending MLflow uploads not retried ({type(e).__name__}: {e})")


def prepare_inputs_rank_zero_first(cfg: ExperimentConfig) -> None:
    """Make sure the run's benchmark and base checkpoint exist (``fomo_ray.prep.ensure_inputs``), rank 0 first: on
    shared storage the other ranks then find them, on a node of its own a rank builds its own copy. The sweep
    driver prepared them already where it runs, so this is quick there; the loop itself never builds inputs."""
    from fomo_ray import prep
    from fomo_ray.core import distributed

    with distributed.rank_zero_first():
        prep.ensure_inputs(cfg)


def _node_id() -> str:
    # get_runtime_context() would start a local Ray instance when called outside one (direct calls, tests)
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


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

    def preempting(self) -> bool:
        import ray.train

        return ray.train.get_preemption_info() is not None  # Ray Train's watcher marks every worker

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None)

    def report_in_background(self, metrics: dict[str, Any], checkpoint_dir: str, name: str, write: Any,
                             future: Future, delete_after: bool) -> None:
        """Report the checkpoint ``name`` now, its files later: ``write`` fills ``checkpoint_dir`` on Ray Train's
        checkpoint upload thread, which then persists it (``checkpoint_upload_mode=ASYNC``: one upload thread,
        reports committed in order, and Ray waits for it before the run ends). ``future`` resolves once the files
        are persisted, or with the error (which Ray also raises in the training thread, failing the attempt);
        ``delete_after``: remove ``checkpoint_dir`` after the upload."""
        import ray.train

        storage = ray.train.get_context().get_storage()

        def upload(ckpt: Any, dir_name: str) -> Any:
            try:
                write()
                persisted = storage.persist_current_checkpoint(ckpt, dir_name)
            except BaseException as e:
                if not future.done():
                    future.set_exception(e)
                raise
            if not future.done():  # (Ray retries an upload on transient cloud errors)
                future.set_result(None)
            return persisted

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=delete_after, checkpoint_upload_fn=upload)


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
                                   resources_per_worker=resources, elastic_resize_monitor_interval_s=r.resize_check_s)


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
