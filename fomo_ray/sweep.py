"""Ray Tune sweeps over dotted config keys (the only ``ray.tune`` import).

A sweep is a base config plus a *space*, written in YAML (``experiments/configs/*.yaml``) or Python::

    name: merge_weights
    config: ""                          # optional base config YAML
    base: {method.name: ema_merge}      # dotted overrides applied to every trial
    search: grid                        # grid | random | optuna
    num_samples: 1                      # samples per grid point (random / optuna: the number of trials)
    metric: GM                          # what optuna optimises (the final evaluation point's value)
    space:
      method.merge.weight: {grid: [0.1, 0.5, 0.9]}
      optimizer.lr: {loguniform: [1.0e-5, 1.0e-3]}      # also: uniform, randint, choice
      variant:                          # a name that is not a config key: labelled bundles of overrides
        points: {finetune: {method.name: finetune}, zs: {method.name: zero_shot}}

Every trial's config is built and validated before Ray starts (an unknown key or an invalid value fails fast with
a :class:`~fomo_ray.config.ConfigError` naming it). Each trial runs one continual stream (``ray_train.py``): as a
``TorchTrainer`` when it needs several workers (``ray.num_workers > 1``) or ``trainer: train``, otherwise as a plain
Tune function with ``tune.with_resources`` (fractional GPUs pack small trials). Trials retry under
``tune.FailureConfig``; a deterministic failure (divergence) is recorded once and not retried. An interrupted sweep
is resumed with ``Tuner.restore`` (finished trials are not redone); a finished sweep is never overwritten.
Results: a pandas DataFrame with one row per trial x evaluation point, plus the tidy per-dataset table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from ray import tune

from fomo_ray.config import ConfigError, ExperimentConfig, load_config, parse_override, read_yaml_mapping
from fomo_ray.atomic import atomic_path, write_text

SEARCHES = ("grid", "random", "optuna")
TRAINERS = ("auto", "train", "function")
DIM_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "points")
SPEC_KEYS = ("name", "config", "base", "search", "num_samples", "metric", "mode", "trainer", "space", "report",
             "description")
SUMMARY_FILE = "summary.json"  # written last: its presence means the sweep finished
TRIAL_TRAIN_CPU = 0.01  # what a TorchTrainer-driving trial function reserves (its workers reserve the rest)
MAX_VALIDATED = 10_000  # grid combinations validated one by one before falling back to per-value checks


class SweepError(ValueError):
    """A sweep cannot run as specified; the message names the key, file or directory."""


# --------------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Dim:
    """One swept dimension. ``values``: grid/choice values; (lo, hi) for uniform/loguniform/randint (hi exclusive
    for randint, as Tune); ((label, {dotted: value}), ...) for points."""
    kind: str
    values: tuple

    def candidates(self) -> list[Any]:
        """Values a trial can take that validation must check (both ends of a range)."""
        if self.kind in ("grid", "choice", "points"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


def parse_dim(key: str, raw: Any) -> Dim:
    """``{grid: [...]}`` / ``{choice: [...]}`` / ``{uniform|loguniform|randint: [lo, hi]}`` / ``{points: {...}}``."""
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise SweepError(f"sweep space key '{key}': expected one of {{{', '.join(DIM_KINDS)}}}: ..., got {raw!r}")
    (kind, values), = raw.items()
    if kind not in DIM_KINDS:
        raise SweepError(f"sweep space key '{key}': unknown kind '{kind}'; valid: {list(DIM_KINDS)}")
    if kind == "points":
        if not isinstance(values, Mapping) or not values:
            raise SweepError(f"sweep space key '{key}': points must be a non-empty mapping label -> overrides")
        pts = []
        for label, ov in values.items():
            if not isinstance(ov, Mapping):
                raise SweepError(f"sweep space key '{key}': point '{label}' must map dotted keys to values")
            pts.append((str(label), dict(ov)))
        return Dim(kind, tuple(pts))
    if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(f"sweep space key '{key}': {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Dim(kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SweepError(f"sweep space key '{key}': {kind} needs [lo, hi] numbers, got {values!r}")
    lo, hi = values
    if not lo < hi or (kind == "loguniform" and lo <= 0) or (kind == "randint" and not all(
            isinstance(v, int) for v in values)):
        raise SweepError(f"sweep space key '{key}': invalid {kind} range {values!r}")
    return Dim(kind, (lo, hi))


def parse_space(raw: Mapping[str, Any] | None) -> dict[str, Dim]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SweepError(f"sweep 'space' must be a mapping of key -> dimension, got {raw!r}")
    return {str(k): v if isinstance(v, Dim) else parse_dim(str(k), v) for k, v in raw.items()}


def trial_overrides(config: Mapping[str, Any], space: Mapping[str, Dim]) -> dict[str, Any]:
    """A trial's dotted overrides from its Tune config (a points label expands to its bundle)."""
    out: dict[str, Any] = {}
    for key, dim in space.items():
        value = config[key]
        if dim.kind == "points":
            out.update(dict(dim.values)[value])
        else:
            out[key] = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
    return out


