"""Ray Tune sweeps: run a validated sweep plan on Tune and collect its results (the only ``ray.tune`` import).

The sweep itself (its YAML, the space, validation, the directory policy, trial names) is ``sweep_spec.py``, which
needs no Ray. Here: each trial runs one continual stream (``ray_train.py``): as a ``TorchTrainer`` when it needs
several workers (``ray.num_workers > 1``) or ``trainer: train``, otherwise as a plain Tune function with
``tune.with_resources`` (fractional GPUs pack small trials). Before any trial starts, the driver makes sure every
trial's inputs exist (``fomo_ray.prep.ensure_inputs``) and warms the CPU budget cache, once per distinct
combination, so concurrent trials never race to build them. Trials retry under ``tune.FailureConfig``; a
deterministic failure (divergence) is recorded once and not retried. An interrupted sweep is resumed with
``Tuner.restore`` (finished trials are not redone); a finished sweep is never overwritten. Results: a pandas
DataFrame with one row per trial x evaluation point, plus the tidy per-dataset table. What a trial reports, and
how it is read back, is the protocol of ``trial_report.py``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from ray import tune

from fomo_ray import trial_report

from fomo_ray.engine import preemptions

from fomo_ray.results import trial_cache
from fomo_ray.atomic import atomic_path, write_text
from fomo_ray.config import ExperimentConfig, to_dict
from fomo_ray.planning.cost_estimate import (DeclaredDevice, budget_params, cost_order, estimate_plan, estimate_rows,
                                             estimate_summary, format_estimate, local_slots)
from fomo_ray.engine.final_uploads import settle_ended
from fomo_ray.engine.ray_session import ensure_ray, guard_cluster
from fomo_ray.planning.sweep_inputs import ensure_sweep_inputs
from fomo_ray.planning.sweep_spec import (REFERENCE_KEY, REFERENCES_KIND, SUMMARY_FILE, SWEEP_STATE_FILE, Dim,
                                          SweepError, SweepPlan, SweepSpec, check_search, enumerated_trials, plan_sweep,
                                          point_label, sweep_directory, trial_name, trial_overrides)
from fomo_ray.planning.sweep_state import check_same_study, open_state, resume_command, space_json, stopping_history
from fomo_ray.results.sweep_results import (SweepResult, collect_results, compute_saved, final_scores, format_counts,
                                            status_counts, sweep_description, with_estimates)
from fomo_ray.planning.trial_params import trial_params
from fomo_ray.trial_report import ReportKind, SCORES, TrialStatus
from fomo_ray.planning.sweep_budget import (Ledger, SweepBudget, SweepBudgetError, budget_metrics, needs_by_label,
                                            plan_line, summary_line)
from fomo_ray.engine.tune_callbacks import (DriverCallbacks, Preemptions, Progress, QuietPending, QuietTune, StopAfter,
                                            restoring)

TRIAL_TRAIN_CPU = 0.01  # what a TorchTrainer-driving trial function reserves (its workers reserve the rest)
ESTIMATE_FILE = "estimate.csv"  # the cost estimate made before launch, one row per trial
STOP_BOARD = "fomo_ray_stop_board"  # the early-stopping board actor (one per driver job: names are per namespace)


# --------------------------------------------------------------------------------------------------- the space
def to_tune(space: Mapping[str, Dim], search: str) -> dict[str, Any]:
    """The Tune param_space: grids (and points, by label) become grid_search; optuna, which samples, takes points
    as a categorical and refuses grids. With reference trials every listed dimension also holds None (a reference
    trial leaves it unset; the others have no reference)."""
    check_search(space, search)
    out: dict[str, Any] = {}
    unset = [None] if any(d.kind == REFERENCES_KIND for d in space.values()) else []
    for key, d in space.items():
        vals = [lbl for lbl, _ in d.values] if d.kind in ("points", REFERENCES_KIND) else list(d.values)
        if d.kind == "points" and search == "optuna":
            out[key] = tune.choice(vals)  # a categorical over the labelled bundles
        elif d.kind in ("grid", "points", REFERENCES_KIND):
            out[key] = tune.grid_search(vals + unset)
        elif d.kind == "choice":
            out[key] = tune.choice(vals)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(*d.values)
        else:
            out[key] = tune.randint(*d.values)
    return out


def _save_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


# --------------------------------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class TrialSetup:
    """What every trial function needs (shipped once through the object store by ``tune.with_parameters``)."""
    base: ExperimentConfig
    space: Mapping[str, Dim]
    use_train: bool
    storage: str               # the sweep's storage root (Tune experiment + Train runs + failure markers)
    tracking_uri: str          # "" = tracking disabled
    parent_run_id: str
    sweep_name: str
    stopping: Mapping[str, Any] | None = None  # the sweep's early-stopping rule (fomo_ray/planning/stopping.py)
    stop_board: str = ""                       # the name of its board actor
    cache_origin: Any = None                   # reuse identical finished trials of this trial_cache.Origin (None: no)
    budgets: Mapping[str, Mapping[str, Any]] | None = None  # label -> the compute it spends (cost_estimate)
    spend_unit: str = ""                       # the sweep budget's unit ("" = no sweep budget; sweep_budget.py)
    needs: Mapping[str, float] | None = None   # label -> its estimated spend in that unit


class TuneSession:
    """:class:`fomo_ray.engine.ray_train.Session` for a plain Tune function trial (one process, rank 0); keeps the
    evaluation reports it sent, so a deterministic failure can record them (see :func:`run_trial`)."""
    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []
        self.drain: Any = None  # this node's preemption notice, watched from the loop's first question on

    def preempting(self) -> bool:
        if self.drain is None:
            import ray

            from fomo_ray.engine.preemptions import DrainWatch

            self.drain = DrainWatch(ray.get_runtime_context().get_node_id())
        return self.drain.notice()

    def get_checkpoint(self) -> Any:
        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        if trial_report.is_kind(metrics, ReportKind.EVAL):
            self.evals.append(dict(metrics))
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


def _failure_marker(storage: str, trial_id: str) -> Path | None:
    """Where a deterministic failure is recorded (reason and the evaluation reports made before it), so that a
    relaunched trial replays them instead of redoing the work (local/shared filesystems only)."""
    return None if "://" in storage else Path(storage, TrialStatus.FAILED, f"{trial_id}.json")


# Errors that repeat on every attempt: a retry cannot help, so the trial reports them and ends without raising (Tune
# retries only raised errors). ValueError covers ConfigError, DataError, InputsMissing and EvaluationError.
DETERMINISTIC = (ValueError,)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one continual run, tracked as a child MLflow run of the sweep.

    A deterministic failure (divergence, bad input) is not raised: the trial sends a ``failed`` report with its
    reason and ends, and its evaluation reports are written to a marker first. Tune therefore never retries it, and a
    relaunch (a restored sweep) replays the same reports, so a failed trial's results are never lost."""
    from fomo_ray.engine import ray_train
    from fomo_ray.engine.stop_board import trial_began

    trial_began()
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    name = Path(ctx.get_trial_dir()).name  # the dirname creator made it the trial's name
    cfg = setup.base.replace(trial_overrides(config, setup.space))
    marker = _failure_marker(setup.storage, trial_id)
    if marker is not None and marker.is_file():  # relaunched after a deterministic failure: replay, do not redo
        recorded = json.loads(marker.read_text())
        for report in recorded.get("evals", []):
            tune.report(report)
        tune.report(trial_report.failed_report(recorded["reason"], recorded.get("last", {})))
        return
    run = None  # the trial's MLflow run (TrackedRun): opened here, closed here whatever the trial's end
    if setup.tracking_uri:
        from fomo_ray.tracking.tracked_run import TrackedRun

        spent = (setup.budgets or {}).get(point_label(config, setup.space), {})
        run = TrackedRun.open_trial(setup.tracking_uri, cfg, setup.parent_run_id, trial_id, name,
                                    {**trial_params(config, setup.space, cfg), **spent}, to_dict(cfg),
                                    {"fomo_ray.config_hash": cfg.config_hash(), "fomo_ray.sweep": setup.sweep_name})
    cached = trial_cache.lookup(cfg, setup.cache_origin) if setup.cache_origin else None
    if cached is not None:  # an identical trial finished before: its results, not a rerun
        from fomo_ray.core.assembly import stream_step

        trial_cache.replay(cached, tune.report, run, lambda point: stream_step(cfg, point))
        return
    spend = None
    if setup.spend_unit:
        from fomo_ray.engine.stop_board import admit

        # the references (zero-shot, joint) are the study's yardstick: they always run, and their spend counts
        reference = bool(config.get(REFERENCE_KEY))
        need = (setup.needs or {})[point_label(config, setup.space)]
        refused = admit(name, need, reference)
        if refused:  # ends at once, before any point: a stopped trial with nothing to show, never a finished one
            tune.report(trial_report.stopped_report(refused, -1, {}))
            if run is not None:
                run.finish(stopped=refused)
            return
        spend = {"unit": setup.spend_unit, "need": need, "stoppable": not reference}
    train_root = ray_train.train_storage(setup.storage)
    payload = ray_train.RunPayload(
        cfg=cfg, run_name=name, tracking_uri=setup.tracking_uri, mlflow_run_id=run.run_id if run else "",
        log_checkpoints=cfg.tracking.log_checkpoints, keep_uploads=cfg.tracking.keep_uploads,
        # where Ray persists the checkpoints: Train runs under <storage>/train/<trial id>, Tune function trials under
        # <storage>/tune/<trial dirname> (ctx.get_trial_dir() is a local staging folder that holds none)
        storage_uri=f"{train_root}/{trial_id}" if setup.use_train else f"{setup.storage.rstrip('/')}/tune/{name}",
        # a reference trial (references:) is never stopped, and never a trial the others are compared with
        stopping=None if config.get(REFERENCE_KEY) else setup.stopping, stop_board=setup.stop_board, spend=spend)
    session = TuneSession()
    try:
        if setup.use_train:
            from ray.tune.integration.ray_train import TuneReportCallback

            last = ray_train.fit_train_run(payload, name=trial_id, storage_path=train_root, callbacks=[
                TuneReportCallback(), preemptions.preemption_counter(setup.storage, trial_id)]).metrics
        else:
            ray_train.set_threads(cfg.ray.cpus_per_worker)
            last = ray_train.continual_run(payload, session)
            if trial_report.is_kind(last, ReportKind.FAILED):
                raise ray_train.RunDiverged(f"run {name!r} failed: {last.get('reason')}")
    except (ray_train.RunDiverged, *DETERMINISTIC) as e:
        reason = str(e) if isinstance(e, ray_train.RunDiverged) else f"{type(e).__name__}: {e}"
        evals = getattr(e, "evals", None) or session.evals  # a TorchTrainer's come with the error
        _record_failure(marker, reason, evals)
        if run is not None:
            run.finish(failure=reason)
        if not setup.use_train and isinstance(e, ray_train.RunDiverged):
            return  # the loop's bridge already sent the failed report
        tune.report(trial_report.failed_report(reason, _last_scores(evals)))
        return
    except BaseException as e:
        if run is not None:
            run.finish(failure=f"{type(e).__name__}: {e}")
        raise
    finally:
        if session.drain is not None:
            session.drain.close()
        _release_trial_memory()
        if run is not None:  # how often Ray restarted it after a preemption, failures apart (best effort:
            with contextlib.suppress(Exception):  # a tag must not replace the trial's own outcome or error)
                run.set_tags({preemptions.TAG: preemptions.count(setup.storage, trial_id)})
    settle_ended(run, cfg, name, payload.storage_uri)  # ended: its mid-run checkpoints go
    if run is not None:
        stopped = trial_report.is_kind(last, ReportKind.STOPPED)
        run.finish(stopped=str(last.get("reason") or TrialStatus.STOPPED) if stopped else "")


