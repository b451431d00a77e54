"""A finished (or interrupted) sweep's results, read back without Ray: one row per trial x evaluation point, the tidy
per-dataset table, one row per trial with its status (finished, failed, stopped, interrupted), the trials' cost
estimates beside their actual wall times, the counts and the compute early stopping saved. ``tune_sweep.py`` hands
Tune's ResultGrid here; the CLI prints what it returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from fomo_ray import trial_report
from fomo_ray.models.metrics import tidy_frame
from fomo_ray.planning.sweep_budget import REASON as BUDGET_REASON
from fomo_ray.planning.sweep_spec import (REFERENCE_KEY, REFERENCES_KIND, Dim, SweepPlan, SweepSpec, enumerated_dims,
                                          point_label, trial_overrides)
from fomo_ray.trial_report import ReportKind, SCORES, TrialStatus


# What Ray's errors say when the machine, not the trial's code, ended it: a non-deterministic loss a resume retries
INFRASTRUCTURE = (
    ("running low on memory", "killed by Ray's memory monitor (the node ran low on memory)"),
    ("OutOfMemoryError", "killed by Ray's memory monitor (the node ran low on memory)"),
    ("NodeDiedError", "its node died"),
    ("node died", "its node died"),
    ("WorkerCrashedError", "its worker process crashed"),
    ("ActorDiedError", "its worker process died"),
    ("The actor died unexpectedly", "its worker process died"),
    ("ActorUnavailableError", "its worker process became unreachable"),
    ("LocalRayletDiedError", "the node's Raylet died"),
    ("ObjectLostError", "an object it needed was lost with its node"),
    ("RaySystemError", "a Ray system error"),
)


def infrastructure_reason(error: Any) -> str:
    """One line saying how the infrastructure ended a trial (or the sweep) when ``error`` (an exception, with its
    causes, or an error text) is one of Ray's non-deterministic losses (:data:`INFRASTRUCTURE`: a worker killed by
    the memory monitor, a dead node or process); "" for an error of the trial's own."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:  # the exception and its causes: Tune wraps Ray's errors
        seen.add(id(error))
        texts.append(error if isinstance(error, str) else f"{type(error).__name__}: {error}")
        error = None if isinstance(error, str) else (error.__cause__ or error.__context__)
    text = "\n".join(texts)
    for marker, summary in INFRASTRUCTURE:
        if marker in text or summary in text:  # its own line again (a printed reason) reads the same
            detail = next((line[line.index("OOM kill reason:"):].strip() for line in text.splitlines()
                           if "OOM kill reason:" in line), "")
            return f"{summary}; {detail}" if detail else summary
    return ""


def trial_status(result: Any) -> tuple[str, str]:
    """(status, reason) of a Tune result: ``finished`` (its final ``done`` report), ``failed`` (a ``failed`` report,
    or an error of its own Ray gave up on), ``stopped`` (the sweep's early-stopping rule ended it: a ``stopped``
    report), else ``interrupted`` (it ended before the end of its stream for another reason, e.g. Ray lost its worker
    to the memory monitor or a dead node more often than ``ray.max_failures`` allows: a resume retries it)."""
    metrics = result.metrics or {}
    if result.error:
        lost = infrastructure_reason(result.error)
        if lost:
            return TrialStatus.INTERRUPTED, lost[:500]
        return TrialStatus.FAILED, str(result.error).strip().splitlines()[-1][:500]
    if trial_report.is_kind(metrics, ReportKind.FAILED):
        return TrialStatus.FAILED, str(metrics.get("reason", ""))[:500]
    if trial_report.is_kind(metrics, ReportKind.STOPPED):
        return TrialStatus.STOPPED, str(metrics.get("reason", ""))[:500]
    if trial_report.is_kind(metrics, ReportKind.DONE):
        return TrialStatus.FINISHED, ""
    return TrialStatus.INTERRUPTED, ""