def grid_points(space: Mapping[str, Dim]) -> list[dict[str, Any]]:
    """The cartesian product of the enumerable dims (grid, choice, points) as Tune configs; ranges take their ends
    (used for validation: every enumerable combination, each range end)."""
    keys = list(space)
    lists = []
    for k in keys:
        d = space[k]
        lists.append([lbl for lbl, _ in d.values] if d.kind == "points" else d.candidates())
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def check_names(cfg: ExperimentConfig) -> None:
    """Registry checks a config type cannot express: the method, the merge operator, the architecture.

    Raises ConfigError naming the key, so a misspelt name fails before any trial starts rather than inside one.
    """
    from fomo_ray.merge_ops import OPERATORS
    from fomo_ray.methods import build_method

    build_method(cfg)  # UnknownMethodError (a ConfigError) lists the valid names
    if cfg.method.merge.operator not in OPERATORS:
        raise ConfigError(f"config key 'method.merge.operator': unknown operator {cfg.method.merge.operator!r}; "
                          f"valid: {', '.join(OPERATORS)}")
    from fomo_ray.backbones import BackboneError, _check_arch

    try:
        _check_arch(cfg.backbone.name)
    except BackboneError as e:
        raise ConfigError(f"config key 'backbone.name': {e}") from e


def validate_space(base: ExperimentConfig, space: Mapping[str, Dim]) -> int:
    """Build every trial config the space can produce (ranges at both ends) and validate it; return the count.

    Raises ConfigError naming the culprit (key and, for points, the label) before any trial starts.
    """
    for key, dim in space.items():
        if dim.kind == "points":
            if key in base.flat():
                raise SweepError(f"sweep space key '{key}' is a config key; points need a free name (e.g. 'variant')")
            for label, ov in dim.values:
                try:
                    base.replace(ov)
                except ConfigError as e:
                    raise ConfigError(f"sweep point '{key}={label}': {e}") from e
        else:
            for v in dim.candidates():
                try:
                    base.replace({key: v})
                except ConfigError as e:
                    raise ConfigError(f"sweep space key '{key}' value {v!r}: {e}") from e
    combos = grid_points(space)
    if len(combos) <= MAX_VALIDATED:  # combinations too (e.g. mixture shares that must sum to 1)
        checked: set[tuple[str, str, str]] = set()
        for combo in combos:
            try:
                cfg = base.replace(trial_overrides(combo, space))
                names = (cfg.method.name, cfg.method.merge.operator, cfg.backbone.name)
                if names not in checked:
                    checked.add(names)
                    check_names(cfg)
            except ConfigError as e:
                raise ConfigError(f"sweep trial {trial_label(combo, space)}: {e}") from e
    return len(combos)


def trial_count(space: Mapping[str, Dim], search: str, num_samples: int) -> int:
    """Trials Tune will run: every grid/points combination ``num_samples`` times (sampled dims are drawn per
    trial); optuna runs ``num_samples`` trials in all."""
    if search == "optuna":
        return num_samples
    return math.prod(len(d.values) for d in space.values() if d.kind in ("grid", "points")) * num_samples