def _release_trial_memory() -> None:
    """What the next trial in this process (``ray.reuse_trial_processes``) must not inherit: the decoded splits of
    the "memory" loader (they count against its RAM guard) and the model's memory, on the host and the GPU."""
    import gc

    from fomo_ray.data.loaders import release_decoded

    release_decoded()
    gc.collect()
    _trim_heap()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trim_heap() -> None:
    """Give the freed heap back to the system. glibc keeps it in per-thread arenas, and each Tune trial runs on a
    thread of its own: untrimmed, a reused process grew by ~90 MB a trial (bench/reused_trial_memory.py)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _last_scores(evals: list[dict[str, Any]]) -> dict[str, float]:
    return {k: evals[-1][k] for k in SCORES if evals and k in evals[-1]}


def _record_failure(marker: Path | None, reason: str, evals: list[dict[str, Any]]) -> None:
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text(marker, json.dumps({"reason": reason, "evals": evals, "last": _last_scores(evals)},
                                         default=float))


# --------------------------------------------------------------------------------------------------- running
def trial_resources(cfg: ExperimentConfig, use_train: bool) -> dict[str, float]:
    """What Tune reserves per trial: the run's own CPU/GPU share, or a sliver for a TorchTrainer's driver
    (its workers reserve through their own placement group)."""
    if use_train:
        return {"cpu": TRIAL_TRAIN_CPU}
    r = cfg.ray
    return {"cpu": r.cpus_per_worker, **({"gpu": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}


def train_concurrency(cfg: ExperimentConfig, cluster: Mapping[str, float]) -> int:
    """How many TorchTrainer trials fit the cluster at once (Tune cannot see their workers' placement groups)."""
    r = cfg.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + TRIAL_TRAIN_CPU, "GPU": r.num_workers * r.gpus_per_worker}
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits)) if fits else 1


