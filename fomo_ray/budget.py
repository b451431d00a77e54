"""Equal-compute budgets in Memory-Adjusted FLOPs (MAF; Roth et al. 2024, arXiv 2408.14471, §3 / DESIGN §4).

Every method gets the compute that full fine-tuning uses per task. For a method ``m``:

- ``GFLOPs(m)``: one *real* training step (CLIP loss forward + backward + AdamW step, plus the method's per-step
  penalty) counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention), plus an
  analytic count of the elementwise optimizer-side work per trainable parameter (AdamW's update, EWC/SI's penalty,
  SI's path integral) that the counter does not see;
- ``PeakMem(m)``: on CUDA ``torch.cuda.max_memory_allocated`` over that step; on CPU a deterministic analytic count:
  parameters and buffers + gradients of the trainable parameters + AdamW state (2x trainable) + the method's state
  tensors + every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage);
- ``mem_mult(m) = PeakMem(m) / PeakMem(finetune)``, ``MAF(m) = GFLOPs(m) * mem_mult(m)``;
- ``steps_m = floor(steps_ft * MAF(finetune) / MAF(m) - extra_m)`` where ``extra_m`` is the method's per-task work
  (EWC's Fisher pass: ``ewc_fisher_batches`` forward+backward passes; SI's importance update) in equivalent steps of
  ``m``. The reference charged EWC's Fisher on every step (its Tab. 4 gives EWC 14 steps); it is charged per task here.

Merging is counted free, as in the paper: merge methods train like full fine-tuning and get its steps.
Measurements are cached as JSON per (backbone, method, batch size, image size, device kind, method settings) under
``cfg.budget.cache_dir``; budgets are always computed, never typed by hand. ``fomo-ray budget`` prints a Tab.4-style
table (:func:`main`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fomo_ray.atomic import write_json
from fomo_ray.costs import ADAMW_FLOPS_PER_PARAM, PENALTY_FLOPS_PER_PARAM  # noqa: F401  (re-exported)
log = logging.getLogger(__name__)

FT_METHOD = "finetune"
#: what a measurement means: bump when the measured step changes, so cached records of another step are remeasured
MEASURE_VERSION = 2  # 2: the loop's own loss (losses.clip_loss) and the method's real extra_loss and state
#: DESIGN §4: 28,400 full fine-tuning steps over the whole stream (ViT-B/16, b = 512)
PAPER_TOTAL_FT_STEPS = 28_400
TABLE_TASKS = (20, 50, 100, 200)
#: DESIGN §4 reference steps per task (ViT-B/16, b = 512, T = 20), shown beside the measured ones
REFERENCE_STEPS_VITB16_T20: dict[str, str] = {
    "finetune": "1420", "locked_text": "1949", "locked_image": "12982", "lnfit": "3179", "bitfit": "3179",
    "lora": "1898 (r=4), 1891 (r=64)", "dora": "1893 (r=4)", "vera": "1898 (r=4)", "si": "1418",
    "ewc": "14 (Fisher per step)", "ema_merge": "1420", "zs_merge": "1420", "ft_merge": "1420",
    "offline_merge": "1420", "merge": "1420",
}
# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that nn.MultiheadAttention uses on
# CPU; the same formulas apply (they only read the q/k/v shapes), so CPU and GPU counts agree.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class BudgetError(ValueError):
    """A budget that cannot be met (fewer than one step per task) or an unusable measurement; names the method."""


# --------------------------------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class StepMeasure:
    """One training step of one prepared model."""

    gflops: float          # counted by FlopCounterMode over forward + backward + optimizer step
    peak_bytes: int        # see memory_kind
    memory_kind: str       # "cuda_max_allocated" | "cpu_analytic"
    trainable_params: int
    total_params: int


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _unique_bytes(tensors, skip: set | None = None) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        key = _storage_key(t)
        if skip is None or key not in skip:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _clip_batch(batch_size: int, image_size: int, context_length: int, vocab_size: int, device: torch.device):
    """A fixed synthetic batch: FLOPs and memory do not depend on the values, only on the shapes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, vocab_size - 1, (batch_size, context_length), generator=g)
    tokens[:, -1] = vocab_size - 1  # the end-of-text token (largest id) is where open_clip pools the text
    return images.to(device), tokens.to(device)


def _clip_loss(out) -> torch.Tensor:
    """The loop's training loss (``losses.contrastive_loss``: InfoNCE, or SigLIP's sigmoid loss for a model with a
    ``logit_bias``) on the model output (open_clip's tuple or dict form)."""
    from fomo_ray.losses import contrastive_loss

    if isinstance(out, dict):
        return contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                out.get("logit_bias"))
    return contrastive_loss(*out[:4])


