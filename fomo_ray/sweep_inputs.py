"""A sweep's inputs, checked in the driver before any trial starts (without Ray, so ``--dry-run`` runs the same check).

A real sweep builds what its trials would otherwise wait for (benchmark, caption token ids, base checkpoint, the
CPU budget's measurement) once per distinct input combination, then checks every input a run reads
(``assembly.check_inputs``). A dry run makes the same checks on what exists and builds nothing: an input a run
would prepare (``inputs.PreparedByRun``) is listed, any other bad input refuses the sweep with the same line.
"""
from __future__ import annotations

from typing import Iterator, Mapping

from fomo_ray.config import ExperimentConfig
from fomo_ray.sweep_spec import Dim, SweepError, grid_points, trial_label, trial_overrides

INPUT_KEYS = ("data.", "stream.", "backbone.", "budget.", "method.name", "mixture.batch_size")


def ensure_trial_inputs(cfg: ExperimentConfig) -> None:
    """Build what a trial would otherwise wait for: its benchmark and base checkpoint (``fomo_ray.prep``) and, for
    CPU trials, the budget's cached MAF measurement -- once, in the driver, so concurrent trials never race to
    build them. (GPU trials measure on their GPU: the budget cache is per device.)"""
    from fomo_ray import prep
    from fomo_ray.assembly import check_inputs, check_named_files
    from fomo_ray.budget import steps_per_task
    from fomo_ray.methods import build_method

    check_named_files(cfg)  # before building anything for a config that names a missing file
    prep.ensure_inputs(cfg)
    check_inputs(cfg)
    if cfg.ray.gpus_per_worker == 0:
        method = build_method(cfg)
        steps_per_task(cfg, method.cost_as or method.name, cfg.stream.num_tasks, device="cpu")


def input_combinations(base: ExperimentConfig, space: Mapping[str, Dim]) -> Iterator[tuple[str, ExperimentConfig]]:
    """(label, config) of each distinct combination of the inputs the sweep's trials read."""
    seen = set()
    for combo in grid_points(space) or [{}]:
        cfg = base.replace(trial_overrides(combo, space))
        key = tuple(sorted((k, str(v)) for k, v in cfg.flat().items() if k.startswith(INPUT_KEYS)))
        if key not in seen:
            seen.add(key)
            yield (trial_label(combo, space) if combo else "every trial"), cfg


def ensure_sweep_inputs(base: ExperimentConfig, space: Mapping[str, Dim], build: bool = True) -> list[str]:
    """:func:`ensure_trial_inputs` once per input combination (``build``), or, for a dry run, the same checks on what
    exists with nothing built or written. A bad input stops the sweep before any trial starts with a ``SweepError``
    naming the trial and the culprit. Returns what a dry run found missing that the real run prepares."""
    from fomo_ray.assembly import check_inputs
    from fomo_ray.inputs import PreparedByRun

    prepared = []
    for label, cfg in input_combinations(base, space):
        try:
            if build:
                ensure_trial_inputs(cfg)
            else:
                check_inputs(cfg)
        except ValueError as e:  # ConfigError, DataError, InputsMissing, BackboneError, BudgetError, ...
            if not build and isinstance(e, PreparedByRun):
                prepared.append(f"{label}: {e}")
                continue
            raise SweepError(f"trial {label}: {type(e).__name__}: {e} (checked before launch; no trial started)"
                             ) from e
    return prepared