def _search_alg(spec: SweepSpec, seed: int, concurrency: int, starts: list[dict[str, Any]]) -> Any:
    """The searcher, seeded (sampled trials are reproducible) and limited to ``concurrency`` running trials. Grid
    and random searches start the enumerated configs in the order of ``starts`` (Tune's points to evaluate, one
    trial each; sampled keys are still drawn per trial); optuna picks its own."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=spec.metric, mode=spec.mode, seed=seed)
        return ConcurrencyLimiter(optuna, max_concurrent=concurrency) if concurrency else optuna
    return BasicVariantGenerator(points_to_evaluate=[dict(p) for p in starts], random_state=seed,
                                 max_concurrent=concurrency)


def run_sweep(spec: SweepSpec, *, if_exists: str = "auto", callbacks: Sequence[Any] = (), progress: bool = True,
              show_worker_logs: bool = False, stop_after_trials: int = 0,
              device: DeclaredDevice | None = None, use_cache: bool = True,
              resume_hint: Callable[[str], str] | None = None) -> SweepResult:
    """Validate, prepare inputs, estimate, launch (or resume) and collect a sweep; write results, report and MLflow
    runs.

    Before launch it prints the cost estimate (``fomo_ray/planning/cost_estimate.py``; timed on this machine, or on the
    declared ``device``), writes it to ``estimate.csv`` and the parent run, and starts trials longest first
    (``spec.order``). An identical trial that finished before (``fomo_ray/results/trial_cache.py``; same config and
    seed, same clean commit) is replayed, not rerun, unless ``use_cache`` is False; every trial that finishes is kept
    there. ``stop_after_trials`` interrupts the sweep like Ctrl-C once that many trials finished (a restore drill).
    Returns with partial results when interrupted (no summary.json: rerunning resumes it), after printing
    ``resume_hint(<sweep directory name>)`` (default: the command line that was run, see ``resume_command``).
    """
    t0 = time.time()
    ready = prepare(spec, if_exists, device, use_cache)
    grid = launch(ready, callbacks, progress, show_worker_logs, stop_after_trials)
    return publish(ready, grid, resume_hint, t0)


@dataclass
class Prepared:
    """A sweep ready to launch (:func:`prepare`): its plan, directory and state, the tracker and parent run, the
    trials' costs and start order, and what each trial is handed (``setup``)."""

    spec: SweepSpec
    plan: SweepPlan
    tracker: Any
    directory: Path
    resume: bool
    costs: list[Any]
    slots: int
    state: dict[str, Any]
    setup: TrialSetup
    starts: list[dict[str, Any]]
    history: dict[str, dict[int, float]]
    origin: Any
    reused: dict[str, str]


