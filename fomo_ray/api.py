"""The Python API: what a notebook imports from ``fomo_ray``.

    import fomo_ray

    res = fomo_ray.run(stream__num_tasks=2, method__name="ema_merge")   # one continual run (plain PyTorch)
    res = fomo_ray.sweep("experiments/configs/sweep_merge_weights.yaml", max_concurrent=2)
    res = fomo_ray.load_results("merge_weights")                         # a saved sweep, by name or directory
    res.tidy, res.trials, res.points, res.table, res.variants            # pandas DataFrames
    res.trajectories_figure(); res.pareto_figure()                       # matplotlib figures
    deployed = fomo_ray.load_model("runs/<run>")     # .model (open_clip, deployed weights), .preprocess, .tokenizer

Config overrides are dotted keys (``optimizer.lr``); as Python keywords, write ``__`` for the dot
(``optimizer__lr=1e-4``), or pass a mapping (``overrides={"optimizer.lr": 1e-4}``). Everything here is a thin layer
over what the ``fomo-ray`` commands run, so a notebook and the command line give the same numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fomo_ray.config import FLAG_KEYS, ExperimentConfig, load_config
from fomo_ray.trial_report import TrialStatus



def _with_unit(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its scores' unit named in a last column: ``fraction`` (the commands print them x 100)."""
    return table.assign(unit="fraction") if not table.empty else table


def dotted(overrides: Mapping[str, Any] | None = None, **keywords: Any) -> dict[str, Any]:
    """``{dotted.key: value}`` from a mapping plus ``a__b=value`` keywords (``__`` stands for the dot)."""
    out = dict(overrides or {})
    out.update({k.replace("__", "."): v for k, v in keywords.items()})
    return out


# --------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Results:
    """A run's or a sweep's results, as tables and figures.

    ``tidy``: run, point, dataset, role, metric, value, eval_set, prompts (one row per evaluation point x dataset x
    metric x evaluation set: ``subset``, the trajectory, or ``full``; ``point`` 0 is before any update, t+1 after
    task t);
    ``trials``: one row per run with its ``status`` (finished / failed / stopped / interrupted), ``reason`` and
    swept values; ``summary``: the sweep's ``summary.json`` (empty for a single run or an unfinished sweep).
    Scores are fractions in [0, 1], as in the CSV files, and every score table says so in its ``unit`` column
    (``fraction``); the printed tables and MLflow show percent (x 100)."""
    tidy: pd.DataFrame
    trials: pd.DataFrame
    directory: Path | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def points(self) -> pd.DataFrame:
        """A_KA, A_ZS, GM per run and evaluation point: the trajectories (point 0 = the zero-shot point)."""
        from fomo_ray.models.metrics import summarize

        return _with_unit(summarize(self.tidy))

    trajectories = points

    @property
    def table(self) -> pd.DataFrame:
        """One row per run: status, final and trajectory-mean scores (finished runs only), Pareto flag, swept
        values; best final GM first (``fomo_ray.results.report.trial_table``)."""
        return _with_unit(self._table())

    def _table(self) -> pd.DataFrame:
        from fomo_ray.results.report import trial_table

        return trial_table(self.tidy, self.trials if not self.trials.empty else None)

    @property
    def variants(self) -> pd.DataFrame:
        """Per variant (the trial's settings without its seed): how many finished seeds, and the mean, standard
        deviation and 95% confidence half-width (``_ci``) over them of final and trajectory-mean A_KA, A_ZS, GM.
        Unfinished runs are left out (:func:`variant_summary`)."""
        return _with_unit(variant_summary(self._table()))

    def format(self) -> str:
        """The results table as printed by the commands (percent)."""
        from fomo_ray.results.report import format_table

        return format_table(self._table())

    def trajectories_figure(self) -> Any:
        """A_KA vs A_ZS, one line per run (unfinished ones dashed)."""
        from fomo_ray.results.report import trajectories_figure

        table = self._table()
        return trajectories_figure(self.points, dict(zip(table["run"], table["status"])))

    def pareto_figure(self) -> Any:
        """Final (A_KA, A_ZS) of the finished runs with their Pareto front."""
        from fomo_ray.results.report import pareto_figure

        table = self._table()
        return pareto_figure(table[table["status"] == TrialStatus.FINISHED])

    def vs_figure(self, key: str) -> Any:
        """Final and mean A_KA / A_ZS / GM against a numeric swept key, e.g. ``method.merge.weight``."""
        from fomo_ray.results.report import vs_key_figure

        return vs_key_figure(self._table(), key)

    def load_model(self, run: str = "", device: str = "cpu") -> Any:
        """Trial ``run``'s deployed model (``export.DeployedModel``: ``.model``, ``.preprocess``, ``.tokenizer``),
        found through the sweep's MLflow store (its child run of that name); for a ``fomo-ray run`` directory, the
        run's own model."""
        from fomo_ray.results.report import ReportError

        if not self.summary.get("parent_run_id"):
            if self.directory is not None and (self.directory / "config.json").is_file():
                return load_model(self.directory, device=device)
            raise ReportError(f"{self.directory}: no MLflow store recorded for this sweep (run with tracking on), "
                              "so its trials' models cannot be found; give load_model a checkpoint instead")
        from fomo_ray.tracking.writer import Tracker

        uri = self.summary["tracking_uri"]
        tracker = Tracker(uri, self.summary.get("experiment", "fomo_ray"))
        ids = {r.info.run_name: r.info.run_id for r in tracker.children(self.summary["parent_run_id"])}
        if run not in ids:
            raise ReportError(f"run {run!r} is not a trial of this sweep; trials: {sorted(ids)}")
        return load_model(ids[run], device=device, tracking_uri=uri)

    def report(self, out_dir: str | Path, x_key: str = "", baseline: str = "") -> list[Path]:
        """Write the table and the plots (as ``fomo-ray report``; ``baseline``: the variant the paired comparison
        subtracts, default the sweep's ``report.baseline``, else fine-tuning)."""
        from fomo_ray.results.report import build_report

        return build_report(self.tidy, self.trials if not self.trials.empty else None, out_dir,
                            x_key=x_key or self.summary.get("report_x", ""),
                            baseline=baseline or self.summary.get("report_baseline", ""))


