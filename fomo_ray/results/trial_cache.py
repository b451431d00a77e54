"""Finished trials, kept for reuse across sweeps: an identical trial (same result-relevant config, seed included, the
same clean commit of the code, on the same platform) is not run again, its results are replayed.

Every study carries the same reference points (zero-shot, fine-tune, joint: ``references:``), and a study rerun with
one more variant repeats every other trial; both are paid for once. An entry is written for every trial that finished
(never a failed, stopped or interrupted one) under ``<output_dir>/trial_cache/<key>.json``, atomically. The key hashes
every config key except those that only say how or where a trial runs (``sweep_spec.EXECUTION_KEYS``, the output and
cache folders, the run name). Code that is not one committed version (a dirty tree) neither writes nor reuses an
entry: its results could differ from any stored ones. Nor does another platform (``provenance.platform``): another CPU
computes other numbers, so an output folder copied to another machine does not mix its finished trials with trials
computed there. ``--no-cache`` turns reuse off for a sweep.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from fomo_ray.atomic import write_json
from fomo_ray.planning.sweep_spec import EXECUTION_KEYS, enumerated_trials, point_label, trial_overrides
from fomo_ray.trial_report import TrialStatus

CACHE_DIR = "trial_cache"
SOURCE_TAG = "fomo_ray.reused_from"  # on a reused trial's MLflow run: the sweep/trial whose results it replays
#: what a trial's results do not depend on: how and where it runs, and what it is called
NOT_RESULT_KEYS = (*EXECUTION_KEYS, "name", "output_dir", "budget.cache_dir")
VERSION = 2  # bump when an entry's layout changes (2: the platform)


@dataclass(frozen=True)
class Origin:
    """What made an entry, and what may reuse it: the clean commit and the sweep driver's platform label (the driver's,
    not a node's, so a cluster reuses its entries whichever node ran them)."""

    commit: str
    platform: str


def result_key(cfg: Any) -> str:
    """Hash of every result-relevant config key (seed included)."""
    flat = json.loads(json.dumps(cfg.flat(), default=str))
    kept = {k: v for k, v in flat.items() if not k.startswith(NOT_RESULT_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cfg: Any) -> Path:
    return Path(cfg.output_dir) / CACHE_DIR


def reusable_commit(commit: str, version: str) -> bool:
    """Only one clean committed version of the code may write or reuse entries."""
    return bool(commit) and len(commit) == 40 and not version.endswith("+changes")


def lookup(cfg: Any, origin: Origin) -> dict[str, Any] | None:
    """The entry of a finished identical trial made by this commit on this platform, or None."""
    path = cache_root(cfg) / f"{result_key(cfg)}.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: run the trial
    if (entry.get("version") != VERSION or entry.get("commit") != origin.commit
            or entry.get("platform") != origin.platform or entry.get("status") != TrialStatus.FINISHED):
        return None
    return entry


def store(cfg: Any, origin: Origin, evals: list[Mapping[str, Any]], source: Mapping[str, str]) -> Path:
    """Keep a finished trial: its evaluation reports (``trial_report.eval_report`` dicts, in point order) and where
    it came from (sweep, trial, MLflow run, checkpoint)."""
    path = cache_root(cfg) / f"{result_key(cfg)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"version": VERSION, "key": result_key(cfg), "commit": origin.commit,
                      "platform": origin.platform, "status": TrialStatus.FINISHED,
                      "evals": [dict(e) for e in evals], "source": dict(source)}, indent=1)
    return path


# --------------------------------------------------------------------------------------------------- a sweep
def cache_origin() -> Origin | None:
    """The commit and platform trial-cache entries are written and reused for (None when the code is not one clean
    commit)."""
    from fomo_ray.provenance import code_version, platform_label

    version, commit = code_version()
    return Origin(commit, platform_label()) if reusable_commit(commit, version) else None


def reused_trials(plan: Any, origin: Origin) -> dict[str, str]:
    """``{trial label: "<sweep>/<trial>"}`` of the enumerated trials the cache will replay."""
    out = {}
    for combo in enumerated_trials(plan):
        entry = lookup(plan.base.replace(trial_overrides(combo, plan.space)), origin)
        if entry is not None:
            src = entry.get("source", {})
            out[point_label(combo, plan.space)] = f"{src.get('sweep')}/{src.get('trial')}"
    return out


def keep_finished(grid: Any, plan: Any, origin: Origin, sweep: str, reused: Mapping[str, str],
                  run_ids: Mapping[str, str]) -> None:
    """Write an entry for every trial of a Tune result ``grid`` that finished (and was not itself replayed)."""
    from fomo_ray import trial_report
    from fomo_ray.results.sweep_results import trial_status

    for r in grid:
        if r.config is None or trial_status(r)[0] != TrialStatus.FINISHED:
            continue
        if point_label(r.config, plan.space) in reused:
            continue
        evals = trial_report.eval_rows(r.metrics_dataframe)
        if evals is None:
            continue
        reports = [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                   for row in evals.to_dict("records")]
        name = Path(r.path).name
        store(plan.base.replace(trial_overrides(r.config, plan.space)), origin, reports,
              {"sweep": sweep, "trial": name, "mlflow_run_id": run_ids.get(name, "")})


def replay(entry: Mapping[str, Any], report_fn: Callable[[dict[str, Any]], None], run: Any,
           step_of: Callable[[int], int] = int) -> None:
    """Send a cached trial's evaluation reports and its ``done`` report through ``report_fn`` (Tune's), and log
    them to its MLflow ``run`` (a ``TrackedRun``, or None) at ``step_of(point)`` (the stream's axis: ``assembly.stream_step``), tagged with where
    they come from (the original sweep, trial and MLflow run, whose checkpoint holds the model)."""
    from fomo_ray import trial_report
    from fomo_ray.trial_report import SCORES

    for report in entry["evals"]:
        report_fn(dict(report))
        if run is not None:
            summary = {k: report[k] for k in SCORES if k in report}
            full = {k: report[f"full_{k}"] for k in SCORES if f"full_{k}" in report}
            point = int(report["point"])
            run.log_point(step_of(point), point, trial_report.records_from_report(report), summary, full)
    if run is not None:
        src = entry.get("source", {})
        run.set_tags({SOURCE_TAG: f"{src.get('sweep')}/{src.get('trial')} (MLflow run "
                                  f"{src.get('mlflow_run_id') or '-'})"})
        run.finish()
    last = entry["evals"][-1] if entry["evals"] else {}
    report_fn(trial_report.done_report({k: last[k] for k in SCORES if k in last}))