def to_tune(space: Mapping[str, Dim], search: str) -> dict[str, Any]:
    """The Tune param_space: grids (and points, by label) become grid_search; optuna, which samples, takes points
    as a categorical and refuses grids."""
    out: dict[str, Any] = {}
    for key, d in space.items():
        vals = [lbl for lbl, _ in d.values] if d.kind == "points" else list(d.values)
        if d.kind == "grid" and search == "optuna":
            raise SweepError(f"sweep space key '{key}': optuna samples, it cannot enumerate a grid; "
                             f"write it as {{choice: [...]}}")
        if d.kind == "points" and search == "optuna":
            out[key] = tune.choice(vals)  # a categorical over the labelled bundles
        elif d.kind in ("grid", "points"):
            out[key] = tune.grid_search(vals)
        elif d.kind == "choice":
            out[key] = tune.choice(vals)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(*d.values)
        else:
            out[key] = tune.randint(*d.values)
    return out


# --------------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SweepSpec:
    name: str
    space: Mapping[str, Dim]
    base: Mapping[str, Any] = field(default_factory=dict)   # dotted overrides applied to every trial
    config: str = ""                                         # base config YAML ("" = defaults)
    search: str = "grid"
    num_samples: int = 1
    metric: str = "GM"
    mode: str = "max"
    trainer: str = "auto"
    report_x: str = ""          # numeric swept key the report plots final A_KA/A_ZS/GM against (e.g. merge weight)
    description: str = ""

    def base_config(self) -> ExperimentConfig:
        """The validated base config with absolute paths (Tune moves each trial into its own directory)."""
        return load_config(self.config or None, dict(self.base)).resolved()