def prepare(spec: SweepSpec, if_exists: str, device: DeclaredDevice | None, use_cache: bool) -> Prepared:
    """Everything before launch: the plan, the store (an unreachable URI fails here), the directory, every input
    (bad input stops here: no sweep directory, parent run or trial), the cluster's guards, the cost estimate
    (printed, and in ``estimate.csv`` and the parent run), the trial cache and the sweep budget's plan."""
    plan = plan_sweep(spec)
    tracker = None
    if plan.base.tracking.enabled:
        from fomo_ray.tracking.writer import tracker_for

        tracker = tracker_for(plan.base)  # opens the store: an unreachable URI fails here, before any trial starts
        plan = plan.tracked(tracker.uri)
    base = plan.base
    directory, resume = sweep_directory(Path(base.output_dir) / "sweeps", spec.name, if_exists)
    ensure_sweep_inputs(base, plan.space)  # bad input stops here: no sweep directory, parent run or trial
    guard_cluster(base, plan.tracking_uri)  # --address: checkpoints and tracking every node can reach
    costs = estimate_plan(plan, device)
    slots = local_slots(base, plan.use_train)
    estimate = format_estimate(costs, slots, _source(device), spec.order)
    directory.mkdir(parents=True, exist_ok=True)
    state = open_state(directory, plan, resume)
    if resume:
        check_same_study(state, plan, directory)
    if tracker is not None:
        from fomo_ray.tracking.ui import ensure_views

        ensure_views(tracker.client, tracker.experiment_id)  # the runs table as the study reads it
        if not state.get("parent_run_id"):
            state["parent_run_id"] = tracker.start_parent(directory.name, tags={"fomo_ray.search": spec.search},
                                                          description=sweep_description(spec, plan, directory.name))
            tracker.log_params(state["parent_run_id"], {
                "sweep.search": spec.search, "sweep.trials": plan.total, "sweep.order": spec.order,
                "sweep.stopping": json.dumps(spec.stopping.to_dict()) if spec.stopping else "none",
                "sweep.space": space_json(plan.space)[:6000]})
            tracker.log_metrics(state["parent_run_id"], estimate_summary(costs, slots, spec.order), step=0)
            tracker.client.log_text(state["parent_run_id"], estimate + "\n", "estimate.txt")
            write_text(directory / SWEEP_STATE_FILE, json.dumps(state, indent=2))
    print(estimate, flush=True)
    _save_csv(pd.DataFrame(estimate_rows(costs)), directory / ESTIMATE_FILE)
    origin = trial_cache.cache_origin()
    reused = trial_cache.reused_trials(plan, origin) if use_cache and origin else {}
    if reused:
        print(f"reusing {len(reused)} finished trial(s) from the trial cache {trial_cache.cache_root(base)} (same "
              f"config and seed, commit {origin.commit[:10]}, this platform; --no-cache runs them again): "
              + "; ".join(f"{label} (from {src})" for label, src in reused.items()), flush=True)
    budget, needs = spec.sweep_budget, {}
    if budget is not None:
        needs = _budget_needs(budget, costs, base, [costs[i] for i in cost_order(costs, spec.order)], state)
    setup = TrialSetup(base=base, space=plan.space, use_train=plan.use_train, storage=state["storage"],
                       tracking_uri=plan.tracking_uri, parent_run_id=state.get("parent_run_id", ""),
                       sweep_name=directory.name, stopping=spec.stopping.to_dict() if spec.stopping else None,
                       stop_board=STOP_BOARD if spec.stopping else "", cache_origin=origin if use_cache else None,
                       budgets={c.label: budget_params(c) for c in costs},
                       spend_unit=budget.unit if budget else "", needs=needs)
    enumerated = enumerated_trials(plan)
    starts = [enumerated[i] for i in cost_order(costs, spec.order)]
    history = stopping_history(directory, spec) if resume else {}
    return Prepared(spec, plan, tracker, directory, resume, costs, slots, state, setup, starts, history, origin,
                    reused)