def variant_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Seed-aggregated scores of a ``trial_table``: groups by the swept columns other than ``seed`` (a sweep of seeds
    alone is one variant, ``variant`` = ``all``; by run when nothing was swept); ``n`` finished seeds,
    ``<score>_mean``, ``<score>_std`` (NaN for one seed) and ``<score>_ci``, the half-width of the mean's 95%
    Student-t confidence interval, t_{0.975, n-1} · std / √n (NaN for one seed); best mean final GM first
    (``fomo_ray.maths.aggregate.variant_table`` without its ``label``)."""
    from fomo_ray.maths.aggregate import variant_table

    return variant_table(table).drop(columns="label")


def load_results(source: str | Path, output_dir: str | Path = "runs") -> Results:
    """The results of a sweep (its directory, or its name under ``<output_dir>/sweeps``), of a ``fomo-ray run``
    directory, or of a tidy table file. Raises ``fomo_ray.results.report.ReportError`` naming what is missing."""
    from fomo_ray.results.report import ReportError, load_sweep_tables

    path = Path(source)
    if not path.exists() and (Path(output_dir) / "sweeps" / str(source)).exists():
        path = Path(output_dir) / "sweeps" / str(source)
    if not path.exists():
        raise ReportError(f"no sweep, run directory or results table at {source!r} (nor "
                          f"{Path(output_dir) / 'sweeps' / str(source)})")
    path = path.resolve()
    tidy, trials, summary = load_sweep_tables(path)
    if trials is None:
        trials = pd.DataFrame({"run": sorted(tidy["run"].unique()), "status": TrialStatus.FINISHED, "reason": ""})
    interrupted = path.is_dir() and (path / "sweep.json").is_file() and not (path / "summary.json").is_file()
    if interrupted:  # its state still says where its MLflow runs are
        summary = json.loads((path / "sweep.json").read_text())
    return Results(tidy=tidy, trials=trials, directory=path if path.is_dir() else path.parent, summary=summary,
                   interrupted=interrupted)


# --------------------------------------------------------------------------------------------------- doing
def run(config: str | Path | ExperimentConfig | None = None, *, overrides: Mapping[str, Any] | None = None,
        resume: bool = False, device: str | None = None, **keywords: Any) -> Results:
    """One continual run of the loop in this process (plain PyTorch, no Ray), as ``fomo-ray run``: prepares missing
    inputs, writes ``<output_dir>/<run name>/`` (config, task-end state for ``resume=True``, results table,
    deployed model; an MLflow run with ``tracking.enabled``) and returns its results. Raises the input errors
    (``ConfigError``, ``DataError``, ...) and ``TrainingDiverged`` (``fomo_ray.engine.local_run.execute_run``)."""
    changes = dotted(overrides, **keywords)
    if isinstance(config, ExperimentConfig):
        cfg = config.replace(changes) if changes else config
    else:
        cfg = load_config(config, changes)
    from fomo_ray.engine.local_run import execute_run

    out = execute_run(cfg, resume=resume, device=device)
    df = out.results
    return Results(tidy=df, trials=pd.DataFrame({"run": sorted(df["run"].unique()), "status": TrialStatus.FINISHED,
                                                  "reason": ""}), directory=out.directory)


def sweep(spec: str | Path | Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None,
          name: str | None = None, search: str | None = None, num_samples: int | None = None,
          seeds: int | None = None, order: str | None = None, fresh: bool = False, resume: bool = False,
          progress: bool = True, show_worker_logs: bool = False, no_cache: bool = False,
          device_tflops: float | None = None, mfu: float | None = None, preset: str | None = None,
          keep_sizing: bool = False, dry_run: bool = False, **keywords: Any) -> Any:
    """Run (or resume) a Ray Tune sweep from a sweep YAML or its mapping, as ``fomo-ray sweep``; returns its results
    (``interrupted`` set when it stopped early: rerun with ``resume=True``). ``dry_run=True`` runs nothing and writes
    nothing: it returns what ``fomo-ray sweep --dry-run`` prints (``sweep_inputs.SweepCheck``: ``.plan``, ``.costs``,
    ``.estimate``, ``.text()``), after the same checks of every trial and its inputs. Keywords are dotted overrides
    for every trial (``optimizer__lr=1e-4``) or the flag names of the command (``config.FLAG_KEYS``: the same table:
    ``gpus_per_trial=0.5``, ``max_concurrent=2``, ``tracking_uri=...``); ``seeds=N`` runs every variant over N
    seeds, as the sweep key ``seeds``; ``order``,
    ``no_cache``, ``device_tflops`` and ``mfu`` are the command's ``--order``, ``--no-cache``, ``--device-tflops`` and
    ``--mfu`` (the cost estimate for a declared device); ``preset="paper"`` and ``keep_sizing`` are ``--preset`` and
    ``--keep-sizing`` (fomo_ray/planning/presets.py)."""
    from dataclasses import replace

    from fomo_ray.planning.cost_estimate import DeclaredDevice
    from fomo_ray.engine.tune_sweep import run_sweep
    from fomo_ray.planning.sweep_spec import apply_preset, load_sweep, spec_from_dict

    changes = dotted(overrides, **{FLAG_KEYS.get(k, k): v for k, v in keywords.items()})
    if isinstance(spec, Mapping):
        raw = dict(spec)
        sweep_spec = spec_from_dict(raw)
        sweep_spec = apply_preset(sweep_spec, preset) if preset else sweep_spec
        sweep_spec = replace(sweep_spec, base={**sweep_spec.base, **changes})
    else:
        sweep_spec = load_sweep(spec, changes, preset=preset or "")
    named = {k: v for k, v in (("name", name), ("search", search), ("num_samples", num_samples), ("seeds", seeds),
                               ("order", order), ("keep_sizing", keep_sizing or None)) if v is not None}
    sweep_spec = replace(sweep_spec, **named) if named else sweep_spec
    device = None if device_tflops is None and mfu is None else DeclaredDevice(device_tflops or 0.0, mfu or 0.0)
    if dry_run:
        from fomo_ray.planning.sweep_inputs import check_sweep

        return check_sweep(sweep_spec, device)
    out = run_sweep(sweep_spec, if_exists="new" if fresh else "resume" if resume else "auto", progress=progress,
                    show_worker_logs=show_worker_logs, device=device, use_cache=not no_cache,
                    resume_hint=lambda directory_name: resume_call(spec, directory_name))
    summary = json.loads((out.directory / "summary.json").read_text()) if (out.directory / "summary.json").is_file() \
        else {}
    return Results(tidy=out.tidy, trials=out.trials, directory=out.directory, summary=summary,
                   interrupted=out.interrupted)


def resume_call(spec: str | Path | Mapping[str, Any], directory_name: str) -> str:
    """How to resume an interrupted ``sweep()`` from Python: the same call, naming its directory (the hint a CLI
    user gets is the command line instead)."""
    what = repr(str(spec)) if isinstance(spec, (str, Path)) else "<the same spec mapping>"
    return f"fomo_ray.sweep({what}, <the same arguments>, name={directory_name!r}, resume=True)"


def load_model(source: str | Path, device: str = "cpu", tracking_uri: str = "") -> Any:
    """A run's deployed model, ready for open_clip-style use, by name: ``.model``, ``.preprocess``, ``.tokenizer``
    (``export.DeployedModel``; not a tuple, so it cannot be unpacked in open_clip's other order). ``source`` is an
    export directory, a ``fomo-ray run`` directory, a checkpoint directory, or an MLflow run id (with
    ``tracking_uri``). See :mod:`fomo_ray.results.export`."""
    from fomo_ray.results.export import load_model as load

    return load(source, device=device, tracking_uri=tracking_uri or recorded_store(source))


def recorded_store(source: str | Path, output_dir: str | Path = "runs") -> str:
    """For a bare MLflow run id (no tracking URI given, ``MLFLOW_TRACKING_URI`` unset): the store, among those the
    sweeps under ``output_dir`` recorded (``sweep_spec.recorded_stores``), that holds the run; else ""."""
    import os

    from fomo_ray.results.export import mlflow_run_id
    from fomo_ray.planning.sweep_spec import recorded_stores

    run_id = mlflow_run_id(source)
    if not run_id or os.environ.get("MLFLOW_TRACKING_URI"):
        return ""
    from fomo_ray.tracking.writer import TrackingError, run_params

    for uri in recorded_stores(output_dir):
        try:
            run_params(uri, run_id)
        except TrackingError:
            continue
        return uri
    return ""
