"""Sweep specifications without Ray: parse, validate and plan a sweep YAML (``fomo_ray/engine/tune_sweep.py`` runs it on
Tune).

A sweep is a base config plus a *space*, written in YAML (``experiments/configs/*.yaml``) or Python::

    name: merge_weights
    config: ""                          # optional base config YAML
    base: {method.name: ema_merge}      # dotted overrides applied to every trial
    search: grid                        # grid | random | optuna
    num_samples: 1                      # samples per grid point (random / optuna: the number of trials)
    metric: GM                          # what optuna optimises (the final evaluation point's value)
    order: cost                         # cost: longest trial first (default) | fifo: the grid's order
    seeds: 3                            # optional: every variant over seeds base.seed .. base.seed + 2 (default 1)
    stopping: {rule: trails_best, min_tasks: 2, margin: 5}   # optional: cooperative early stopping (stopping.py)
    sweep_budget: {gpu_hours: 40}       # optional: what the whole sweep may spend (sweep_budget.py; or pflops)
    space:
      method.merge.weight: {grid: [0.1, 0.5, 0.9]}
      optimizer.lr: {loguniform: [1.0e-5, 1.0e-3]}      # also: uniform, randint, choice
      variant:                          # a name that is not a config key: labelled bundles of overrides
        points: {finetune: {method.name: finetune}, zs: {method.name: zero_shot}}

Every trial's config is built and validated before Ray starts (an unknown key or an invalid value fails fast with
a :class:`~fomo_ray.config.ConfigError` naming it): :func:`plan_sweep` returns the validated :class:`SweepPlan`.
This module never imports Ray, not even lazily, so ``fomo-ray sweep --dry-run`` and validating a shipped YAML work
(and stay fast) without starting or importing it. It also owns the sweep directory policy (a finished sweep is never
overwritten) and the deterministic trial labels and names.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from fomo_ray.config import (ConfigError, ExperimentConfig, load_config, parse_override, read_yaml_mapping, short_key)
from fomo_ray.planning.presets import (PresetError, check_presets, check_sized_for, preset_overrides, preset_path,
                                       sizing_error, swept_backbones)
from fomo_ray.planning.stopping import StoppingError, StoppingRule, parse_stopping
from fomo_ray.planning.sweep_budget import SweepBudget, SweepBudgetError, parse_sweep_budget
from fomo_ray.trial_report import TrialStatus

SEARCHES = ("grid", "random", "optuna")
TRAINERS = ("auto", "train", "function")
DIM_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "points")
REFERENCES_KIND = "references"  # the dimension ``references:`` adds (not written in a space: not in DIM_KINDS)
REFERENCE_KEY = "reference"
#: the reference points of every study (Roth et al. 2024): the untouched base, plain fine-tuning, joint training
REFERENCES: dict[str, dict[str, Any]] = {"zero_shot": {"method.name": "zero_shot"},
                                         "finetune": {"method.name": "finetune"},
                                         "joint": {"method.name": "joint"}}
SPEC_KEYS = ("name", "config", "base", "search", "num_samples", "metric", "mode", "trainer", "space", "report",
             "description", "order", "stopping", "seeds", "references", "sized_for", "presets", "sweep_budget")
ORDERS = ("cost", "fifo")  # trials start longest first by estimated cost, or in the grid's order
SUMMARY_FILE = "summary.json"  # written last: its presence means the sweep finished
SWEEP_STATE_FILE = "sweep.json"  # written at the start: the parent run id, storage and MLflow store
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
        value = config.get(key)
        if value is None:  # a reference trial leaves the swept keys at the base config's values
            continue
        if dim.kind in ("points", REFERENCES_KIND):
            out.update(dict(dim.values)[value])
        else:
            out[key] = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
    return out


def enumerated_dims(space: Mapping[str, Dim]) -> dict[str, Dim]:
    """The dimensions whose values are listed, not sampled (grid, points, references): they make the trials Tune
    starts one by one, in an order the sweep chooses (``cost_estimate``)."""
    return {k: d for k, d in space.items() if d.kind in ("grid", "points", REFERENCES_KIND)}


def enumerated_trials(plan: Any) -> list[dict[str, Any]]:
    """The Tune configs of a sweep plan's enumerated dimensions, once per sample, in the grid's order (the
    references last): what Tune would start in FIFO order. Sampled dimensions are left out (each trial draws them)."""
    repeats = 1 if plan.spec.search == "optuna" else plan.spec.num_samples
    return [combo for combo in grid_points(enumerated_dims(plan.space)) for _ in range(repeats)]


def grid_points(space: Mapping[str, Dim]) -> list[dict[str, Any]]:
    """The cartesian product of the enumerable dims (grid, choice, points) as Tune configs; ranges take their ends
    (used for validation: every enumerable combination, each range end). The reference trials (:data:`REFERENCES`,
    the ``references`` dimension) come after them, crossed with the seeds only: every other key is None there (not
    set: the base config's value), and None is the reference key of every other trial."""
    crossed = {k: d for k, d in space.items() if d.kind != REFERENCES_KIND}
    extra = {k: d for k, d in space.items() if d.kind == REFERENCES_KIND}
    out = [{**combo, **dict.fromkeys(extra)} for combo in _product(crossed)]
    for key, d in extra.items():
        seeds = {k: v for k, v in crossed.items() if k == SEED_KEY}
        for label, _ in d.values:
            out += [{**dict.fromkeys(crossed), **dict.fromkeys(extra), **combo, key: label}
                    for combo in _product(seeds)]
    return out


def _product(space: Mapping[str, Dim]) -> list[dict[str, Any]]:
    keys = list(space)
    lists = [[lbl for lbl, _ in space[k].values] if space[k].kind == "points" else space[k].candidates() for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def check_names(cfg: ExperimentConfig) -> None:
    """Registry checks a config type cannot express: the method, the merge operator, the architecture.

    Raises ConfigError naming the key, so a misspelt name fails before any trial starts rather than inside one.
    """
    from fomo_ray.maths.merge_ops import OPERATORS
    from fomo_ray.methods import build_method

    build_method(cfg)  # UnknownMethodError (a ConfigError) lists the valid names
    if cfg.method.merge.operator not in OPERATORS:
        raise ConfigError(f"config key 'method.merge.operator': unknown operator {cfg.method.merge.operator!r}; "
                          f"valid: {', '.join(OPERATORS)}")
    from fomo_ray.models.backbones import BackboneError, _check_arch

    try:
        _check_arch(cfg.backbone.name)
    except BackboneError as e:
        raise ConfigError(f"config key 'backbone.name': {e}") from e


def validate_space(base: ExperimentConfig, space: Mapping[str, Dim]) -> int:
    """Build every trial config the space can produce (ranges at both ends) and validate it; return the count.

    Raises ConfigError naming the culprit (key and, for points, the label) before any trial starts.
    """
    for key, dim in space.items():
        if dim.kind in ("points", REFERENCES_KIND):
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
    crossed = math.prod(len(d.values) for d in space.values() if d.kind in ("grid", "points"))
    seeds = len(space[SEED_KEY].values) if SEED_KEY in space else 1
    refs = sum(len(d.values) for d in space.values() if d.kind == REFERENCES_KIND)
    return (crossed + refs * seeds) * num_samples


def check_search(space: Mapping[str, Dim], search: str) -> None:
    """Refuse what the searcher cannot do: optuna samples, so it cannot enumerate a grid (points are fine: they
    become a categorical)."""
    if search != "optuna":
        return
    for key, d in space.items():
        if d.kind == "grid":
            raise SweepError(f"sweep space key '{key}': optuna samples, it cannot enumerate a grid; "
                             f"write it as {{choice: [...]}}")


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
    report_baseline: str = ""   # the variant label (or label part) vs_baseline.md subtracts; "" = fine-tuning
    description: str = ""
    order: str = "cost"         # cost: longest trial first (fomo_ray/planning/cost_estimate.py); fifo: the grid's order
    stopping: StoppingRule | None = None  # cooperative early stopping at task boundaries (fomo_ray/planning/stopping.py)
    seeds: int = 1              # every variant repeated over seeds base.seed .. base.seed + seeds - 1 (seed_dim)
    references: tuple[str, ...] = ()  # reference trials added at the base config (REFERENCES), crossed with seeds
    sized_for: str = ""         # the backbone scale the sweep's numbers were chosen for ("tiny" | "real"; fomo_ray/planning/presets.py)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> {base: ..., space: ...} at that scale
    preset: str = ""            # the preset applied (load_sweep(preset=...)); "" = none
    keep_sizing: bool = False   # run a tiny-sized sweep on a real backbone anyway (--keep-sizing)
    sweep_budget: SweepBudget | None = None  # what the whole sweep may spend (fomo_ray/planning/sweep_budget.py)

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
    report = check_report(data.get("report"), source)
    order = data.get("order", "cost")
    if order not in ORDERS:
        raise SweepError(f"{source}: order '{order}' is not one of {list(ORDERS)}")
    try:
        stopping = parse_stopping(data.get("stopping"), source)
        sweep_budget = parse_sweep_budget(data.get("sweep_budget"), source)
    except (StoppingError, SweepBudgetError) as e:
        raise SweepError(str(e)) from e
    seeds = check_seeds(data.get("seeds", 1), source)
    references = check_references(data.get("references"), source)
    try:
        sized_for, presets = check_sized_for(data.get("sized_for"), source), check_presets(data.get("presets"), source)
    except PresetError as e:
        raise SweepError(str(e)) from e
    return SweepSpec(name=str(data["name"]), space=parse_space(data.get("space")), base=dict(base),
                     config=str(data.get("config") or ""), search=search, num_samples=int(data.get("num_samples", 1)),
                     metric=str(data.get("metric", "GM")), mode=mode, trainer=trainer,
                     report_x=str(report.get("x", "")), report_baseline=str(report.get("baseline", "")),
                     description=str(data.get("description", "")),
                     order=order, stopping=stopping, seeds=seeds, references=references, sized_for=sized_for,
                     presets=presets, sweep_budget=sweep_budget)


def apply_preset(spec: SweepSpec, preset: str, near: Path | None = None) -> SweepSpec:
    """``spec`` at the scale of ``preset`` (a name or a YAML file; fomo_ray/planning/presets.py): the preset file's keys
    over the sweep's base, then the sweep's own ``presets.<name>`` base keys and space dimensions."""
    try:
        path = preset_path(preset, near)
        keys = preset_overrides(path)
    except PresetError as e:
        raise SweepError(str(e)) from e
    section = spec.presets.get(preset, spec.presets.get(path.stem, {}))
    space = {**parse_space(spec.space), **parse_space(section.get("space"))}  # the preset's dimensions replace
    return replace(spec, base={**spec.base, **keys, **dict(section.get("base") or {})}, space=space,
                   preset=path.stem if path.parent.name == "presets" else str(path))


def check_sizing(spec: SweepSpec, base: ExperimentConfig, space: Mapping[str, Dim]) -> None:
    """A sweep sized for the tiny CPU models does not run on a real backbone unless a preset moved it there or the
    user said --keep-sizing; the error names the sweep's sizing, the backbones and both flags."""
    problem = None if spec.preset or spec.keep_sizing else sizing_error(
        spec.name, spec.sized_for, swept_backbones(base.backbone.name, space), base.flat())
    if problem:
        raise SweepError(problem)


REPORT_KEYS = ("x", "baseline")


def check_report(report: Any, source: str) -> Mapping[str, Any]:
    """The ``report:`` mapping: ``x`` (the swept key final scores are plotted against) and ``baseline`` (the variant
    the paired comparison subtracts, e.g. ``cosine`` in a schedule study that fine-tunes in every variant)."""
    if report is None:
        return {}
    if not isinstance(report, Mapping):
        raise SweepError(f"{source}: 'report' must be a mapping with keys {list(REPORT_KEYS)}, not {report!r}")
    unknown = sorted(set(report) - set(REPORT_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown report key(s) {unknown}; valid: {list(REPORT_KEYS)}")
    return report


def load_sweep(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = (), preset: str = "") -> SweepSpec:
    """Read a sweep YAML; ``preset`` (a name or YAML file) moves it to that preset's scale (:func:`apply_preset`);
    ``overrides`` (``k=v`` strings or a dict) are then added to its ``base``.

    A relative ``config:`` path resolves against the sweep file's directory.
    """
    p = Path(path)
    data = read_yaml_mapping(p, "sweep file", SweepError)
    spec = spec_from_dict(data, str(p))
    if spec.config and not Path(spec.config).is_absolute():
        spec = replace(spec, config=str((p.parent / spec.config).resolve()))
    if preset:
        spec = apply_preset(spec, preset, p.parent)
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
    if is_finished(d) and if_exists in ("auto", "resume"):  # a later run of the same sweep may be the unfinished one
        later = sorted((p for p in root.glob(f"{name}-*") if p.name[len(name) + 1:].isdigit() and any(p.iterdir())),
                       key=lambda p: int(p.name[len(name) + 1:]))
        if later and not is_finished(later[-1]):
            return later[-1], True
    finished = is_finished(d)
    if if_exists == "refuse":
        state = "finished (results in it)" if finished else TrialStatus.INTERRUPTED
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


# --------------------------------------------------------------------------------------------------- resume check
# Keys that say how a sweep runs, not what it computes: they may change when a sweep is resumed (e.g. on a bigger
# cluster). Every other key must match the interrupted sweep's, or one results table would mix two studies.
EXECUTION_KEYS = ("ray.", "tracking.", "data.num_workers", "data.prefetch", "data.loader", "evaluation.cache_mb")


def sweep_identity(base: ExperimentConfig, space_json: str) -> dict[str, Any]:
    """What a resumed sweep must share with the interrupted one: every result-relevant key of the base config (the
    flat config as JSON values) and the space."""
    flat = json.loads(json.dumps(base.flat(), default=str))
    return {"config": {k: v for k, v in flat.items() if not k.startswith(EXECUTION_KEYS)}, "space": space_json}


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every differing key (and the space), empty when the sweeps are the same study."""
    old, new = saved.get("config", {}), now.get("config", {})
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if saved.get("space") != now.get("space"):
        diffs.append(f"space: {saved.get('space')} -> {now.get('space')}")
    return diffs


# --------------------------------------------------------------------------------------------------- trial names
_LABEL_CHARS = re.compile(r"[^\w.,=+-]")


def trial_label(config: Mapping[str, Any], space: Mapping[str, Dim]) -> str:
    """Readable, deterministic trial label from its swept values, e.g. ``weight=0.3`` or ``finetune``."""
    parts = []
    for key, dim in space.items():
        v = config.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):  # not set (a reference trial's swept keys)
            continue
        if dim.kind in ("points", REFERENCES_KIND):
            parts.append(str(v))
        else:
            v = v.item() if hasattr(v, "item") else v
            parts.append(f"{short_key(key)}={v:.4g}" if isinstance(v, float) else f"{short_key(key)}={v}")
    return _LABEL_CHARS.sub("_", ",".join(parts))[:80] or "trial"


def point_label(config: Mapping[str, Any], space: Mapping[str, Dim]) -> str:
    """The label of the enumerated point a trial config belongs to (sampled keys ignored; ``trial`` when nothing is
    enumerated): how the estimate, the trial cache and the budgets name a trial before Tune names it."""
    return trial_label(config, enumerated_dims(space))


def trial_name(trial: Any, space: Mapping[str, Dim]) -> str:
    """``<index>-<label>``: unique in the sweep, readable in the MLflow UI and plots. The index is the counter in
    Tune's trial id (``5dd10_00003``); searchers that draw their own ids (Optuna) keep the id instead."""
    suffix = str(trial.trial_id).rsplit("_", 1)[-1]
    prefix = f"{int(suffix):03d}" if suffix.isdigit() else str(trial.trial_id)
    return f"{prefix}-{trial_label(trial.config, space)}"


def use_train_for(spec: SweepSpec, cfg: ExperimentConfig) -> bool:
    """TorchTrainer for multi-worker (DDP / elastic) trials or on request; a plain function trial otherwise."""
    if spec.trainer != "auto":
        return spec.trainer == "train"
    return cfg.ray.num_workers > 1 or cfg.ray.min_workers > 0


# --------------------------------------------------------------------------------------------------- seeds
SEED_KEY = "seed"  # the config key a multi-seed sweep adds as its last grid dimension


def check_seeds(value: Any, source: str = "sweep") -> int:
    """``seeds`` as an int >= 1 (a bool, a float or a string is refused, naming ``source``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"{source}: seeds must be an integer >= 1 (runs per variant), got {value!r}")
    return value


def check_references(value: Any, source: str = "sweep") -> tuple[str, ...]:
    """``references: true`` (all of :data:`REFERENCES`), a list of their names, or false/absent (none)."""
    if value in (None, False):
        return ()
    if value is True:
        return tuple(REFERENCES)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{source}: references must be true or a list of {list(REFERENCES)}, got {value!r}")
    unknown = [v for v in value if v not in REFERENCES]
    if unknown:
        raise SweepError(f"{source}: unknown reference(s) {unknown}; valid: {list(REFERENCES)}")
    return tuple(dict.fromkeys(value))


def reference_dim(names: tuple[str, ...], space: Mapping[str, Dim], search: str) -> dict[str, Dim]:
    """``{"reference": Dim}`` of the reference trials; refuses what would make them ambiguous."""
    if search == "optuna":
        raise SweepError("sweep 'references' adds fixed trials, but optuna chooses its own; add them to a grid sweep")
    if REFERENCE_KEY in space:
        raise SweepError(f"sweep 'references' and the space key '{REFERENCE_KEY}' clash; rename the space key")
    for key, d in space.items():
        clash = [label for label, _ in d.values if label in names] if d.kind == "points" else []
        if clash:
            raise SweepError(f"sweep point(s) {clash} of '{key}' are also references: drop them from the points "
                             f"(references: true runs them once)")
    return {REFERENCE_KEY: Dim(REFERENCES_KIND, tuple((n, REFERENCES[n]) for n in names))}


def seed_dim(seeds: int, base_seed: int, space: Mapping[str, Dim]) -> Dim | None:
    """The grid ``seed: [base_seed, ..., base_seed + seeds - 1]`` that repeats every variant over ``seeds`` seeds,
    or None for one seed (the space is left as it is). Refuses a space that already sets ``seed`` (a swept ``seed``
    key or a point that overrides it): the two would fight over the same key."""
    seeds = check_seeds(seeds)
    if seeds == 1:
        return None
    if SEED_KEY in space:
        raise SweepError(f"sweep 'seeds: {seeds}' and the space key '{SEED_KEY}' both sweep the seed; use one")
    for key, dim in space.items():
        for label, bundle in (dim.values if dim.kind == "points" else ()):
            if SEED_KEY in bundle:
                raise SweepError(f"sweep 'seeds: {seeds}' and point '{key}={label}' (which sets '{SEED_KEY}') both "
                                 "set the seed; use one")
    return Dim("grid", tuple(range(base_seed, base_seed + seeds)))


# --------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep, before anything is launched (no Tune objects: ``sweep.to_tune`` makes the param space)."""
    spec: SweepSpec
    base: ExperimentConfig     # the validated base config (absolute paths; the tracking URI too once tracked)
    space: Mapping[str, Dim]
    total: int                 # trials Tune will run
    use_train: bool            # TorchTrainer trials (else plain Tune function trials)
    tracking_uri: str = ""     # "" = not tracked (tracking disabled, or the store not opened yet)

    def tracked(self, uri: str) -> SweepPlan:
        """The plan logging to the opened tracking store ``uri`` (absolute, so identical in every trial: Tune moves
        each trial into its own directory)."""
        return replace(self, base=self.base.replace({"tracking.uri": uri}), tracking_uri=uri)


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Validate everything a sweep's trials need (config keys and values of every trial, names, the searcher)
    without Ray; raises ConfigError / SweepError naming the culprit. ``spec.seeds`` > 1 adds the grid dimension
    ``seed`` (:func:`seed_dim`) last, so the plan's space is the spec's plus the seeds.

    The tracking store is an edge (MLflow): whoever runs or dry-runs the sweep opens it (``tracking.tracker_for``,
    which fails on an unreachable URI before any trial starts) and records it with :meth:`SweepPlan.tracked`.
    """
    base = spec.base_config()
    space = parse_space(spec.space)
    if spec.references:  # before the seeds: labels read `finetune,seed=1`
        space = {**space, **reference_dim(spec.references, space, spec.search)}
    seeds = seed_dim(spec.seeds, base.seed, space)
    if seeds is not None:  # appended last: trial labels read `variant,seed=1`
        if spec.search == "optuna":
            raise SweepError(f"sweep 'seeds: {spec.seeds}' repeats every variant over the same seeds, but optuna "
                             "chooses its own trials; search with seeds: 1, then repeat the chosen configs in a grid")
        space = {**space, SEED_KEY: seeds}
    check_sizing(spec, base, space)
    validate_space(base, space)
    check_search(space, spec.search)
    total = trial_count(space, spec.search, spec.num_samples)
    return SweepPlan(spec, base, space, total, use_train_for(spec, base))


def recorded_stores(output_dir: str | Path) -> list[str]:
    """The MLflow stores of the sweeps under ``output_dir`` (as their ``sweep.json`` recorded them), the default store
    (``output_dir/mlflow.db``) first: where a bare MLflow run id is looked for."""
    from fomo_ray.tracking.writer import DB_NAME

    root = Path(output_dir).expanduser()
    uris = [f"sqlite:///{(root / DB_NAME).resolve()}"] if (root / DB_NAME).is_file() else []
    for state in sorted(root.glob(f"sweeps/*/{SWEEP_STATE_FILE}")):
        try:
            uri = json.loads(state.read_text()).get("tracking_uri", "")
        except (OSError, ValueError):
            continue
        if uri and uri not in uris:
            uris.append(uri)
    return uris