def launch(ready: Prepared, callbacks: Sequence[Any], progress: bool, show_worker_logs: bool,
           stop_after_trials: int) -> Any:
    """Run the trials (Tune; restored after a Ray infrastructure failure, ``tune_callbacks.restoring``) and return
    Tune's result grid ([] when interrupted before any trial started); the sweep budget's ledger goes back into the
    sweep state."""
    spec, plan, directory, state, tracker = ready.spec, ready.plan, ready.directory, ready.state, ready.tracker
    base, setup, starts, history, resume = plan.base, ready.setup, ready.starts, ready.history, ready.resume
    budget = spec.sweep_budget
    attempts = base.ray.max_failures + 1 if base.ray.max_failures >= 0 else 0  # -1: retried without limit
    counter = Preemptions(state["storage"])
    cbs = list(callbacks) + [counter] + (
        [Progress(plan.total, base.stream.num_tasks, attempts=attempts, preempted=counter)] if progress else [])
    if stop_after_trials:
        cbs.append(StopAfter(stop_after_trials))
    try:  # from the line that says the sweep starts: a Ctrl-C after it ends the sweep as interrupted (resumable)
        print(f"sweep {directory.name}: {plan.total} trial(s) "
              f"({'TorchTrainer' if plan.use_train else 'function'} trials), "
              f"{'resuming' if resume else 'starting'} in {directory}"
              + (f"; MLflow {plan.tracking_uri}" if plan.tracking_uri else ""), flush=True)
        grid = restoring(lambda again: _fit(plan, setup, cbs, again, show_worker_logs, starts, history, state),
                         resume, max(base.ray.max_failures, 0) + 1, directory.name)
    except KeyboardInterrupt:  # while Ray or the Tuner started (Tune itself turns a Ctrl-C into a partial grid)
        grid = []
        print(f"sweep {directory.name}: interrupted before any trial (re)started", flush=True)
    if budget is not None:  # the ledger, in the sweep state: a resumed sweep goes on from what was spent
        write_text(directory / SWEEP_STATE_FILE, json.dumps(state, indent=2))
        if tracker is not None and state.get("parent_run_id"):
            tracker.log_metrics(state["parent_run_id"], budget_metrics(state["budget"]), step=0)
    return grid


