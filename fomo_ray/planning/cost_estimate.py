"""What a sweep will cost before it starts, and the order that finishes it soonest.

The MAF budget (``fomo_ray/budgets/budget.py``, docs/BENCHMARK.md §Budgets) fixes every trial's training steps in
advance, so its cost is known before launch: per trial the steps, the training GFLOPs (steps x the measured GFLOPs of
one step, plus the method's per-task work such as EWC's Fisher pass), the evaluation GFLOPs (every image and text
encoded at every evaluation point x the forward GFLOPs of one), and a wall time. The time comes from this machine's
device, timed on the run's shapes (``fomo_ray/planning/throughput.py``), or from a declared device: GFLOPs / (TFLOP/s x
MFU), e.g. an H100 at ``--device-tflops 989 --mfu 0.4``.

Nothing here runs a real pass at a trial's full batch: the budget counts a step on fake tensors (no memory, seconds
for ViT-B/16 at b = 512) or scales small real batches (``fomo_ray/budgets/budget.py``), and the timing scales a small
timed batch by FLOPs. A driver without the trials' device (GPU trials, a CPU-only head node) reads the step counts from
the budget records the trials' GPU cached, if there are any for one GPU kind; otherwise it counts the step on its
CPU and marks the steps *provisional* (``*``): FLOPs are the same on every device, but GPU trials budget by their
allocator's peak memory, which a CPU cannot measure, so their memory multipliers (and steps) may differ.

Trials start longest first (LPT list scheduling: each next trial takes the first free slot; Graham 1969 bounds its
makespan by 4/3 of the optimum), so a long trial never starts last and runs alone. :func:`makespan` simulates a
start order on K slots and :func:`makespan_bound` gives max(total / K, longest), below which no order can finish.
"""
from __future__ import annotations

import functools
import heapq
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

ORDERS = ("cost", "fifo")


class EstimateError(ValueError):
    """A cost estimate cannot be made as asked (e.g. an MFU outside (0, 1]); the message names the culprit."""


# --------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class DeclaredDevice:
    """A device the estimate assumes instead of timing this machine: peak TFLOP/s at the run's precision and the
    model FLOPs utilisation (MFU) a training run reaches on it."""

    tflops: float
    mfu: float

    def __post_init__(self) -> None:
        if not self.tflops > 0:
            raise EstimateError(f"--device-tflops must be > 0, got {self.tflops}")
        if not 0 < self.mfu <= 1:
            raise EstimateError(f"--mfu must be in (0, 1], got {self.mfu}")

    def seconds(self, gflops: float) -> float:
        return gflops / (self.tflops * 1e3 * self.mfu)

    def describe(self) -> str:
        return f"declared device: {self.tflops:g} TFLOP/s x {self.mfu:g} MFU"


@dataclass(frozen=True)
class TrialCost:
    """The estimated cost of one trial. ``seconds`` is None when no throughput is known (a GPU trial estimated on a
    driver without that GPU and no declared device); ``eval_gflops`` is None when the benchmark is not built yet."""

    label: str
    backbone: str
    method: str
    tasks: int                 # tasks trained (joint: 1)
    steps: int                 # training steps over the whole stream
    train_gflops: float
    eval_gflops: float | None
    seconds: float | None
    workers: int = 1
    maf: float = 0.0           # MAF of one training step (GFLOPs x memory multiplier; docs/BENCHMARK.md §Budgets)
    provisional: bool = False  # steps from this CPU's count for GPU trials: their own measurement may differ
    fixed_s: float | None = None  # of ``seconds``: the fixed costs (fomo_ray/planning/overhead.py); None = not timed

    @property
    def total_gflops(self) -> float:
        return self.train_gflops + (self.eval_gflops or 0.0)

    @property
    def key(self) -> float:
        """What longest-first orders by: the wall time when known, else the GFLOPs."""
        return self.seconds if self.seconds is not None else self.total_gflops


# --------------------------------------------------------------------------------------------------- pure math
def lpt_order(keys: Sequence[float]) -> list[int]:
    """Indices of ``keys`` longest first; equal keys keep their given order (a deterministic start order)."""
    return sorted(range(len(keys)), key=lambda i: (-keys[i], i))


