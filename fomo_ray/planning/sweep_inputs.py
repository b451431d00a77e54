"""A sweep's inputs, checked in the driver before any trial starts (without Ray, so ``--dry-run`` runs the same check).

A real sweep builds what its trials would otherwise wait for (benchmark, caption token ids, base checkpoint, the
CPU budget's measurement) once per distinct input combination, then checks every input a run reads
(``assembly.check_inputs``). A dry run makes the same checks on what exists and builds nothing: an input a run
would prepare (``inputs.PreparedByRun``) is listed, any other bad input refuses the sweep with the same line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from fomo_ray.config import ExperimentConfig
from fomo_ray.planning.sweep_spec import (Dim, SweepError, SweepPlan, SweepSpec, enumerated_dims, grid_points,
                                          plan_sweep, trial_label, trial_overrides)

INPUT_KEYS = ("data.", "stream.", "backbone.", "budget.", "method.name", "mixture.batch_size")


def ensure_trial_inputs(cfg: ExperimentConfig) -> None:
    """Build what a trial would otherwise wait for: its benchmark and base checkpoint (``fomo_ray.prep``) and, for
    CPU trials, the budget's cached MAF measurement -- once, in the driver, so concurrent trials never race to
    build them. (GPU trials measure on their GPU: the budget cache is per device.)"""
    from fomo_ray import prep
    from fomo_ray.core.assembly import check_inputs, check_named_files
    from fomo_ray.budgets.budget import steps_per_task
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
    from fomo_ray.core.assembly import check_inputs
    from fomo_ray.core.inputs import PreparedByRun

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


@dataclass(frozen=True)
class SweepCheck:
    """What a dry run finds (``fomo-ray sweep --dry-run``, ``fomo_ray.sweep(..., dry_run=True)``): the plan, the
    inputs a real sweep would prepare, the trials' cost estimate (``cost_estimate.TrialCost`` rows, in start order
    by ``spec.order``) and its printed table, and under a sweep budget the plan's line."""

    spec: SweepSpec
    plan: SweepPlan
    costs: list[Any]
    estimate: str
    prepared: list[str] = field(default_factory=list)
    inputs_checked: bool = True
    budget_line: str = ""

    def text(self) -> str:
        """The dry run's printout."""
        spec, plan = self.spec, self.plan
        checked = "and inputs valid" if self.inputs_checked else "valid (inputs not checked: --no-input-check)"
        lines = [f"{spec.name}: {plan.total} trial(s), search={spec.search}, "
                 f"{'TorchTrainer' if plan.use_train else 'function'} trials; all configs {checked}"]
        lines += [f"  to be prepared by the real sweep: {line}" for line in self.prepared]
        fixed = enumerated_dims(plan.space)  # the spec's space plus the seeds dimension (seeds > 1)
        lines += [f"  {trial_label(combo, fixed)}" for combo in grid_points(fixed)]
        lines += [f"  sampled per trial: {k} ~ {d.kind}{list(d.values)}" for k, d in plan.space.items()
                  if k not in fixed]
        lines.append(self.estimate)
        if self.budget_line:
            lines.append(self.budget_line)
        if spec.search == "optuna":
            lines.append(f"  (optuna chooses {spec.num_samples} trial(s) among these combinations)")
        return "\n".join(lines)


def check_sweep(spec: SweepSpec, device: Any = None, check_inputs: bool = True) -> SweepCheck:
    """Validate every trial (no Ray), its inputs (the check a real sweep makes before launch, building nothing) and
    the tracking store (an unreachable URI fails, nothing is created), and estimate the trials' cost (measurements
    it needs are made and not cached). Raises ``SweepError`` (or the config's, the inputs', the store's error) with
    the line a real sweep would refuse with."""
    from fomo_ray.planning.cost_estimate import cost_order, estimate_plan, format_estimate, local_slots

    plan = plan_sweep(spec)
    if plan.base.tracking.enabled:
        from fomo_ray.tracking.writer import check_reachable, resolve_uri

        check_reachable(resolve_uri(plan.base.tracking.uri, plan.base.output_dir), create=False)
    prepared = ensure_sweep_inputs(plan.base, plan.space, build=False) if check_inputs else []
    costs = estimate_plan(plan, device, store=False)
    source = device.describe() if device is not None else "timed on this machine's device"
    estimate = format_estimate(costs, local_slots(plan.base, plan.use_train), source, spec.order)
    budget_line = ""
    if spec.sweep_budget is not None:
        from fomo_ray.planning.sweep_budget import SweepBudgetError, needs_by_label, plan_line

        try:
            needs = needs_by_label(spec.sweep_budget, costs, plan.base.ray.gpus_per_worker)
        except SweepBudgetError as e:
            raise SweepError(str(e)) from e
        budget_line = plan_line(spec.sweep_budget, [needs[costs[i].label] for i in cost_order(costs, spec.order)])
    ordered = [costs[i] for i in cost_order(costs, spec.order)]
    return SweepCheck(spec, plan, ordered, estimate, list(prepared), check_inputs, budget_line)