def publish(ready: Prepared, grid: Any, resume_hint: Callable[[str], str] | None, t0: float) -> SweepResult:
    """The results of the trials in ``grid``: the tables, the trial cache, then either the interrupted line with
    the resume command, or the report, the parent run's end and ``summary.json``."""
    spec, plan, directory, state, tracker = ready.spec, ready.plan, ready.directory, ready.state, ready.tracker
    costs, slots, origin, reused = ready.costs, ready.slots, ready.origin, ready.reused
    results, tidy, trials = collect_results(grid, plan.space)
    trials = preemptions.with_counts(trials, state["storage"])
    trials = with_estimates(trials, costs, plan)
    if origin:
        run_ids = {r.info.run_name: r.info.run_id for r in tracker.children(state["parent_run_id"])} \
            if tracker is not None and state.get("parent_run_id") else {}
        trial_cache.keep_finished(grid, plan, origin, directory.name, reused, run_ids)
    est = estimate_summary(costs, slots, spec.order).get("Estimate/wall_seconds")
    out = SweepResult(directory=directory, results=results, tidy=tidy, trials=trials,
                      parent_run_id=state.get("parent_run_id", ""), tracking_uri=plan.tracking_uri,
                      wall_s=time.time() - t0, total=plan.total, estimate_s=est,
                      budget=summary_line(state["budget"]) if "budget" in state else "")
    _save_csv(results, directory / "results.csv")
    _save_csv(trials, directory / "trials.csv")
    if not tidy.empty:
        from fomo_ray.models.metrics import save_results

        save_results(tidy, directory / "tidy.csv")
    counts = status_counts(trials, plan.total)
    if counts[TrialStatus.INTERRUPTED] or counts[TrialStatus.PENDING]:
        if tracker is not None and out.parent_run_id:  # reopened (RUNNING) when the sweep resumes
            tracker.finish(out.parent_run_id, status="KILLED")
        print(f"sweep {directory.name} interrupted: {format_counts(counts)}. Resume it with: "
              f"{(resume_hint or resume_command)(directory.name)}", flush=True)
        return replace(out, interrupted=True)
    failed = counts[TrialStatus.FAILED]
    files = _report(out, spec, tracker)
    if tracker is not None:
        from fomo_ray.engine.final_uploads import retry_pending_uploads

        retry_pending_uploads(tracker, out.parent_run_id)  # uploads that failed after a trial finished: retried
        tracker.finish(out.parent_run_id, failure=f"{failed} trial(s) failed" if failed else None)
    out = replace(out, report_files=tuple(files), wall_s=time.time() - t0, baseline=spec.report_baseline)
    write_text(directory / SUMMARY_FILE, json.dumps({
        **state, "trials": len(trials), TrialStatus.FAILED: failed, TrialStatus.STOPPED: counts[TrialStatus.STOPPED],
        "compute_saved": compute_saved(trials), "wall_s": round(out.wall_s, 1),
        "estimate_s": None if out.estimate_s is None else round(out.estimate_s, 1),
        "report_x": spec.report_x, "report_baseline": spec.report_baseline, "files": [str(f) for f in files]}, indent=2))
    return out