def measure_step(model: nn.Module, trainable_params: Sequence[nn.Parameter], batch_size: int, image_size: int,
                 context_length: int, extra_loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", *, method_state: Sequence[torch.Tensor] = (),
                 autocast_dtype: torch.dtype | None = None) -> StepMeasure:
    """Run one real training step of ``model`` (CLIP loss + ``extra_loss_fn`` forward/backward, AdamW step over
    ``trainable_params``) and return its FLOPs and peak memory. The model is trained by one step: pass a copy.

    ``method_state``: tensors the method keeps during training (e.g. EWC's Fisher and anchor), counted in the CPU
    memory figure (on CUDA they are part of the allocated memory anyway).
    """
    device = torch.device(device)
    trainable = list(trainable_params)
    if not trainable:
        raise BudgetError("measure_step: no trainable parameter, nothing to train")
    model.train()
    vocab = int(getattr(model, "vocab_size", 0) or 49408)
    images, tokens = _clip_batch(batch_size, image_size, context_length, vocab, device)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    # parameters and method state are counted once below, not again when autograd saves them
    counted_keys = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *method_state]}
    saved: dict[tuple[str, int], int] = {}
    alive: list[torch.Tensor] = []  # hold every saved tensor until the count is done: a freed storage's address
    # can be reused by a later tensor (seen with DoRA's dropped graph branches), which made the dedup undercount

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not cuda:  # on CUDA the allocator's peak is the figure; holding tensors would inflate it
            alive.append(t)
        key = _storage_key(t)
        if key not in counted_keys and t.device.type != "meta":
            saved[key] = t.untyped_storage().nbytes()
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = _clip_loss(model(images, tokens))
            extra = extra_loss_fn(model) if extra_loss_fn is not None else None
            if extra is not None:
                loss = loss + extra
        loss.backward()
        optimizer.step()
    if not torch.isfinite(loss.detach()):
        raise BudgetError(f"measure_step: the measured step's loss is not finite ({float(loss)})")
    if cuda:
        torch.cuda.synchronize(device)
        peak, kind = int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    else:
        model_bytes = _unique_bytes(list(model.parameters()) + list(model.buffers()))
        trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
        state_bytes = _unique_bytes(method_state)
        # params + grads + AdamW (exp_avg, exp_avg_sq) + method state + activations saved for backward
        peak = model_bytes + 3 * trainable_bytes + state_bytes + sum(saved.values())
        kind = "cpu_analytic"
    return StepMeasure(gflops=counter.get_total_flops() / 1e9, peak_bytes=peak, memory_kind=kind,
                       trainable_params=sum(p.numel() for p in trainable),
                       total_params=sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------------------------------- method costs
@dataclass(frozen=True)
class MethodCost:
    """What the budget needs to know about a method beyond its training step.

    ``prepare`` freezes / wraps the model (trainable = ``requires_grad``). A registered method brings its own per-step
    term (``extra_loss``) and state tensors (``state``); a hand-written cost may instead model a regulariser's penalty
    as ``sum c (theta - a)^2`` over the trainable parameters with ``penalty_state`` trainable-sized state tensors.
    Per-task work is ``task_passes`` extra forward+backward passes plus ``task_flops_per_param`` elementwise FLOPs
    per trainable parameter.
    """

    prepare: Callable[[nn.Module], nn.Module]
    penalty_state: int = 0
    step_flops_per_param: float = 0.0
    task_passes: int = 0
    task_flops_per_param: float = 0.0
    extra_loss: Callable[[nn.Module], torch.Tensor | None] | None = None
    state: Callable[[], Sequence[torch.Tensor]] | None = None


def registry_cost(cfg, name: str) -> MethodCost:
    """The :class:`MethodCost` of a registered method, from the method's own hooks: ``setup`` then ``steady_state``
    prepare the model, its ``extra_loss`` and state tensors enter the measured step, ``extra_cost`` adds what the
    counter cannot see; a method that declares ``cost_as`` costs what that method costs. A new method is charged by
    what it declares, never by its name."""
    from fomo_ray.methods import build_method  # methods import peft; only the budget of real methods needs them

    method = build_method(cfg.replace({"method.name": name}))
    if method.cost_as:  # e.g. merges train like full fine-tuning and merging is counted free (DESIGN §4)
        return registry_cost(cfg, method.cost_as)

    def prepare(model: nn.Module) -> nn.Module:
        model = method.setup(model)
        method.steady_state(model)
        return model

    extra = method.extra_cost()
    return MethodCost(prepare=prepare, step_flops_per_param=extra.step_flops_per_param,
                      task_passes=extra.task_passes, task_flops_per_param=extra.task_flops_per_param,
                      extra_loss=lambda model: method.extra_loss(model, 1),
                      state=lambda: _tensors(method.state_dict()))


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


# --------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CostRecord:
    """A cached measurement of one method on one backbone / batch / image size / device."""

    backbone: str
    method: str
    batch_size: int
    image_size: int
    device_kind: str
    settings_hash: str
    counted_gflops: float       # FlopCounterMode, forward + backward (+ the optimizer's matmul-free step: 0)
    elementwise_gflops: float   # analytic optimizer-side work per step
    peak_bytes: int
    memory_kind: str
    trainable_params: int
    total_params: int
    task_gflops: float          # per-task extra work
    torch_version: str = torch.__version__

    @property
    def step_gflops(self) -> float:
        return self.counted_gflops + self.elementwise_gflops


def measure_method(name: str, cost: MethodCost, model_factory: Callable[[], nn.Module], *, backbone: str,
                   batch_size: int, image_size: int, context_length: int, device: str | torch.device = "cpu",
                   autocast_dtype: torch.dtype | None = None, settings_hash: str = "") -> CostRecord:
    """Build a fresh model, ``cost.prepare`` it and measure one training step (:func:`measure_step`).

    The global RNG state is restored afterwards: a run that measures (cache miss) and one that reads the cache must
    draw the same random numbers afterwards, or "same seed, same metrics" would depend on the cache.
    """
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _measure_method(name, cost, model_factory, backbone=backbone, batch_size=batch_size,
                               image_size=image_size, context_length=context_length, device=device,
                               autocast_dtype=autocast_dtype, settings_hash=settings_hash)


def _measure_method(name: str, cost: MethodCost, model_factory: Callable[[], nn.Module], *, backbone: str,
                    batch_size: int, image_size: int, context_length: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, settings_hash: str) -> CostRecord:
    model = cost.prepare(model_factory().to(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    common = dict(backbone=backbone, method=name, batch_size=batch_size, image_size=image_size,
                  device_kind=device_kind(device), settings_hash=settings_hash)
    if not trainable:  # e.g. zero_shot: no training, no compute
        return CostRecord(**common, counted_gflops=0.0, elementwise_gflops=0.0, peak_bytes=0, memory_kind="none",
                          trainable_params=0, total_params=sum(p.numel() for p in model.parameters()),
                          task_gflops=0.0)
    if cost.extra_loss is not None:
        penalty_fn, state = cost.extra_loss, list(cost.state() if cost.state else ())
    else:
        penalty_fn, state = _penalty(trainable, cost.penalty_state)
    m = measure_step(model, trainable, batch_size, image_size, context_length, penalty_fn, device,
                     method_state=state, autocast_dtype=autocast_dtype)
    elementwise = (ADAMW_FLOPS_PER_PARAM + cost.step_flops_per_param) * m.trainable_params / 1e9
    task = cost.task_passes * m.gflops + cost.task_flops_per_param * m.trainable_params / 1e9
    return CostRecord(**common, counted_gflops=m.gflops, elementwise_gflops=elementwise, peak_bytes=m.peak_bytes,
                      memory_kind=m.memory_kind, trainable_params=m.trainable_params, total_params=m.total_params,
                      task_gflops=task)


def device_kind(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def cache_path(cache_dir: str | Path, backbone: str, method: str, batch_size: int, image_size: int,
               kind: str, settings_hash: str) -> Path:
    name = f"{_safe(backbone)}__{_safe(method)}__b{batch_size}__px{image_size}__{_safe(kind)}__{settings_hash}.json"
    return Path(cache_dir) / name


def _write_atomic(path: Path, data: dict) -> None:
    """Temp file in the same directory + rename: a reader never sees a half-written record."""
    write_json(path, data, indent=1, sort_keys=True)


def cached_measure(path: Path, expected: Mapping[str, Any], compute: Callable[[], CostRecord],
                   store: bool = True) -> CostRecord:
    """The record at ``path`` if it exists and matches ``expected``; otherwise ``compute()`` and store it (unless
    ``store`` is False: a dry run writes nothing)."""
    if path.is_file():
        try:
            record = CostRecord(**json.loads(path.read_text()))
            if all(getattr(record, k) == v for k, v in expected.items()):
                return record
            log.warning("budget cache %s does not match %s; measuring again", path, dict(expected))
        except (ValueError, TypeError) as e:
            log.warning("budget cache %s is unreadable (%s); measuring again", path, e)
    if not store and path in _UNSTORED:
        return _UNSTORED[path]
    record = compute()
    if store:
        _write_atomic(path, dataclasses.asdict(record))
    else:
        _UNSTORED[path] = record
    return record


_UNSTORED: dict[Path, CostRecord] = {}  # measured but not stored (dry runs): measured once per process


# --------------------------------------------------------------------------------------------------- pure budget math
def ft_steps(total_ft_steps: int, num_tasks: int) -> int:
    """``steps_ft(T) = total // T`` (DESIGN §4: 28,400 // 20 = 1420)."""
    if num_tasks < 1:
        raise BudgetError(f"num_tasks must be >= 1, got {num_tasks}")
    steps = total_ft_steps // num_tasks
    if steps < 1:
        raise BudgetError(f"budget.total_ft_steps={total_ft_steps} over {num_tasks} tasks gives full fine-tuning "
                          f"{steps} steps per task; raise budget.total_ft_steps or lower stream.num_tasks")
    return steps


def mem_mult(m: CostRecord, ft: CostRecord) -> float:
    if m.memory_kind != ft.memory_kind:
        raise BudgetError(f"cannot compare memory of '{m.method}' ({m.memory_kind}) with '{ft.method}' "
                          f"({ft.memory_kind}); measure both on the same device kind")
    return m.peak_bytes / ft.peak_bytes


def maf(m: CostRecord, ft: CostRecord) -> float:
    """``MAF(m) = GFLOPs(m) * PeakMem(m) / PeakMem(ft)``."""
    return m.step_gflops * mem_mult(m, ft)


def task_charge_steps(m: CostRecord) -> float:
    """Per-task extra work of ``m`` in its own training steps (the memory multiplier cancels)."""
    return m.task_gflops / m.step_gflops if m.step_gflops > 0 else 0.0


def steps_from_costs(steps_ft: float, ft: CostRecord, m: CostRecord) -> int:
    """``floor(steps_ft * MAF(ft) / MAF(m) - per-task charge)``; 0 for a method that trains nothing.

    Raises :class:`BudgetError` naming the method and the budget when fewer than one step remains.
    """
    if m.trainable_params == 0:
        return 0
    ratio = maf(ft, ft) / maf(m, ft)
    charge = task_charge_steps(m)
    raw = steps_ft * ratio - charge
    steps = math.floor(raw + 1e-9)  # 1e-9: finetune's own ratio is 1 up to rounding
    if steps < 1:
        raise BudgetError(
            f"method '{m.method}' gets fewer than one step per task ({raw:.2f}): the budget of {steps_ft} full "
            f"fine-tuning steps "
            f"(MAF {maf(ft, ft):.4g}) buys {steps_ft * ratio:.2f} steps at MAF {maf(m, ft):.4g}, minus "
            f"{charge:.2f} steps of per-task extra work; raise budget.total_ft_steps or lower stream.num_tasks")
    return steps


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
    """Fresh random-init copies of ``name`` (``fomo_ray.backbones`` when it exists, else open_clip directly)."""
    try:
        from fomo_ray import backbones
    except ImportError:
        backbones = None
    import open_clip

    # measurement models are random by design (only shapes and FLOPs matter): open_clip's "No pretrained weights
    # loaded ... initialized randomly" would be printed once per model built, i.e. per method measured
    quiet = backbones.quiet_random_init if backbones is not None else contextlib.nullcontext

    def random_model(make: Callable[[], Any]) -> Callable[[], Any]:
        def build() -> Any:
            with quiet():
                return make()
        return build

    if backbones is not None:
        backbones.register_tiny_archs()
        probe = random_model(lambda: backbones.create_backbone(name, pretrained=""))()
        native, ctx = probe.image_size, probe.context_length
        if image_size in (None, native):
            return BackboneSpec(name, random_model(lambda: backbones.create_backbone(name, pretrained="").model),
                                native, ctx)
    if image_size is None:
        make = random_model(lambda: open_clip.create_model(name, pretrained=None))
        probe = make()
        return BackboneSpec(name, make, probe.visual.image_size[0] if isinstance(probe.visual.image_size, tuple)
                            else probe.visual.image_size, probe.context_length)
    make = random_model(lambda: open_clip.create_model(name, pretrained=None, force_image_size=image_size))
    return BackboneSpec(name, make, image_size, make().context_length)


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    precision = cfg.backbone.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def method_record(cfg, name: str, *, cost: MethodCost | None = None, backbone: BackboneSpec | None = None,
                  device: str | torch.device | None = None, batch_size: int | None = None,
                  store: bool = True) -> CostRecord:
    """The (cached) :class:`CostRecord` of method ``name`` for ``cfg``'s backbone and batch size."""
    dev = _device(device)
    spec = backbone or backbone_spec(cfg.backbone.name)
    bs = batch_size or cfg.mixture.batch_size
    h = settings_hash(cfg, {"context_length": spec.context_length, "measure": MEASURE_VERSION})
    path = cache_path(cfg.budget.cache_dir, spec.name, name, bs, spec.image_size, device_kind(dev), h)
    expected = dict(backbone=spec.name, method=name, batch_size=bs, image_size=spec.image_size,
                    device_kind=device_kind(dev), settings_hash=h)

    def compute() -> CostRecord:
        c = cost or registry_cost(cfg, name)
        return measure_method(name, c, spec.factory, backbone=spec.name, batch_size=bs, image_size=spec.image_size,
                              context_length=spec.context_length, device=dev,
                              autocast_dtype=_autocast_dtype(cfg, dev), settings_hash=h)

    return cached_measure(path, expected, compute, store)


def steps_per_task(cfg, method_name: str, num_tasks: int, *, costs: Mapping[str, MethodCost] | None = None,
                   backbone: BackboneSpec | None = None, device: str | torch.device | None = None,
                   store: bool = True) -> int:
    """Training steps per task for ``method_name`` under ``cfg.budget`` (the loop's entry point).

    ``mode == "equal_steps"`` gives every method ``steps_ft``; ``"maf"`` converts by measured MAFs. With
    ``budget.reference_backbone`` the budget is the compute of fine-tuning that backbone for ``steps_ft`` steps, so a
    larger backbone gets fewer steps (:func:`reference_steps`; Roth et al. 2024 compare model sizes at equal compute).
    ``costs`` overrides the registry (tests, custom methods); ``backbone`` overrides ``cfg.backbone.name``.
    """
    steps_ft: float = ft_steps(cfg.budget.total_ft_steps, num_tasks)
    spec = backbone or backbone_spec(cfg.backbone.name)
    costs = costs or {}
    kw = dict(device=device, store=store)
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


def reference_steps(steps_ft: float, ft_ref: CostRecord, ft: CostRecord) -> float:
    """Full fine-tuning steps of this backbone that spend the budget of ``steps_ft`` fine-tuning steps of the
    reference backbone: ``steps_ft * GFLOPs(ft_ref) / GFLOPs(ft)`` (fine-tuning's memory multiplier is 1)."""
    return steps_ft * ft_ref.step_gflops / ft.step_gflops


def _whole_steps(steps: float, method_name: str, cfg) -> int:
    out = math.floor(steps + 1e-9)
    if out < 1:
        raise BudgetError(f"method '{method_name}' on {cfg.backbone.name} gets fewer than one step per task "
                          f"({steps:.2f}) under the budget of {cfg.budget.reference_backbone} (budget."
                          f"reference_backbone); raise budget.total_ft_steps or lower stream.num_tasks")
    return out


# --------------------------------------------------------------------------------------------------- table / CLI
def budget_rows(records: Sequence[CostRecord], ft: CostRecord, total_ft_steps: int = PAPER_TOTAL_FT_STEPS,
                tasks: Sequence[int] = TABLE_TASKS) -> list[dict[str, Any]]:
    """One Tab.4-style row per record: GFLOPs, memory, multiplier, MAF and steps per task at each T."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"method": r.method, "trainable_M": r.trainable_params / 1e6,
                               "GFLOPs": r.step_gflops, "memory_MB": r.peak_bytes / 2**20}
        if r.trainable_params == 0:
            row.update({"mem_mult": None, "MAF": None, **{f"T={t}": 0 for t in tasks}})
        else:
            row.update({"mem_mult": mem_mult(r, ft), "MAF": maf(r, ft)})
            for t in tasks:
                try:
                    row[f"T={t}"] = steps_from_costs(ft_steps(total_ft_steps, t), ft, r)
                except BudgetError:
                    row[f"T={t}"] = "<1"
        row["paper ViT-B/16 T=20"] = REFERENCE_STEPS_VITB16_T20.get(r.method, "-")
        rows.append(row)
    return rows