def collect_results(grid: Any, space: Mapping[str, Dim]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, tidy, trials) from a Tune ResultGrid.

    results: one row per trial x evaluation point (run, trial_id, point, A_KA, A_ZS, GM on the fixed subsets, and
    full_A_KA, full_A_ZS, full_GM where the full test sets were evaluated too, node_id, swept values);
    tidy: run, point, dataset, role, metric, value (per dataset); trials: one row per trial with its status (finished,
    stopped, interrupted; :func:`trial_status`), reason, wall time in seconds (``wall_s``) and, when stopped, the
    evaluation point it stopped at (``stopped_at``). A point reported twice (a worker restarted between its
    evaluation and the next checkpoint) keeps the last copy.
    """
    rows, tidy, trials = [], [], []
    for r in grid:
        if r.config is None and not r.error:  # never started (an interrupted sweep): nothing to collect yet
            continue
        name = Path(r.path).name
        config = r.config or {}  # none when it errored before its first report: still listed, with its reason
        ov = trial_overrides(config, space) if config else {}
        labels = {k: config.get(k) for k, d in space.items() if d.kind in ("points", REFERENCES_KIND)}
        trial_id = (r.metrics or {}).get("trial_id", "")
        status, reason = trial_status(r)
        metrics = r.metrics or {}
        extra = {"wall_s": round(float(metrics.get("time_total_s", float("nan"))), 2)}
        if status == TrialStatus.STOPPED:
            extra["stopped_at"] = int(metrics.get("stopped_at", -1))
        trials.append({"run": name, "trial_id": trial_id, "status": status, "reason": reason, **labels, **ov,
                       **extra})
        evals = trial_report.eval_rows(r.metrics_dataframe)
        if evals is None:
            continue
        for _, e in evals.iterrows():
            rows.append({"run": name, "trial_id": trial_id, "status": status, "point": int(e["point"]),
                         **{k: float(e[k]) for k in SCORES},
                         **{f"full_{k}": float(e[f"full_{k}"]) for k in SCORES if f"full_{k}" in e},
                         "node_id": e.get("node_id", ""), **labels, **ov})
            tidy += [{"run": name, "point": int(e["point"]), **rec}
                     for rec in trial_report.records_from_report(e.to_dict())]
    results = pd.DataFrame(rows)
    if not results.empty:
        results = results.sort_values(["run", "point"]).reset_index(drop=True)
    tidy_df = tidy_frame(tidy)  # a record without prompts (an older trial's report) gets the default
    trials_df = pd.DataFrame(trials, columns=["run", "trial_id", "status", "reason", *dict.fromkeys(
        k for t in trials for k in t if k not in ("run", "trial_id", "status", "reason"))])
    return results, tidy_df, trials_df.sort_values("run").reset_index(drop=True)


@dataclass(frozen=True)
class SweepResult:
    directory: Path
    results: pd.DataFrame   # one row per trial x evaluation point
    tidy: pd.DataFrame      # run, point, dataset, role, metric, value
    trials: pd.DataFrame    # one row per trial: run, trial_id, status, error, swept values
    parent_run_id: str
    tracking_uri: str
    report_files: tuple[Path, ...] = ()
    wall_s: float = 0.0
    interrupted: bool = False  # stopped before every trial ended: partial, resumable, nothing called final
    total: int = 0             # trials planned
    estimate_s: float | None = None  # the estimated wall time of the sweep (cost_estimate), when one was made
    baseline: str = ""         # the variant the report's paired comparison subtracts ("" = fine-tuning)
    budget: str = ""           # what the sweep spent against its budget (sweep_budget.summary_line; "" = none)



def status_counts(trials: pd.DataFrame, total: int) -> dict[str, int]:
    """How many trials finished, failed, stopped, were interrupted, and never started (pending)."""
    seen = trials["status"].value_counts().to_dict() if not trials.empty else {}
    counts = {k: int(seen.get(k, 0)) for k in (TrialStatus.FINISHED, TrialStatus.FAILED, TrialStatus.STOPPED,
                                               TrialStatus.INTERRUPTED)}
    counts[TrialStatus.PENDING] = max(0, total - len(trials))
    return counts


def format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n or k in (TrialStatus.FINISHED, TrialStatus.FAILED))


def with_estimates(trials: pd.DataFrame, costs: Sequence[Any], plan: SweepPlan) -> pd.DataFrame:
    """The trials table with each trial's compute (``steps`` over the stream, ``maf`` of one step, ``train_gflops``)
    and its estimate beside its actual wall time (``est_s``, ``est_gflops``), matched by the trial's label; a stopped
    trial's GFLOPs are the share of its tasks it ran (``done_gflops``)."""
    if trials.empty:
        return trials
    fixed = enumerated_dims(plan.space)
    by_label = {c.label: c for c in costs}
    rows = []
    for _, t in trials.iterrows():
        combo = {k: t[k] for k in fixed if k in t}
        if isinstance(t.get(REFERENCE_KEY), str):  # the table fills a reference's keys from its bundle (method.name)
            combo = {REFERENCE_KEY: t[REFERENCE_KEY]}
        c = by_label.get(point_label(combo, plan.space))
        done = None
        if c is not None:
            done = c.total_gflops if t["status"] == TrialStatus.FINISHED else (
                c.total_gflops * min(1.0, max(0, int(t.get("stopped_at", 0))) / max(c.tasks, 1))
                if t["status"] == TrialStatus.STOPPED else None)
        rows.append({"steps": None if c is None else c.steps, "maf": None if c is None else round(c.maf, 4),
                     "train_gflops": None if c is None else round(c.train_gflops, 1),
                     "est_s": None if c is None or c.seconds is None else round(c.seconds, 2),
                     "est_gflops": None if c is None else round(c.total_gflops, 3),
                     "done_gflops": None if done is None else round(done, 3)})
    return pd.concat([trials.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def compute_saved(trials: pd.DataFrame) -> float | None:
    """The share of the sweep's estimated GFLOPs that early stopping saved (None when no trial was stopped or no
    estimate is known): 1 - (GFLOPs run) / (GFLOPs planned), over the trials that finished or were stopped by the
    rule (a trial the sweep budget stopped or never started was not early stopping's doing)."""
    if trials.empty or "est_gflops" not in trials:
        return None
    if "reason" in trials:
        trials = trials[~trials["reason"].fillna("").astype(str).str.startswith(BUDGET_REASON)]
    if not (trials["status"] == TrialStatus.STOPPED).any():
        return None
    ended = trials[trials["status"].isin([TrialStatus.FINISHED, TrialStatus.STOPPED])].dropna(
        subset=["est_gflops", "done_gflops"])
    planned = float(ended["est_gflops"].sum())
    return 1.0 - float(ended["done_gflops"].sum()) / planned if planned > 0 else None


def final_scores(results: pd.DataFrame, trials: pd.DataFrame) -> dict[str, list[float]]:
    """``{"A_KA": [...], "A_ZS": [...], "GM": [...]}``: each finished trial's scores at its last evaluation point
    (fractions, as in the results table)."""
    finished = set(trials.loc[trials["status"] == TrialStatus.FINISHED, "run"]) if not trials.empty else set()
    if results.empty or not finished:
        return {k: [] for k in SCORES}
    last = results[results["run"].isin(finished)].sort_values(["run", "point"]).groupby("run").tail(1)
    return {k: [float(v) for v in last[k]] for k in SCORES}


# --------------------------------------------------------------------------------------------------- MLflow note
def _describe_dim(key: str, d: Dim) -> str:
    if d.kind in ("points", REFERENCES_KIND):
        return f"`{key}`: {d.kind} " + ", ".join(f"`{label}` ({', '.join(f'{k}={v}' for k, v in bundle.items())})"
                                               for label, bundle in d.values)
    return f"`{key}`: {d.kind} {list(d.values)}"


def sweep_description(spec: SweepSpec, plan: SweepPlan, name: str) -> str:
    """The parent run's note in the MLflow UI (markdown): what the sweep studies and how its runs read."""
    b = plan.base
    lines = [f"**Sweep `{name}`** (spec `{spec.name}`)" + (f": {spec.description}" if spec.description else ""),
             "",
             f"- search: {spec.search}, {plan.total} trial(s), searcher metric `{spec.metric}` ({spec.mode})",
             "- space: " + "; ".join(_describe_dim(k, d) for k, d in plan.space.items()),
             f"- base: method `{b.method.name}`, backbone `{b.backbone.name}`, {b.stream.num_tasks} tasks, "
             f"budget {b.budget.total_ft_steps} fine-tune steps ({b.budget.mode}), lr {b.optimizer.lr}, "
             f"batch {b.mixture.batch_size}, seed {b.seed}",
             "- metrics in **percent**. Each child run (one trial): Summary/A_KA, Summary/A_ZS, Summary/GM per "
             "evaluation point (step = point: 0 before any update, t after task t), datasets/<name>/<metric>, "
             "Training/* per step; params = the settings that apply to its method, plus `variant`.",
             "- this run: Best/* and Median/* of the final scores over finished trials (the best of "
             "each score may come from different trials), Trials/finished, Trials/failed; the report (figures, "
             "table.md) under the artifacts report/, the results tables under tables/."]
    if spec.sweep_budget is not None:
        lines.append(f"- sweep budget: {spec.sweep_budget.describe()} (Budget/spent: what the trials spent; "
                     "trials it did not start are `stopped`, reason `budget`)")
    if spec.seeds > 1:
        lines.append(f"- {spec.seeds} seeds per variant (the grid `seed`): this run also carries "
                     "Variants/<variant>/final_GM_mean, final_GM_ci, mean_GM_mean, mean_GM_ci (mean over the finished "
                     "seeds, 95% Student-t half-width), and report/variants.md and report/vs_baseline.md (each "
                     "variant minus fine-tuning, paired by seed).")
    return "\n".join(lines)