def spec_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> SweepSpec:
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown sweep key(s) {unknown}; valid: {list(SPEC_KEYS)}")
    if not data.get("name"):
        raise SweepError(f"{source}: a sweep needs a 'name'")
    search = data.get("search", "grid")
    if search not in SEARCHES:
        raise SweepError(f"{source}: search '{search}' is not one of {list(SEARCHES)}")
    trainer = data.get("trainer", "auto")
    if trainer not in TRAINERS:
        raise SweepError(f"{source}: trainer '{trainer}' is not one of {list(TRAINERS)}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise SweepError(f"{source}: mode '{mode}' is not 'max' or 'min'")
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise SweepError(f"{source}: 'base' must map dotted keys to values")
    report = data.get("report") or {}
    return SweepSpec(name=str(data["name"]), space=parse_space(data.get("space")), base=dict(base),
                     config=str(data.get("config") or ""), search=search, num_samples=int(data.get("num_samples", 1)),
                     metric=str(data.get("metric", "GM")), mode=mode, trainer=trainer,
                     report_x=str(report.get("x", "")), description=str(data.get("description", "")))


def load_sweep(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> SweepSpec:
    """Read a sweep YAML; ``overrides`` (``k=v`` strings or a dict) are added to its ``base``.

    A relative ``config:`` path resolves against the sweep file's directory.
    """
    p = Path(path)
    data = read_yaml_mapping(p, "sweep file", SweepError)
    spec = spec_from_dict(data, str(p))
    if spec.config and not Path(spec.config).is_absolute():
        spec = replace(spec, config=str((p.parent / spec.config).resolve()))
    extra = overrides if isinstance(overrides, Mapping) else dict(parse_override(o) for o in overrides)
    return replace(spec, base={**spec.base, **extra}) if extra else spec


# --------------------------------------------------------------------------------------------------- directories
def is_finished(directory: str | Path) -> bool:
    return Path(directory, SUMMARY_FILE).is_file()


def sweep_directory(root: str | Path, name: str, if_exists: str) -> tuple[Path, bool]:
    """(directory, resume?) for sweep ``name`` under ``root``; never reuses a finished sweep's directory.

    ``if_exists``: ``auto`` resumes an interrupted sweep and starts ``name-2``, ``name-3``... after a finished one;
    ``new`` always starts a fresh directory; ``resume`` requires an interrupted sweep; ``refuse`` requires none.
    """
    root = Path(root)
    d = root / name
    if not d.exists() or not any(d.iterdir()):
        if if_exists == "resume":
            raise SweepError(f"nothing to resume: no sweep directory {d}")
        return d, False
    finished = is_finished(d)
    if if_exists == "refuse":
        state = "finished (results in it)" if finished else "interrupted"
        raise SweepError(f"sweep '{name}' already exists at {d} ({state}); choose another --name, or "
                         f"{'delete it' if finished else 'resume it'}")
    if if_exists in ("auto", "resume") and not finished:
        return d, True
    if if_exists == "resume":
        raise SweepError(f"sweep '{name}' at {d} already finished; its results are kept, nothing to resume")
    for i in itertools.count(2):
        cand = root / f"{name}-{i}"
        if not cand.exists():
            return cand, False
    raise AssertionError("unreachable")


def _write_atomic(path: Path, text: str) -> None:
    write_text(path, text)


def _save_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


# --------------------------------------------------------------------------------------------------- trials
_LABEL_CHARS = re.compile(r"[^\w.,=+-]")


def short_key(key: str) -> str:
    """``method.merge.weight`` -> ``weight``; ``method.name`` -> ``method`` (a bare "name" would be ambiguous)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def trial_label(config: Mapping[str, Any], space: Mapping[str, Dim]) -> str:
    """Readable, deterministic trial label from its swept values, e.g. ``weight=0.3`` or ``finetune``."""
    parts = []
    for key, dim in space.items():
        v = config.get(key)
        if dim.kind == "points":
            parts.append(str(v))
        else:
            v = v.item() if hasattr(v, "item") else v
            parts.append(f"{short_key(key)}={v:.4g}" if isinstance(v, float) else f"{short_key(key)}={v}")
    return _LABEL_CHARS.sub("_", ",".join(parts))[:80] or "trial"


def trial_name(trial: Any, space: Mapping[str, Dim]) -> str:
    """``<index>-<label>``: unique in the sweep, readable in the MLflow UI and plots. The index is the counter in
    Tune's trial id (``5dd10_00003``); searchers that draw their own ids (Optuna) keep the id instead."""
    suffix = str(trial.trial_id).rsplit("_", 1)[-1]
    prefix = f"{int(suffix):03d}" if suffix.isdigit() else str(trial.trial_id)
    return f"{prefix}-{trial_label(trial.config, space)}"


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
    runner: Any = None
    faults: Mapping[str, Any] = field(default_factory=dict)  # trial label -> ray_train.FaultSpec (tests, drills)


class TuneSession:
    """:class:`fomo_ray.ray_train.Session` for a plain Tune function trial (one process, rank 0)."""
    rank, world_size = 0, 1

    def get_checkpoint(self) -> Any:
        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


def _failure_marker(storage: str, trial_id: str) -> Path | None:
    """Where a deterministic failure is recorded so that retries fail at once (local/shared filesystems only)."""
    return None if "://" in storage else Path(storage, "failed", f"{trial_id}.json")


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one continual run, tracked as a child MLflow run of the sweep."""
    from fomo_ray import ray_train

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    name = Path(ctx.get_trial_dir()).name  # the dirname creator made it the trial's name
    label = trial_label(config, setup.space)
    cfg = setup.base.replace(trial_overrides(config, setup.space))
    marker = _failure_marker(setup.storage, trial_id)
    if marker is not None and marker.is_file():  # retried after a deterministic failure: do not redo the work
        raise ray_train.RunFailed(json.loads(marker.read_text())["reason"])
    tracker, run_id = None, ""
    if setup.tracking_uri:
        from fomo_ray.tracking import Tracker

        tracker = Tracker(setup.tracking_uri, cfg.tracking.experiment)
        run_id = tracker.start_child(setup.parent_run_id, trial_id, cfg.flat(), run_name=name,
                                     tags={"fomo_ray.config_hash": cfg.config_hash(),
                                           "fomo_ray.sweep": setup.sweep_name})
    train_root = ray_train.train_storage(setup.storage)
    payload = ray_train.RunPayload(
        cfg=cfg, run_name=name, tracking_uri=setup.tracking_uri, mlflow_run_id=run_id,
        log_checkpoints=cfg.tracking.log_checkpoints,
        storage_uri=f"{train_root}/{trial_id}" if setup.use_train else ctx.get_trial_dir(),
        fault=setup.faults.get(label), runner=setup.runner)
    try:
        if setup.use_train:
            from ray.tune.integration.ray_train import TuneReportCallback

            ray_train.fit_train_run(payload, name=trial_id, storage_path=train_root, callbacks=[TuneReportCallback()])
        else:
            ray_train.set_threads(cfg.ray.cpus_per_worker)
            last = ray_train.continual_run(payload, TuneSession())
            if last.get("kind") == "failed":
                raise ray_train.RunDiverged(f"run {name!r} failed: {last.get('reason')}")
    except ray_train.RunFailed as e:
        if marker is not None and isinstance(e, ray_train.RunDiverged):  # deterministic: retrying cannot help
            marker.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(marker, json.dumps({"reason": str(e)}))
        if tracker is not None:
            tracker.finish(run_id, failure=str(e))
        raise
    except BaseException as e:
        if tracker is not None:
            tracker.finish(run_id, failure=f"{type(e).__name__}: {e}")
        raise
    if tracker is not None:
        tracker.finish(run_id)


# --------------------------------------------------------------------------------------------------- progress
class Progress(tune.Callback):
    """One line per evaluation point and per finished trial (Tune's own status tables are switched off)."""

    def __init__(self, total: int, points: int, out: Any = None) -> None:
        self.total, self.points, self.out, self.t0 = total, points, out, time.time()

    def _line(self, text: str) -> None:
        el = int(time.time() - self.t0)
        print(f"[{el // 60:02d}:{el % 60:02d}] {text}", file=self.out or sys.stdout, flush=True)

    def _count(self, trials: list, trial: Any) -> str:
        # from the trials' states, so a restored sweep counts the trials finished before the interrupt
        n = sum(1 for t in trials if t is trial or t.status in ("TERMINATED", "ERROR"))
        return f"({n}/{self.total} trials)"

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"start  {trial}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("kind") == "eval":
            self._line(f"eval   {trial}  point {int(result['task'])}/{self.points}  "
                       + "  ".join(f"{k} {100 * result[k]:5.1f}" for k in ("A_KA", "A_ZS", "GM")))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(f"done   {trial}  {self._count(trials, trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"FAILED {trial}  {self._count(trials, trial)}; see {trial.path}")


class StopAfter(tune.Callback):
    """Interrupt the sweep, as Ctrl-C would, once ``n`` trials completed (a drill for Tuner.restore)."""

    def __init__(self, n: int) -> None:
        self.n, self.done = n, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done >= self.n:
            os.kill(os.getpid(), signal.SIGINT)  # Tune saves the experiment state and returns


# --------------------------------------------------------------------------------------------------- results
def collect_results(grid: Any, space: Mapping[str, Dim]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, tidy, trials) from a Tune ResultGrid.

    results: one row per trial x evaluation point (run, trial_id, task, A_KA, A_ZS, GM, node_id, swept values);
    tidy: run, task, dataset, role, metric, value (per dataset); trials: one row per trial with status and error.
    A point reported twice (a worker restarted between its evaluation and the next checkpoint) keeps the last copy.
    """
    from fomo_ray.ray_train import records_from_report

    rows, tidy, trials = [], [], []
    for r in grid:
        if r.config is None:  # never started (an interrupted sweep): nothing to collect yet
            continue
        name = Path(r.path).name
        ov = trial_overrides(r.config, space)
        labels = {k: r.config[k] for k, d in space.items() if d.kind == "points"}
        trial_id = (r.metrics or {}).get("trial_id", "")
        status = "ERROR" if r.error else "TERMINATED"
        trials.append({"run": name, "trial_id": trial_id, "status": status,
                       "error": str(r.error).strip().splitlines()[-1][:500] if r.error else "", **labels, **ov})
        df = r.metrics_dataframe
        if df is None or "kind" not in df.columns:
            continue
        evals = df[df["kind"] == "eval"].drop_duplicates("task", keep="last").sort_values("task")
        for _, e in evals.iterrows():
            rows.append({"run": name, "trial_id": trial_id, "status": status, "task": int(e["task"]),
                         **{k: float(e[k]) for k in ("A_KA", "A_ZS", "GM")},
                         "node_id": e.get("node_id", ""), **labels, **ov})
            tidy += [{"run": name, "task": int(e["task"]), **rec} for rec in records_from_report(e.to_dict())]
    results = pd.DataFrame(rows)
    if not results.empty:
        results = results.sort_values(["run", "task"]).reset_index(drop=True)
    tidy_df = pd.DataFrame(tidy, columns=["run", "task", "dataset", "role", "metric", "value"])
    return results, tidy_df, pd.DataFrame(trials).sort_values("run").reset_index(drop=True)


@dataclass(frozen=True)
class SweepResult:
    directory: Path
    results: pd.DataFrame   # one row per trial x evaluation point
    tidy: pd.DataFrame      # run, task, dataset, role, metric, value
    trials: pd.DataFrame    # one row per trial: run, trial_id, status, error, swept values
    parent_run_id: str
    tracking_uri: str
    report_files: tuple[Path, ...] = ()
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------------- running
def use_train_for(spec: SweepSpec, cfg: ExperimentConfig) -> bool:
    """TorchTrainer for multi-worker (DDP / elastic) trials or on request; a plain function trial otherwise."""
    if spec.trainer != "auto":
        return spec.trainer == "train"
    return cfg.ray.num_workers > 1 or cfg.ray.min_workers > 0


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


def ensure_ray(cfg: ExperimentConfig, show_worker_logs: bool) -> bool:
    """Start or join Ray (``ray.address``); True if this call started it (and must shut it down)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Tune warns on every checkpoint of short trials that snapshotting "may become a bottleneck"; it is not here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    ray.init(address=cfg.ray.address or None, include_dashboard=False, log_to_driver=show_worker_logs,
             configure_logging=show_worker_logs)
    return True


def _search_alg(spec: SweepSpec, seed: int, concurrency: int) -> Any:
    """The searcher, seeded (sampled trials are reproducible) and limited to ``concurrency`` running trials."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=spec.metric, mode=spec.mode, seed=seed)
        return ConcurrencyLimiter(optuna, max_concurrent=concurrency) if concurrency else optuna
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


@dataclass(frozen=True)
class _Plan:
    """A validated sweep, before anything is launched."""
    spec: SweepSpec
    base: ExperimentConfig
    space: Mapping[str, Dim]
    param_space: dict[str, Any]
    total: int
    use_train: bool
    tracking_uri: str


def plan_sweep(spec: SweepSpec) -> _Plan:
    """Validate everything a sweep needs (config keys and values of every trial, the tracking store) without
    starting Ray; raises ConfigError / SweepError / TrackingError naming the culprit."""
    base = spec.base_config()
    space = parse_space(spec.space)
    validate_space(base, space)
    param_space = to_tune(space, spec.search)
    total = trial_count(space, spec.search, spec.num_samples)
    tracking_uri = ""
    if base.tracking.enabled:
        from fomo_ray.tracking import resolve_uri, tracker_for

        tracking_uri = resolve_uri(base.tracking.uri, base.output_dir)
        base = base.replace({"tracking.uri": tracking_uri})  # absolute, identical in every trial
        tracker_for(base)  # opens the store: an unreachable URI fails here, before any trial starts
    from fomo_ray.ray_train import check_workers

    check_workers(base)
    return _Plan(spec, base, space, param_space, total, use_train_for(spec, base), tracking_uri)


def run_sweep(spec: SweepSpec, *, if_exists: str = "auto", runner: Any = None, prepare: bool = True,
              faults: Mapping[str, Any] | None = None, callbacks: Sequence[Any] = (), progress: bool = True,
              show_worker_logs: bool = False, stop_after_trials: int = 0) -> SweepResult:
    """Validate, launch (or resume) and collect a sweep; write results, report and MLflow runs.

    ``runner`` replaces the loop module (tests); ``prepare`` builds data and base checkpoints in the driver first
    (so concurrent trials never race to build them); ``faults`` maps trial labels to ``ray_train.FaultSpec``;
    ``stop_after_trials`` interrupts the sweep like Ctrl-C once that many trials finished (a restore drill).
    Returns with partial results when interrupted (no summary.json: rerunning resumes it).
    """
    t0 = time.time()
    plan = plan_sweep(spec)
    base = plan.base
    directory, resume = sweep_directory(Path(base.output_dir) / "sweeps", spec.name, if_exists)
    directory.mkdir(parents=True, exist_ok=True)
    state = _open_state(directory, plan, resume)
    tracker = None
    if plan.tracking_uri:
        from fomo_ray.tracking import tracker_for

        tracker = tracker_for(base)
        if not state.get("parent_run_id"):
            state["parent_run_id"] = tracker.start_parent(directory.name, tags={"fomo_ray.search": spec.search})
            tracker.log_params(state["parent_run_id"], {"sweep.search": spec.search, "sweep.trials": plan.total,
                                                        "sweep.space": _space_json(plan.space)[:6000]})
            _write_atomic(directory / STATE_FILE, json.dumps(state, indent=2))
    if prepare:
        _prepare_inputs(base, plan.space)
    print(f"sweep {directory.name}: {plan.total} trial(s) "
          f"({'TorchTrainer' if plan.use_train else 'function'} trials), "
          f"{'resuming' if resume else 'starting'} in {directory}"
          + (f"; MLflow {plan.tracking_uri}" if plan.tracking_uri else ""), flush=True)
    setup = TrialSetup(base=base, space=plan.space, use_train=plan.use_train, storage=state["storage"],
                       tracking_uri=plan.tracking_uri, parent_run_id=state.get("parent_run_id", ""),
                       sweep_name=directory.name, runner=runner, faults=dict(faults or {}))
    cbs = list(callbacks) + ([Progress(plan.total, base.stream.num_tasks)] if progress else [])
    if stop_after_trials:
        cbs.append(StopAfter(stop_after_trials))
    grid = _fit(plan, setup, cbs, resume, show_worker_logs)
    results, tidy, trials = collect_results(grid, plan.space)
    out = SweepResult(directory=directory, results=results, tidy=tidy, trials=trials,
                      parent_run_id=state.get("parent_run_id", ""), tracking_uri=plan.tracking_uri,
                      wall_s=time.time() - t0)
    _save_csv(results, directory / "results.csv")
    _save_csv(trials, directory / "trials.csv")
    if not tidy.empty:
        from fomo_ray.metrics import save_results

        save_results(tidy, directory / "tidy.csv")
    if len(trials) < plan.total or not all(_trial_finished(r) for r in grid):
        print(f"sweep {directory.name} interrupted: {len(trials)}/{plan.total} trial(s) started; "
              f"rerun the same command to resume it", flush=True)
        return out
    failed = int((trials["status"] == "ERROR").sum())
    files = _report(out, spec, tracker)
    if tracker is not None:
        tracker.finish(out.parent_run_id, failure=f"{failed} trial(s) failed" if failed else None)
    out = replace(out, report_files=tuple(files), wall_s=time.time() - t0)
    _write_atomic(directory / SUMMARY_FILE, json.dumps({
        **state, "trials": len(trials), "failed": failed, "wall_s": round(out.wall_s, 1),
        "report_x": spec.report_x, "files": [str(f) for f in files]}, indent=2))
    return out


STATE_FILE = "sweep.json"  # written at the start: the parent run id and storage, read back on resume


def _open_state(directory: Path, plan: _Plan, resume: bool) -> dict[str, Any]:
    path = directory / STATE_FILE
    if resume and path.is_file():
        return json.loads(path.read_text())
    base = plan.base
    storage = (f"{base.ray.storage_path.rstrip('/')}/sweeps/{directory.name}" if base.ray.storage_path
               else str(directory))
    state = {"name": directory.name, "spec": plan.spec.name, "storage": storage, "tracking_uri": plan.tracking_uri,
             "experiment": base.tracking.experiment, "parent_run_id": ""}
    _write_atomic(path, json.dumps(state, indent=2))
    return state


def _space_json(space: Mapping[str, Dim]) -> str:
    return json.dumps({k: {d.kind: list(d.values)} for k, d in space.items()}, default=str)


def _trial_finished(result: Any) -> bool:
    """A trial finished when it failed or reported its final ``done`` result (not merely stopped by an interrupt)."""
    return bool(result.error) or (result.metrics or {}).get("kind") == "done"


def _fit(plan: _Plan, setup: TrialSetup, cbs: list[Any], resume: bool, show_worker_logs: bool) -> Any:
    """Run the Tuner (a fresh one, or ``Tuner.restore`` of the interrupted experiment) and return its ResultGrid."""
    import ray

    owns_ray = ensure_ray(plan.base, show_worker_logs)
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        trial_resources(plan.base, plan.use_train))
        exp_path = f"{setup.storage.rstrip('/')}/tune"
        if resume and tune.Tuner.can_restore(exp_path):
            # finished trials keep their results; unfinished and errored ones continue from their checkpoints
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                       param_space=plan.param_space)
            tuner._local_tuner.get_run_config().callbacks = cbs  # the pickled ones belong to the interrupted run
            return tuner.fit()
        space = plan.space
        concurrency = plan.base.ray.max_concurrent_trials or (
            train_concurrency(plan.base, ray.cluster_resources()) if plan.use_train else 0)
        tuner = tune.Tuner(
            trainable, param_space=plan.param_space,
            tune_config=tune.TuneConfig(
                num_samples=plan.spec.num_samples, search_alg=_search_alg(plan.spec, plan.base.seed, concurrency),
                reuse_actors=False,
                trial_name_creator=lambda t: trial_name(t, space),
                trial_dirname_creator=lambda t: trial_name(t, space)),
            run_config=tune.RunConfig(
                name="tune", storage_path=setup.storage, callbacks=cbs, verbose=0,
                failure_config=tune.FailureConfig(max_failures=plan.base.ray.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        return tuner.fit()
    finally:
        if owns_ray:
            ray.shutdown()


def _report(out: SweepResult, spec: SweepSpec, tracker: Any) -> list[Path]:
    from fomo_ray import report

    if out.tidy.empty:
        return []
    files = report.build_report(out.tidy, out.trials, out.directory / "report", x_key=spec.report_x)
    if tracker is not None:
        tracker.log_artifacts(out.parent_run_id, out.directory / "report", artifact_path="report")
        for name in ("results.csv", "trials.csv", "tidy.csv"):
            if (out.directory / name).is_file():
                tracker.client.log_artifact(out.parent_run_id, str(out.directory / name), artifact_path="tables")
    return files


def prepare_inputs(cfg: ExperimentConfig) -> None:
    """Build what a trial would otherwise build itself: the benchmark, the base checkpoint and (for CPU trials) the
    budget's cached MAF measurement -- once, in the driver, so concurrent trials never race to build them."""
    from fomo_ray import loop
    from fomo_ray.budget import steps_per_task
    from fomo_ray.methods import build_method

    bench = loop.open_data(cfg)
    loop.resolve_pretrained(cfg, bench)
    if cfg.ray.gpus_per_worker == 0:  # GPU trials measure on their GPU (the cache is per device)
        method = build_method(cfg)
        steps_per_task(cfg, method.cost_as or method.name, cfg.stream.num_tasks, device="cpu")


def _prepare_inputs(base: ExperimentConfig, space: Mapping[str, Dim]) -> None:
    seen = set()
    for combo in grid_points(space) or [{}]:
        cfg = base.replace(trial_overrides(combo, space))
        key = (cfg.data.root, cfg.data.generator_seed, cfg.backbone.name, cfg.backbone.pretrained, cfg.method.name,
               cfg.mixture.batch_size, cfg.budget.total_ft_steps)
        if key not in seen:
            seen.add(key)
            prepare_inputs(cfg)


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray sweep SWEEP.yaml [key=value ...]``: run (or resume) a sweep."""
    from fomo_ray.experiment_cli import run_cli

    ap = argparse.ArgumentParser(prog="fomo-ray sweep", description=main.__doc__)
    ap.add_argument("sweep", help="sweep YAML (see experiments/configs/)")
    return run_cli(ap, argv, default_sweep=None)
