"""Equal-compute budgets in Memory-Adjusted FLOPs (MAF; Roth et al. 2024, arXiv 2408.14471; docs/BENCHMARK.md §Budgets).

Every method gets the compute that full fine-tuning uses per task. For a method ``m``:

- ``GFLOPs(m)``: one training step (CLIP loss forward + backward + AdamW step, plus the method's per-step penalty)
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention), plus an analytic
  count of the elementwise optimizer-side work per trainable parameter (AdamW's update, EWC/SI's penalty, SI's
  path integral) that the counter does not see;
- ``PeakMem(m)``: on CUDA ``torch.cuda.max_memory_allocated`` over that step; on CPU a deterministic analytic count:
  parameters and buffers + gradients of the trainable parameters + AdamW state (2x trainable) + the method's state
  tensors + every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage);
- ``mem_mult(m) = PeakMem(m) / PeakMem(finetune)``, ``MAF(m) = GFLOPs(m) * mem_mult(m)``;
- ``steps_m = floor(steps_ft * MAF(finetune) / MAF(m) - extra_m)`` where ``extra_m`` is the method's per-task work
  (EWC's Fisher pass: ``ewc_fisher_batches`` forward+backward passes; SI's importance update) in equivalent steps of
  ``m``. The reference charged EWC's Fisher on every step (its Tab. 4 gives EWC 14 steps); it is charged per task here.

Which batch: the MAF is a step at the *global* batch ``mixture.batch_size`` as if on one device, as the paper
defines it (b = 512 on one GPU). The steps are then a property of the experiment, the same whatever the number of
data-parallel ranks (a rank holds its shard's activations but the whole state, so per-rank ratios would change with
W). No measurement runs a real pass larger than a rank's batch (:func:`rank_batch`), yet the figures are exactly
those of one step at the global batch:

- on a CPU (analytic memory) the step is *counted*: the prepared model's parameters become fake tensors
  (``FakeTensorMode``: shapes without data) and the same forward and backward dispatch through FlopCounterMode and
  the saved-tensor hooks at the global batch, allocating nothing (seconds for ViT-B/16 at b = 512);
- otherwise (CUDA, or a model that cannot run fake) real steps at two small batches ``b1 < b2`` (at most a rank's
  batch, :func:`sample_batches`) are extended along the line: FLOPs and saved activations are linear in the batch
  except the loss's ``b x b`` logits, which is measured alone at the global batch and added back
  (:func:`scale_step`); parameter, gradient, optimizer and method state do not grow with the batch. Exact for the
  analytic figures (``tests/test_budget_scaling.py``: every registered method, every engine, equal to one real step
  at the full batch); on CUDA as linear as the allocator's peak is.

Merging is counted free, as in the paper: merge methods train like full fine-tuning and get its steps.
Measurements are cached as JSON per (backbone, method, batch size, image size, device kind, method settings) under
``cfg.budget.cache_dir`` (``budget_records.py``); the arithmetic on them is ``budget_math.py``; this module measures
and ties them together. Budgets are always computed, never typed by hand. ``fomo-ray budget`` prints a Tab.4-style
table (:func:`main`).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fomo_ray.costs import ADAMW_FLOPS_PER_PARAM, PENALTY_FLOPS_PER_PARAM  # noqa: F401  (re-exported)
from fomo_ray.budgets.budget_math import (  # noqa: F401  (the arithmetic, re-exported where callers expect it)
    PAPER_TOTAL_FT_STEPS, REFERENCE_STEPS_VITB16_T20, TABLE_TASKS, budget_rows, ft_steps, maf, mem_mult,
    reference_steps, steps_from_costs, task_charge_steps)
from fomo_ray.budgets.budget_records import (  # noqa: F401  (the records and their cache, re-exported)
    CostRecord, cache_path, cached_measure, device_kind, safe_name)
from fomo_ray.maths.memory_saving import charge_memory_saving
from fomo_ray.budgets.step_measure import (  # noqa: F401  (the measurement, re-exported where callers expect it)
    BudgetError,
    StepMeasure,
    fake_model,
    unfilled,
    measure_step,
    scale_step,
)
log = logging.getLogger(__name__)

FT_METHOD = "finetune"
#: bump when the measured step changes, so cached records of another step are remeasured (2: the loop's own loss and
#: the method's state; 3: no pass larger than a rank's batch; 4: activation bytes under gradient checkpointing)
MEASURE_VERSION = 4


# --------------------------------------------------------------------------------------------------- method costs
@dataclass(frozen=True)
class MethodCost:
    """What the budget needs to know about a method beyond its training step.

    ``prepare`` freezes / wraps the model (trainable = ``requires_grad``); ``steady`` (optional) then puts the method
    in its steady state (e.g. EWC's Fisher and anchor), after the model is made fake for a count, so that state is
    fake too. A registered method brings its own per-step term (``extra_loss``) and state tensors (``state``); a
    hand-written cost may instead model a regulariser's penalty as ``sum c (theta - a)^2`` over the trainable
    parameters with ``penalty_state`` trainable-sized state tensors. Per-task work is ``task_passes`` extra
    forward+backward passes plus ``task_flops_per_param`` elementwise FLOPs per trainable parameter.
    """

    prepare: Callable[[nn.Module], nn.Module]
    penalty_state: int = 0
    step_flops_per_param: float = 0.0
    task_passes: int = 0
    task_flops_per_param: float = 0.0
    extra_loss: Callable[[nn.Module], torch.Tensor | None] | None = None
    state: Callable[[], Sequence[torch.Tensor]] | None = None
    steady: Callable[[nn.Module], None] | None = None
    task_gflops: Callable[[], float] | None = None  # counted per-task work, asked after ``steady`` (shapes known)


def prepared(cost: MethodCost, model: nn.Module) -> nn.Module:
    """``model`` prepared as ``cost`` trains it: ``prepare``, then ``steady``."""
    model = cost.prepare(model)
    if cost.steady is not None:
        cost.steady(model)
    return model


def registry_cost(cfg, name: str) -> MethodCost:
    """The :class:`MethodCost` of a registered method, from the method's own hooks: ``setup`` then ``steady_state``
    prepare the model, its ``extra_loss`` and state tensors enter the measured step, ``extra_cost`` adds what the
    counter cannot see; a method that declares ``cost_as`` costs what that method costs. A new method is charged by
    what it declares, never by its name."""
    from fomo_ray.methods import build_method  # methods import peft; only the budget of real methods needs them

    method = build_method(cfg.replace({"method.name": name}))
    if method.cost_as:  # e.g. merges train like fine-tuning, merging is free (docs/BENCHMARK.md §Budgets)
        return registry_cost(cfg, method.cost_as)
    if getattr(method, "step_as", None):  # trains like that method, plus its own per-task work (a continual merge's SVDs)
        base = registry_cost(cfg, method.step_as)
        steady = lambda model: (base.steady and base.steady(model), method.steady_state(model))  # noqa: E731
        return dataclasses.replace(base, steady=steady, task_gflops=lambda: method.extra_cost().task_gflops)
    extra = method.extra_cost()
    return MethodCost(prepare=method.setup, steady=method.steady_state,
                      step_flops_per_param=extra.step_flops_per_param,
                      task_passes=extra.task_passes, task_flops_per_param=extra.task_flops_per_param,
                      extra_loss=lambda model: method.extra_loss(model, 1),
                      state=lambda: _tensors(method.state_dict()), task_gflops=lambda: extra.task_gflops)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) method state dict."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _penalty(trainable: Sequence[nn.Parameter], n_state: int):
    """A quadratic penalty with the memory and compute shape of EWC/SI; returns (loss_fn, state tensors)."""
    if n_state == 0:
        return None, []
    importance = [torch.full_like(p, 1e-3).detach() for p in trainable]
    anchor = [p.detach().clone() for p in trainable]
    others = [torch.zeros_like(p) for _ in range(n_state - 2) for p in trainable]

    def loss_fn(_model: nn.Module) -> torch.Tensor:
        return sum(((p - a) ** 2 * c).sum() for p, a, c in zip(trainable, anchor, importance))

    return loss_fn, importance + anchor + others



#: how :func:`measure_method` obtains a step at the global batch (tests and benchmarks may set it):
#: "auto": on a CPU, counted on fake tensors (exact, allocates nothing; "scale" where a model cannot run fake),
#: on CUDA "scale"; "count"; "scale": real steps at two small batches of at most a rank's batch, extended along
#: the line (:func:`scale_step`); "direct": one real step at the global batch (what MEASURE_VERSION 2 did)
ENGINE = "auto"
#: the larger of the two real batches "scale" runs, when a rank's batch is larger: on a CPU the analytic figures are
#: exactly linear (small is enough); on CUDA larger batches make the allocator's rounding a smaller share of the slope
SAMPLE_BATCH = 4
CUDA_SAMPLE_BATCH = 16


def sample_batches(batch_size: int, rank_batch: int, largest: int = SAMPLE_BATCH) -> tuple[int, ...]:
    """The real batches "scale" measures for a step at ``batch_size`` when one rank runs ``rank_batch`` samples per
    forward pass: ``batch_size`` itself if that is no larger, else two batches ``b1 < b2`` with
    ``b2 = min(rank_batch, largest)`` and ``b1 = b2 // 2``, at least 2 where ``b2`` allows (a batch of one is
    special: BatchNorm refuses it in training, and size-1 dimensions change some layouts). A line needs two points:
    a rank batch of 1 is measured at 1 and 2."""
    b2 = min(rank_batch, largest, batch_size)
    if batch_size <= b2:
        return (batch_size,)
    if b2 < 2:
        return (1, 2)
    return (max(b2 // 2, min(2, b2 - 1)), b2)


def measure_method(name: str, cost: MethodCost, model_factory: Callable[[], nn.Module], *, backbone: str,
                   batch_size: int, image_size: int, context_length: int, device: str | torch.device = "cpu",
                   autocast_dtype: torch.dtype | None = None, settings_hash: str = "",
                   rank_batch: int | None = None, engine: str | None = None) -> CostRecord:
    """Build a fresh model, prepare it as ``cost`` says and measure one training step at ``batch_size`` without a
    real pass larger than ``rank_batch`` (default ``batch_size``), by ``engine`` (default :data:`ENGINE`).

    The global RNG state is restored afterwards: a run that measures (cache miss) and one that reads the cache must
    draw the same random numbers afterwards, or "same seed, same metrics" would depend on the cache.
    """
    device = torch.device(device)
    engine = engine or ENGINE
    if engine not in ("auto", "count", "scale", "direct"):
        raise BudgetError(f"unknown measurement engine {engine!r}: auto, count, scale or direct")
    if engine == "auto":
        engine = "count" if device.type == "cpu" else "scale"
    if engine == "count" and device.type != "cpu":
        raise BudgetError(f"a count on fake tensors gives CPU (analytic) memory, not {device.type}'s: measure with "
                          "engine 'scale' there")
    cuda = [device.index or 0] if device.type == "cuda" else []
    common = dict(name=name, cost=cost, model_factory=model_factory, backbone=backbone, batch_size=batch_size,
                  image_size=image_size, context_length=context_length, device=device,
                  autocast_dtype=autocast_dtype, settings_hash=settings_hash)
    with torch.random.fork_rng(devices=cuda):
        if engine == "count":
            try:
                return _measure_method(**common, batches=(), fake=True)
            except BudgetError:
                raise
            except Exception as e:  # an operation that needs data (e.g. a tower that branches on values)
                log.warning("budget: '%s' on %s cannot be counted on fake tensors (%s: %s); measuring real steps at "
                            "small batches instead", name, backbone, type(e).__name__, e)
            engine = "scale"
        largest = CUDA_SAMPLE_BATCH if device.type == "cuda" else SAMPLE_BATCH
        batches = (batch_size,) if engine == "direct" else sample_batches(batch_size, rank_batch or batch_size,
                                                                          largest)
        return _measure_method(**common, batches=batches, fake=False)


def _measure_method(name: str, cost: MethodCost, model_factory: Callable[[], nn.Module], *, backbone: str,
                    batch_size: int, image_size: int, context_length: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, settings_hash: str, batches: tuple[int, ...],
                    fake: bool) -> CostRecord:
    if fake:  # made fake before ``prepare`` and ``steady``: method state made from the parameters is fake as well
        try:
            model = fake_model(cost.prepare(fake_model(unfilled(model_factory, device))))  # (its adapters: fake too)
        except Exception:  # a preparation that needs real tensors (e.g. modules moved with .to()): real, then fake
            model = fake_model(cost.prepare(model_factory().to(device)))
    else:
        model = cost.prepare(model_factory().to(device))
    if cost.steady is not None:
        cost.steady(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    common = dict(backbone=backbone, method=name, batch_size=batch_size, image_size=image_size,
                  device_kind=device_kind(device), settings_hash=settings_hash)
    if not trainable:  # e.g. zero_shot: no training, no compute
        return CostRecord(**common, counted_gflops=0.0, elementwise_gflops=0.0, peak_bytes=0, memory_kind="none",
                          trainable_params=0, total_params=sum(p.numel() for p in model.parameters()),
                          task_gflops=0.0, measured="nothing trainable")
    if cost.extra_loss is not None:
        penalty_fn, state = cost.extra_loss, list(cost.state() if cost.state else ())
    else:
        penalty_fn, state = _penalty(trainable, cost.penalty_state)

    def step(b: int) -> StepMeasure:
        return measure_step(model, trainable, b, image_size, context_length, penalty_fn, device, method_state=state,
                            autocast_dtype=autocast_dtype)

    if fake:
        m, how = step(batch_size), f"counted at b={batch_size} (fake tensors)"
    elif len(batches) == 1:
        m, how = step(batches[0]), f"one step at b={batches[0]}"
    else:
        m = scale_step({b: step(b) for b in batches}, batch_size, device, autocast_dtype)
        how = f"scaled from b={', '.join(map(str, batches))}"
    elementwise = (ADAMW_FLOPS_PER_PARAM + cost.step_flops_per_param) * m.trainable_params / 1e9
    task = cost.task_passes * m.gflops + cost.task_flops_per_param * m.trainable_params / 1e9
    task += cost.task_gflops() if cost.task_gflops is not None else 0.0
    return CostRecord(**common, counted_gflops=m.gflops, elementwise_gflops=elementwise, peak_bytes=m.peak_bytes,
                      memory_kind=m.memory_kind, trainable_params=m.trainable_params, total_params=m.total_params,
                      task_gflops=task, measured=how, batch_bytes=m.batch_bytes,
                      checkpointed_batch_bytes=m.checkpointed_bytes)


# --------------------------------------------------------------------------------------------------- entry points
def settings_hash(cfg, extra: Mapping[str, Any] = ()) -> str:
    """Hash of what changes a method's training cost: its peft/reg settings, precision and context length."""
    from fomo_ray.config import to_dict

    method = to_dict(cfg.method)
    blob = {"peft": method["peft"], "reg": method["reg"], "precision": cfg.backbone.precision,
            "torch": torch.__version__, **dict(extra)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build fresh copies of a backbone for measuring."""

    name: str
    factory: Callable[[], nn.Module]
    image_size: int
    context_length: int


@functools.lru_cache(maxsize=32)  # its probe model costs seconds for real architectures; the spec only holds builders
def backbone_spec(name: str, image_size: int | None = None) -> BackboneSpec:
    """Fresh random-init copies of ``name`` (``fomo_ray.models.backbones``; open_clip directly at another image
    size)."""
    import open_clip

    from fomo_ray.models import backbones

    def random_model(make: Callable[[], Any]) -> Callable[[], Any]:
        def build() -> Any:
            # measurement models are random by design (only shapes and FLOPs matter): open_clip's "No pretrained
            # weights loaded ... initialized randomly" would be printed once per model built, i.e. per method measured
            with backbones.quiet_random_init():
                return make()
        return build

    backbones.register_tiny_archs()
    probe = random_model(lambda: backbones.create_backbone(name, pretrained=""))()
    native, ctx = probe.image_size, probe.context_length
    if image_size in (None, native):
        return BackboneSpec(name, random_model(lambda: backbones.create_backbone(name, pretrained="").model),
                            native, ctx)
    make = random_model(lambda: open_clip.create_model(name, pretrained=None, force_image_size=image_size))
    return BackboneSpec(name, make, image_size, ctx)


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    precision = cfg.backbone.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _world_size() -> int:
    """The live data-parallel world size (1 outside ``torch.distributed``), read without the loop's module."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_batch(cfg, batch_size: int | None = None) -> int:
    """The most samples one rank runs in one forward pass: its shard of the global batch, ``ceil(b / W)`` with W the
    larger of ``ray.num_workers`` and the live world size (an elastic run at fewer workers has larger shards), divided
    further by gradient accumulation's micro-batches where the config has ``optimizer.accum_steps``."""

    b = batch_size or cfg.mixture.batch_size
    shard = -(-b // max(1, cfg.ray.num_workers, _world_size()))
    accum = max(1, int(getattr(cfg.optimizer, "accum_steps", 1) or 1))
    return max(1, -(-shard // accum))


def _record_key(cfg, name: str, spec: BackboneSpec, bs: int) -> tuple[str, dict[str, Any]]:
    saving = {**({"accum_steps": cfg.optimizer.accum_steps} if cfg.optimizer.accum_steps > 1 else {}),
              **({"grad_checkpointing": True} if cfg.backbone.grad_checkpointing else {})}  # default: old keys
    from fomo_ray.methods import cost_settings  # what a method declares changes its cost (none: the old keys)
    saving.update({"method_cost": own} if (own := cost_settings(cfg, name)) else {})
    h = settings_hash(cfg, {"context_length": spec.context_length, "measure": MEASURE_VERSION, **saving})
    return h, dict(backbone=spec.name, method=name, batch_size=bs, image_size=spec.image_size, settings_hash=h)


def method_record(cfg, name: str, *, cost: MethodCost | None = None, backbone: BackboneSpec | None = None,
                  device: str | torch.device | None = None, batch_size: int | None = None,
                  store: bool = True, kind: str | None = None) -> CostRecord:
    """The (cached) :class:`CostRecord` of method ``name`` for ``cfg``'s backbone and batch size: one step at the
    global batch, measured on ``device`` without a real pass larger than a rank's batch (:func:`rank_batch`).

    ``kind``: read the record another device kind measured (e.g. the trials' GPU, for a driver without one) from
    the cache, never measure; :class:`BudgetError` when there is none (:func:`cached_kinds` lists them)."""
    dev = _device(device)
    spec = backbone or backbone_spec(cfg.backbone.name)
    bs = batch_size or cfg.mixture.batch_size
    h, expected = _record_key(cfg, name, spec, bs)
    expected["device_kind"] = kind or device_kind(dev)
    path = cache_path(cfg.budget.cache_dir, spec.name, name, bs, spec.image_size, expected["device_kind"], h)

    def compute() -> CostRecord:
        if kind is not None and kind != device_kind(dev):
            raise BudgetError(f"no cached budget record of '{name}' on {spec.name} at b={bs} measured on {kind} "
                              f"({path})")
        c = cost or registry_cost(cfg, name)
        record = measure_method(name, c, spec.factory, backbone=spec.name, batch_size=bs,
                                image_size=spec.image_size, context_length=spec.context_length, device=dev,
                                autocast_dtype=autocast_dtype(cfg, dev), settings_hash=h,
                                rank_batch=rank_batch(cfg, bs))
        return charge_memory_saving(record, cfg.optimizer.accum_steps, cfg.backbone.grad_checkpointing)

    return cached_measure(path, expected, compute, store)


def cached_kinds(cfg, name: str, *, backbone: BackboneSpec | None = None, batch_size: int | None = None) -> list[str]:
    """The device kinds that have a cached, current record of method ``name`` for ``cfg`` (sorted)."""
    spec = backbone or backbone_spec(cfg.backbone.name)
    bs = batch_size or cfg.mixture.batch_size
    h, expected = _record_key(cfg, name, spec, bs)
    prefix = cache_path(cfg.budget.cache_dir, spec.name, name, bs, spec.image_size, "KIND", h).name.split("KIND")
    out = []
    for path in Path(cfg.budget.cache_dir).glob(f"{glob.escape(prefix[0])}*{glob.escape(prefix[1])}"):
        try:
            record = CostRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if all(getattr(record, k) == v for k, v in expected.items()):
            out.append(record.device_kind)
    return sorted(set(out))


def steps_per_task(cfg, method_name: str, num_tasks: int, *, costs: Mapping[str, MethodCost] | None = None,
                   backbone: BackboneSpec | None = None, device: str | torch.device | None = None,
                   store: bool = True, kind: str | None = None) -> int:
    """Training steps per task for ``method_name`` under ``cfg.budget`` (the loop's entry point).

    ``mode == "equal_steps"`` gives every method ``steps_ft``; ``"maf"`` converts by measured MAFs. With
    ``budget.reference_backbone`` the budget is the compute of fine-tuning that backbone for ``steps_ft`` steps, so a
    larger backbone gets fewer steps (:func:`reference_steps`; Roth et al. 2024 compare model sizes at equal compute).
    ``costs`` overrides the registry (tests, custom methods); ``backbone`` overrides ``cfg.backbone.name``; ``kind``
    reads cached records of another device kind (:func:`method_record`).
    """
    steps_ft: float = ft_steps(cfg.budget.total_ft_steps, num_tasks)
    spec = backbone or backbone_spec(cfg.backbone.name)
    costs = costs or {}
    kw = dict(device=device, store=store, kind=kind)
    ref = cfg.budget.reference_backbone
    ft = None
    if ref and ref != spec.name:
        ft = method_record(cfg, FT_METHOD, cost=costs.get(FT_METHOD), backbone=spec, **kw)
        ft_ref = method_record(cfg.replace({"backbone.name": ref}), FT_METHOD, backbone=backbone_spec(ref), **kw)
        steps_ft = reference_steps(steps_ft, ft_ref, ft)
    if cfg.budget.mode == "equal_steps" or method_name == FT_METHOD:
        return _whole_steps(steps_ft, method_name, cfg)
    ft = ft or method_record(cfg, FT_METHOD, cost=costs.get(FT_METHOD), backbone=spec, **kw)
    m = method_record(cfg, method_name, cost=costs.get(method_name), backbone=spec, **kw)
    return steps_from_costs(steps_ft, ft, m)


def _whole_steps(steps: float, method_name: str, cfg) -> int:
    out = math.floor(steps + 1e-9)
    if out < 1:
        raise BudgetError(f"method '{method_name}' on {cfg.backbone.name} gets fewer than one step per task "
                          f"({steps:.2f}) under the budget of {cfg.budget.reference_backbone} (budget."
                          f"reference_backbone); raise budget.total_ft_steps or lower stream.num_tasks")
    return out