def _budget_needs(budget: SweepBudget, costs: Sequence[Any], base: ExperimentConfig, in_order: Sequence[Any],
                  state: Mapping[str, Any]) -> dict[str, float]:
    """Each trial's estimated spend under the sweep budget, and a line on what the budget holds."""
    try:
        needs = needs_by_label(budget, costs, base.ray.gpus_per_worker)
    except SweepBudgetError as e:
        raise SweepError(str(e)) from e
    spent = Ledger.restored(budget, state.get("budget")).total()
    print(plan_line(budget, [needs[c.label] for c in in_order], spent), flush=True)
    return needs


def _source(device: DeclaredDevice | None) -> str:
    return device.describe() if device is not None else "timed on this machine's device"


def _fit(plan: SweepPlan, setup: TrialSetup, cbs: list[Any], resume: bool, show_worker_logs: bool,
         starts: list[dict[str, Any]], history: Mapping[str, Mapping[int, float]], state: dict[str, Any]) -> Any:
    """Run the Tuner (a fresh one, or ``Tuner.restore`` of the interrupted experiment) and return its ResultGrid.

    ``starts``: the enumerated trial configs in the order they start; ``history``: what the stopping board starts
    from (a resumed sweep's trajectory means); under a sweep budget, its ledger goes on from ``state["budget"]``
    and is put back there when the trials end."""
    import ray

    owns_ray = ensure_ray(plan.base, show_worker_logs)
    board = ledger = None  # held here: a named actor is still collected once no handle to it is left
    try:
        if plan.spec.stopping is not None:
            from fomo_ray.engine.stop_board import start_board

            board = start_board(STOP_BOARD, plan.spec.stopping, history)
        if plan.spec.sweep_budget is not None:
            from fomo_ray.engine.stop_board import start_budget_board

            ledger = start_budget_board(plan.spec.sweep_budget, state.get("budget"))
        # run_trial is looked up here, when the sweep runs (tests substitute a wrapper for it)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        trial_resources(plan.base, plan.use_train))
        param_space = to_tune(plan.space, plan.spec.search)
        exp_path = f"{setup.storage.rstrip('/')}/tune"
        with DriverCallbacks.installed(cbs) as relay, contextlib.ExitStack() as stack:
            for logger, quiet in (("ray.tune.tune", QuietTune()),
                                  ("ray.tune.analysis.experiment_analysis", QuietPending())):
                logging.getLogger(logger).addFilter(quiet)
                stack.callback(logging.getLogger(logger).removeFilter, quiet)
            if resume and tune.Tuner.can_restore(exp_path):
                # finished trials keep their results; unfinished and errored ones continue from their checkpoints;
                # the restored RunConfig's relay forwards to this run's callbacks (cbs)
                return tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                          param_space=param_space).fit()
            space = plan.space
            concurrency = plan.base.ray.max_concurrent_trials or (
                train_concurrency(plan.base, ray.cluster_resources()) if plan.use_train else 0)
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    num_samples=plan.spec.num_samples if plan.spec.search == "optuna" else len(starts),
                    search_alg=_search_alg(plan.spec, plan.base.seed, concurrency, starts),
                    reuse_actors=plan.base.ray.reuse_trial_processes,
                    trial_name_creator=lambda t: trial_name(t, space),
                    trial_dirname_creator=lambda t: trial_name(t, space)),
                run_config=tune.RunConfig(
                    name="tune", storage_path=setup.storage, callbacks=[relay], verbose=0,
                    failure_config=tune.FailureConfig(max_failures=plan.base.ray.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=plan.base.ray.keep_checkpoints)))
            return tuner.fit()
    finally:
        if ledger is not None:
            state["budget"] = ray.get(ledger.snapshot.remote())
            ray.kill(ledger)
        if board is not None:  # the name is free again for the next sweep of this driver (a notebook, a test)
            ray.kill(board)
        if owns_ray:
            ray.shutdown()


