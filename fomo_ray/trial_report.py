"""The report protocol between a running trial and the sweep driver: what a trial sends to Ray, and how it is read.

A trial (``ray_train.py``, on either host) sends one flat dict per event, and Tune keeps one row per report in the
trial's metrics table, which the driver reads back (``tune_sweep.py``). Every report carries ``kind``:

* ``eval``       -- one evaluation point: ``point`` (0 = before any update, t+1 = after task t), the summary scores
                    on the fixed subsets (``A_KA``, ``A_ZS``, ``GM``) and one value per dataset under
                    ``ds/<role>/<dataset>/<metric>``; where the full test sets were evaluated too, their scores as
                    ``full_A_KA``... and ``full/<role>/<dataset>/<metric>``;
* ``checkpoint`` -- a checkpoint was taken at cursor (``task``, ``step``: the task index and the step within it);
                    carries the newest summary scores, so a searcher always reads the latest values;
* ``done``       -- the stream finished (the run's final report, with the last summary scores);
* ``failed``     -- the run failed deterministically (``reason``); it is not retried;
* ``stopped``    -- the sweep's early-stopping rule stopped the run at evaluation point ``stopped_at`` (``reason``); its
                    trajectory is partial by design, and it is not retried.

The kinds' values are plain strings in every stored result (``progress.csv``, ``result.json``), as before the Enum.
Encoding and decoding live side by side here, so the two ends cannot drift apart.
"""
from __future__ import annotations

from enum import Enum, StrEnum
from typing import Any, Mapping

KIND = "kind"  # the key every report carries
SCORES = ("A_KA", "A_ZS", "GM")  # FoMo-in-Flux's three scores (docs/BENCHMARK.md): their one definition
DATASET_PREFIX = "ds/"  # reported per-dataset values: "ds/<role>/<dataset>/<metric>" (the fixed subsets)
FULL_PREFIX = "full/"  # the same on the full test sets: "full/<role>/<dataset>/<metric>"
FULL_SUMMARY = "full_"  # full_A_KA, full_A_ZS, full_GM
PROMPTS = "prompts"  # the zero-shot class texts of an eval report's top-1 values (evaluation.prompts)


class ReportKind(str, Enum):
    """What a report says happened; ``.value`` is what is stored."""
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


class TrialStatus(StrEnum):
    """How a trial ended, in the trials table, the counts, MLflow's ``fomo_ray.status`` tag and the reports (a
    ``StrEnum``: each member is its own text, so tables and JSON keep plain strings)."""
    FINISHED = "finished"        # its stream ended (a ``done`` report)
    FAILED = "failed"            # its own error (a ``failed`` report, or an error Ray gave up retrying)
    STOPPED = "stopped"          # the sweep's stopping rule or budget ended it early
    INTERRUPTED = "interrupted"  # it ended before its stream did for another reason (Ctrl-C, a lost worker)
    PENDING = "pending"          # it never started



# --------------------------------------------------------------------------------------------------- encode
def eval_report(point: int, records: list[Mapping[str, Any]], summary: Mapping[str, float],
                full_summary: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The flat result reported to Ray for one evaluation point (Tune keeps one row per report)."""
    out: dict[str, Any] = {KIND: ReportKind.EVAL.value, "point": int(point), **summary,
                           **{f"{FULL_SUMMARY}{k}": v for k, v in (full_summary or {}).items()}}
    for r in records:
        prefix = FULL_PREFIX if r.get("eval_set", "subset") == "full" else DATASET_PREFIX
        out[f"{prefix}{r['role']}/{r['dataset']}/{r['metric']}"] = float(r["value"])
    classes = {r["prompts"] for r in records if r.get("prompts") and r["metric"] == "top1"}
    if classes:  # one setting per run: evaluation.prompts (retrieval rows always use the captions)
        out[PROMPTS] = classes.pop()
    return out


def checkpoint_report(task: int, step: int, last: Mapping[str, float]) -> dict[str, Any]:
    """The report sent with a checkpoint at cursor (``task``, ``step``), carrying the newest summary scores."""
    return {KIND: ReportKind.CHECKPOINT.value, "task": int(task), "step": int(step), **last}


def done_report(last: Mapping[str, float]) -> dict[str, Any]:
    """The final report of a run that finished its stream."""
    return {KIND: ReportKind.DONE.value, **last}


def failed_report(reason: str, last: Mapping[str, float]) -> dict[str, Any]:
    """The final report of a run that failed deterministically (e.g. diverged)."""
    return {KIND: ReportKind.FAILED.value, "reason": reason, **last}


def stopped_report(reason: str, point: int, last: Mapping[str, float]) -> dict[str, Any]:
    """The final report of a run the sweep's stopping rule stopped after evaluation point ``point``."""
    return {KIND: ReportKind.STOPPED.value, "reason": reason, "stopped_at": int(point), **last}


# --------------------------------------------------------------------------------------------------- decode
def kind_of(report: Mapping[str, Any] | None) -> ReportKind | None:
    """The report's kind, or None when it has none (no report yet, or a row Tune added itself)."""
    value = (report or {}).get(KIND)
    try:
        return ReportKind(value)
    except ValueError:
        return None


def is_kind(report: Mapping[str, Any] | None, kind: ReportKind) -> bool:
    return kind_of(report) is kind


def records_from_report(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Inverse of :func:`eval_report`'s per-dataset part: tidy records (dataset, role, metric, value)."""
    out = []
    for key, value in report.items():
        if not isinstance(key, str) or value != value:  # skip NaN fill-ins
            continue
        for prefix, eval_set in ((DATASET_PREFIX, "subset"), (FULL_PREFIX, "full")):
            if key.startswith(prefix):
                role, dataset, metric = key[len(prefix):].split("/", 2)
                prompts = report.get(PROMPTS) if metric == "top1" else None
                out.append({"dataset": dataset, "role": role, "metric": metric, "value": float(value),
                            "eval_set": eval_set, **({"prompts": prompts} if isinstance(prompts, str) else {})})
    return out


def eval_rows(metrics: Any) -> Any:
    """A trial's evaluation points from its Tune metrics table (a DataFrame), one row per point in point order.

    A point reported twice (a worker restarted between its evaluation and the next checkpoint) keeps the last copy.
    None when the table has no reports of this protocol.
    """
    if metrics is None or KIND not in metrics.columns or "point" not in metrics.columns:
        return None  # (a trial that failed before its first evaluation reports no point at all)
    evals = metrics[metrics[KIND] == ReportKind.EVAL.value]
    return evals.drop_duplicates("point", keep="last").sort_values("point")


def point_line(point: int, points: int, summary: Mapping[str, float]) -> str:
    """``point 3/8  A_KA  13.9  A_ZS  80.1  GM  33.3``: an evaluation point as the progress lines print it (percent)."""
    return f"point {int(point)}/{points}  " + "  ".join(f"{k} {100 * summary[k]:5.1f}" for k in SCORES)