def makespan(durations: Sequence[float], slots: int, order: Sequence[int] | None = None) -> float:
    """When the last trial ends if trials start in ``order`` (default: as given), each on the first free of
    ``slots`` equal slots (how Tune starts pending trials as resources free up)."""
    if slots < 1:
        raise EstimateError(f"slots must be >= 1, got {slots}")
    free = [0.0] * slots
    for i in (order if order is not None else range(len(durations))):
        heapq.heappush(free, heapq.heappop(free) + durations[i])
    return max(free)


def makespan_bound(durations: Sequence[float], slots: int) -> float:
    """max(total / K, longest): no start order finishes sooner."""
    return max(sum(durations) / slots, max(durations, default=0.0))


def train_gflops(steps: int, tasks: int, step_gflops: float, task_gflops: float) -> float:
    """Training GFLOPs of a stream: every step plus the method's per-task extra work."""
    return steps * step_gflops + tasks * task_gflops


def eval_gflops(workloads: Sequence[tuple[int, int]], image_gflops: float, text_gflops: float) -> float:
    """Evaluation GFLOPs: every (images, texts) encoded at every evaluation point x one forward pass each."""
    return sum(i * image_gflops + t * text_gflops for i, t in workloads)


# --------------------------------------------------------------------------------------------------- estimating
def estimate_trial(cfg: Any, label: str, *, device: DeclaredDevice | None = None, store: bool = True,
                   timed: bool = True) -> TrialCost:
    """The :class:`TrialCost` of one trial config. Reads (or measures, storing unless ``store`` is False) the
    budget's cost records and, without a declared device, this machine's timed throughput (``timed=False``: no
    time, only steps and GFLOPs, e.g. to log a run's compute)."""
    import numpy as np

    from fomo_ray.budgets import budget
    from fomo_ray.core.assembly import eval_plan
    from fomo_ray.methods import build_method

    method = build_method(cfg)
    cost_name = method.cost_as or method.name
    T = cfg.stream.num_tasks
    where = _measure_device(cfg)
    kind = trials_kind(cfg, cost_name) if where is None else None  # what the trials' own GPU cached, if anything
    kw = dict(device=where or "cpu", store=store, kind=kind)
    steps_per_task = budget.steps_per_task(cfg, cost_name, T, **kw)
    plan = method.task_plan([np.zeros(0, dtype=np.int64)] * T, steps_per_task)
    steps = sum(p.steps for p in plan)
    record = budget.method_record(cfg, cost_name, **kw)
    trained = train_gflops(steps, len(plan), record.step_gflops, record.task_gflops) if steps else 0.0
    ft = budget.method_record(cfg, budget.FT_METHOD, **kw)
    # only the MAF ratio of a method to fine-tuning depends on the device's memory figure
    provisional = (where is None and kind is None and cfg.budget.mode == "maf" and cost_name != budget.FT_METHOD
                   and record.trainable_params > 0)
    maf = budget.maf(record, ft) if record.trainable_params else 0.0
    points = eval_plan(len(plan), cfg)
    loads = _eval_loads(cfg, points)
    image_g, text_g = forward_gflops(cfg.backbone.name)
    evals = None if loads is None else eval_gflops(loads, image_g, text_g)
    workers = max(1, cfg.ray.num_workers)
    fixed = None  # timed only where the trial's own work is (a declared device gives its compute alone)
    if device is not None:
        seconds = device.seconds(trained + (evals or 0.0)) / workers
    elif where is None or not timed:
        seconds = None
    else:
        from fomo_ray.planning.throughput import measured_speed

        sp = measured_speed(cfg, cost_name, device=where, threads=max(1, int(cfg.ray.cpus_per_worker)), store=store,
                            sample_bytes=record.batch_bytes // max(1, record.batch_size))
        task_steps = budget.task_charge_steps(record) if record.step_gflops else 0.0
        seconds = ((steps + len(plan) * task_steps) * sp.step_s
                   + sum(i * sp.image_s + t * sp.text_s for i, t in loads or ())) / workers
        fixed = _fixed_seconds(cfg, where, [p.steps for p in plan], points, loads, store)
        seconds += fixed or 0.0
    return TrialCost(label=label, backbone=cfg.backbone.name, method=cfg.method.name, tasks=len(plan), steps=steps,
                     train_gflops=trained, eval_gflops=evals, seconds=seconds, workers=workers, maf=maf,
                     provisional=provisional, fixed_s=fixed)


def _fixed_seconds(cfg: Any, where: str, steps: list[int], points: Mapping[int, bool],
                   loads: list[tuple[int, int]] | None, store: bool) -> float | None:
    """The trial's fixed costs timed on this machine (``fomo_ray/planning/overhead.py``); None before the benchmark
    exists. Every worker pays them at once, so they do not shrink with the worker count; a CPU trial also decodes its
    training images on the cores its steps use (shared out among its workers)."""
    from fomo_ray.planning.overhead import checkpoint_count, measured_overhead, trial_seconds

    o = measured_overhead(cfg, device=where, threads=max(1, int(cfg.ray.cpus_per_worker)), store=store)
    if o is None:
        return None
    train_images = sum(steps) * cfg.mixture.batch_size // max(1, cfg.ray.num_workers) if where == "cpu" else 0
    return trial_seconds(o, eval_images=decoded_eval_images(points, loads, subset_kept=cfg.evaluation.cache_mb > 0),
                         checkpoints=checkpoint_count(steps, cfg.ray.checkpoint_every_steps),
                         train_images=train_images)


def decoded_eval_images(points: Mapping[int, bool], loads: Sequence[tuple[int, int]] | None, subset_kept: bool) -> int:
    """Images a trial decodes for evaluation, from ``_eval_loads(cfg, points)`` (per point its subsets, then its full
    sets where ``points`` says so): the subsets once when they are kept (``evaluation.cache_mb``), else at every point,
    and every full-set evaluation."""
    loads = iter(loads or ())
    decoded = 0
    for i, full in enumerate(points.values()):
        subset = next(loads, (0, 0))[0]
        decoded += subset if i == 0 or not subset_kept else 0
        if full:
            decoded += next(loads, (0, 0))[0]
    return decoded


def trials_kind(cfg: Any, cost_name: str) -> str | None:
    """The one GPU kind whose budget records of ``cost_name`` and fine-tuning (and the reference backbone's, if any)
    are cached for ``cfg`` (a trial on that GPU measured them); None when there is none, or several (the trials'
    GPU is then unknown here)."""
    from fomo_ray.budgets import budget

    kinds = set(budget.cached_kinds(cfg, budget.FT_METHOD)) & set(budget.cached_kinds(cfg, cost_name))
    ref = cfg.budget.reference_backbone
    if ref and ref != cfg.backbone.name:
        kinds &= set(budget.cached_kinds(cfg.replace({"backbone.name": ref}), budget.FT_METHOD))
    gpus = sorted(k for k in kinds if k.startswith("cuda"))
    return gpus[0] if len(gpus) == 1 else None


def _measure_device(cfg: Any) -> str | None:
    """Where this machine can time a trial's work: its CPU for CPU trials, its GPU for GPU trials (None: a GPU trial
    estimated on a driver without one)."""
    import torch

    if cfg.ray.gpus_per_worker > 0:
        return "cuda" if torch.cuda.is_available() else None
    return "cpu"


def _eval_loads(cfg: Any, points: Mapping[int, bool]) -> list[tuple[int, int]] | None:
    """(images, texts) of every evaluation: the subsets at each point, the full test sets too where ``points`` says
    so (``assembly.eval_plan``); None when the benchmark is not built yet."""
    fingerprint = json.dumps({"root": cfg.data.root, "eval": str(cfg.evaluation), "seed": cfg.seed,
                              "gen": [cfg.data.generator_seed, cfg.data.image_size, cfg.data.scale]})
    per_set = _workloads(fingerprint, cfg)
    if per_set is None:
        return None
    return [per_set[full] for full_too in points.values() for full in ((False, True) if full_too else (False,))]


_WORKLOADS: dict[str, dict[bool, tuple[int, int]] | None] = {}  # per benchmark and evaluation settings


def _workloads(fingerprint: str, cfg: Any) -> dict[bool, tuple[int, int]] | None:
    cached = _WORKLOADS.get(fingerprint)
    if cached is not None or fingerprint in _WORKLOADS:
        return cached
    from fomo_ray.core.assembly import open_data
    from fomo_ray.models.evaluation import Evaluator

    try:
        bench = open_data(cfg)
    except (OSError, ValueError):  # not built yet (a dry run on a fresh machine): the evaluation cost is unknown
        _WORKLOADS[fingerprint] = None
        return None
    # counting only: the normalisation is never applied
    ev = Evaluator(bench, cfg.evaluation, cfg.seed, image_size=1, mean=(0.0,), std=(1.0,), backend="memory")
    _WORKLOADS[fingerprint] = {full: ev.workload(full) for full in (False, True)}
    return _WORKLOADS[fingerprint]


@functools.lru_cache(maxsize=16)
def forward_gflops(backbone: str) -> tuple[float, float]:
    """(GFLOPs to encode one image, one text) of ``backbone``, counted by ``FlopCounterMode`` on a batch of two."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fomo_ray.budgets import budget, step_measure

    spec = budget.backbone_spec(backbone)
    with torch.random.fork_rng():
        model = spec.factory().eval()
    images, tokens = step_measure.clip_batch(2, spec.image_size, spec.context_length,
                                        int(getattr(model, "vocab_size", 0) or 49408), torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for encode, x in ((model.encode_image, images), (model.encode_text, tokens)):
            with FlopCounterMode(display=False, custom_mapping=step_measure.CPU_ATTENTION_FLOPS) as counter:
                encode(x)
            out.append(counter.get_total_flops() / 2 / 1e9)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------- the table
def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _gflops(g: float | None) -> str:
    if g is None:
        return "?"
    return f"{g / 1e3:,.1f} TF" if g >= 1e4 else f"{g:,.0f} GF"


def format_estimate(costs: Sequence[TrialCost], slots: int | None, source: str, order: str = "cost") -> str:
    """The estimate table printed before launch: one line per trial (in start order) and the totals; with ``slots``
    the sweep's wall time in that order and the bound."""
    starts = cost_order(costs, order)
    width = max([len(c.label) for c in costs] + [5])
    lines = [f"cost estimate ({source}; trials in start order: {'longest first' if order == 'cost' else 'FIFO'})",
             f"  {'trial':<{width}}  {'steps':>7}  {'train':>10}  {'eval':>10}  {'est. time':>9}"]
    for i in starts:
        c = costs[i]
        mark = "*" if c.provisional else " "
        lines.append(f"  {c.label:<{width}}  {c.steps:>7,}{mark} {_gflops(c.train_gflops):>10}  "
                     f"{_gflops(c.eval_gflops):>10}  {_duration(c.seconds):>9}")
    known = [c.seconds for c in costs if c.seconds is not None]
    total_s = sum(known) if len(known) == len(costs) else None
    evals = [c.eval_gflops for c in costs]
    lines.append(f"  {'total':<{width}}  {sum(c.steps for c in costs):>7,}  "
                 f"{_gflops(sum(c.train_gflops for c in costs)):>10}  "
                 f"{_gflops(None if None in evals else sum(evals)):>10}  {_duration(total_s):>9}")
    if total_s is not None and slots:
        durations = [c.seconds for c in costs]
        lines.append(f"  on {slots} slot(s): est. sweep wall time {_duration(makespan(durations, slots, starts))} "
                     f"(bound max(total/K, longest) = {_duration(makespan_bound(durations, slots))})")
    if None in evals:
        lines.append("  eval ?: the benchmark is not built yet (a real run builds it first); the times leave evaluation out")
    if total_s is None:
        lines.append("  time ?: no throughput for these trials here; declare one with --device-tflops and --mfu")
    if any(c.provisional for c in costs):
        lines.append("  steps*: provisional, counted on this machine's CPU for GPU trials: FLOPs are exact, but the "
                     "trials budget by their GPU's peak memory and may get other steps (once a trial has run, its "
                     "cached budget records are read here)")
    return "\n".join(lines)


def budget_params(c: TrialCost) -> dict[str, Any]:
    """What a run logs about the compute it spends (MLflow params): steps over the stream, the MAF of one step and
    the training GFLOPs (the budget's own count)."""
    return {"budget.steps": c.steps, "budget.maf": round(c.maf, 4), "budget.train_gflops": round(c.train_gflops, 1)}


def estimate_summary(costs: Sequence[TrialCost], slots: int | None, order: str) -> dict[str, float]:
    """The totals the sweep's parent MLflow run records (``Estimate/*``)."""
    out = {"Estimate/train_gflops": sum(c.train_gflops for c in costs),
           "Estimate/eval_gflops": sum(c.eval_gflops or 0.0 for c in costs),
           "Estimate/steps": float(sum(c.steps for c in costs))}
    if all(c.seconds is not None for c in costs) and costs:
        durations = [c.seconds for c in costs]
        out["Estimate/trial_seconds"] = sum(durations)
        if slots:
            starts = cost_order(costs, order)
            out["Estimate/wall_seconds"] = makespan(durations, slots, starts)
            out["Estimate/bound_seconds"] = makespan_bound(durations, slots)
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


# --------------------------------------------------------------------------------------------------- a sweep
def estimate_plan(plan: Any, device: DeclaredDevice | None = None, store: bool = True) -> list[TrialCost]:
    """One :class:`TrialCost` per entry of ``sweep_spec.enumerated_trials`` (sampled keys at their base values: they rarely
    change the cost); identical configs are estimated once."""
    from fomo_ray.planning.sweep_spec import enumerated_dims, enumerated_trials, point_label, trial_overrides

    fixed = enumerated_dims(plan.space)
    seen: dict[str, TrialCost] = {}
    out = []
    for combo in enumerated_trials(plan):
        label = point_label(combo, plan.space)
        if label not in seen:
            try:
                seen[label] = estimate_trial(plan.base.replace(trial_overrides(combo, fixed)), label, device=device,
                                             store=store)
            except EstimateError:
                raise
            except ValueError as e:  # BudgetError, DataError, ...: name the trial
                raise EstimateError(f"trial {label}: cannot estimate its cost: {type(e).__name__}: {e}") from e
        out.append(seen[label])
    return out


def cost_order(costs: Sequence[TrialCost], order: str) -> list[int]:
    """The start order of a sweep's trials: longest first (``cost``) or as enumerated (``fifo``)."""
    if order not in ORDERS:
        raise EstimateError(f"order must be one of {list(ORDERS)}, got {order!r}")
    return lpt_order([c.key for c in costs]) if order == "cost" else list(range(len(costs)))


def local_slots(cfg: Any, use_train: bool) -> int | None:
    """How many trials run at once on this machine (a local Ray); None for a remote cluster (unknown here)."""
    import os

    r = cfg.ray
    if r.max_concurrent_trials:
        return r.max_concurrent_trials
    if r.address:
        return None
    per_trial = r.cpus_per_worker * (r.num_workers if use_train else 1)
    return max(1, int((os.cpu_count() or 1) // max(per_trial, 1e-9)))


def estimate_rows(costs: Sequence[TrialCost]) -> list[dict[str, Any]]:
    """The estimate as table rows (``estimate.csv`` in the sweep directory, and the trials table's ``est_*``)."""
    return [{"label": c.label, "backbone": c.backbone, "method": c.method, "tasks": c.tasks, "steps": c.steps,
             "maf": round(c.maf, 4), "provisional": c.provisional, "train_gflops": round(c.train_gflops, 3),
             "eval_gflops": None if c.eval_gflops is None else round(c.eval_gflops, 3),
             "est_s": None if c.seconds is None else round(c.seconds, 2),
             "est_fixed_s": None if c.fixed_s is None else round(c.fixed_s, 2)} for c in costs]