def _report(out: SweepResult, spec: SweepSpec, tracker: Any) -> list[Path]:
    from fomo_ray.results import report

    if out.tidy.empty:
        return []
    files = report.build_report(out.tidy, out.trials, out.directory / "report", x_key=spec.report_x,
                                baseline=spec.report_baseline)
    if tracker is not None:
        from fomo_ray.maths.aggregate import seeds_per_variant, variant_table
        from fomo_ray.tracking.writer import sweep_metrics, variant_metrics

        counts = status_counts(out.trials, out.total)
        saved = compute_saved(out.trials)
        table = report.trial_table(out.tidy, out.trials)
        per_variant = variant_metrics(variant_table(table).to_dict("records")) if seeds_per_variant(table) > 1 else {}
        tracker.log_metrics(out.parent_run_id, {
            **sweep_metrics(final_scores(out.results, out.trials),
                            {k: counts[k] for k in (TrialStatus.FINISHED, TrialStatus.FAILED, TrialStatus.STOPPED)}),
            **({"Stopping/compute_saved": 100 * saved} if saved is not None else {}), **per_variant}, step=0)
        # report/ holds variants.md and vs_baseline.md too when the sweep ran several seeds
        tracker.log_artifacts(out.parent_run_id, out.directory / "report", artifact_path="report")
        for name in ("results.csv", "trials.csv", "tidy.csv"):
            if (out.directory / name).is_file():
                tracker.client.log_artifact(out.parent_run_id, str(out.directory / name), artifact_path="tables")
    return files


# --------------------------------------------------------------------------------------------------- inputs
