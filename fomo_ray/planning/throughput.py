"""How fast this machine's device runs a trial's work: seconds per training step of a method on a backbone, and per
image and per text encoded at evaluation. Timed on synthetic batches of the run's shapes, with the thread count a
trial runs with, and cached as JSON beside the budget's MAF records (``budget.cache_dir``). The sweep's cost estimate
(``fomo_ray/planning/cost_estimate.py``) turns counted GFLOPs into wall time with these figures.

A training step is timed at a rank's batch (``budget.rank_batch``) where its saved activations (the budget's
``batch_bytes``) fit :data:`TIMING_BYTES`, else at the largest batch that fits and at least :data:`TIMED_BATCH`; never
at a global batch that may not fit this machine (ViT-B/16 at b = 512 needs ~80 GB of activations). A smaller timed
batch is scaled to the run's by FLOPs: ``step_s(b) = step_s(b_timed) * FLOPs(b) / FLOPs(b_timed)``, both counted
exactly by the budget (a time per FLOP that does not improve with the batch: an upper bound, since larger batches
use the device better; measured on the tiny model, b = 16 scaled to 64 gave 0.33 s a step where b = 64 takes 0.17).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from fomo_ray.budgets import budget, step_measure
from fomo_ray.atomic import write_json

#: bump when what is timed changes, so cached figures of another measurement are retaken
SPEED_VERSION = 3  # 2: timed at a small batch and scaled by FLOPs; 3: at a rank's batch where it fits TIMING_BYTES
EVAL_SAMPLES = 64  # images (and texts) timed per evaluation encode: enough to amortise the call overhead
TIMED_BATCH = 16   # the largest training batch timed when nothing says more fits (a rank's batch may be larger)
TIMING_BYTES = 2 * 2**30  # saved activations a timed step may hold: a larger batch is timed as it is where it fits


@dataclass(frozen=True)
class Speed:
    """Measured seconds of one trial's units of work on one device kind with ``threads`` intra-op threads."""

    backbone: str
    method: str
    batch_size: int
    device_kind: str
    threads: int
    settings_hash: str
    step_s: float    # one training step (forward, backward, optimizer) at ``batch_size``; 0 for a frozen model
    image_s: float   # one image encoded at evaluation (no gradient)
    text_s: float    # one text encoded at evaluation
    timed_batch: int = 0  # the batch the step was timed at (scaled to ``batch_size`` by FLOPs)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection are not the steady state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_work(cfg, method_name: str, *, device: torch.device, threads: int, repeats: int = 3,
              sample_bytes: int = 0) -> Speed:
    """Time ``repeats`` training steps and evaluation encodes of ``method_name`` on ``cfg``'s backbone (medians); the
    step at a batch of at most a rank's and :data:`TIMED_BATCH`, scaled to ``mixture.batch_size`` by FLOPs.

    The global RNG state is restored afterwards, as for the budget's measurements: estimating a sweep must not
    change what its runs draw."""
    spec = budget.backbone_spec(cfg.backbone.name)
    cost = budget.registry_cost(cfg, method_name)
    bs = cfg.mixture.batch_size
    timed = timed_batch(cfg, sample_bytes)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), _threads(threads):
        model = budget.prepared(cost, spec.factory().to(device))
        trainable = [p for p in model.parameters() if p.requires_grad]
        vocab = int(getattr(model, "vocab_size", 0) or 49408)
        step_s = 0.0
        if trainable:
            images, tokens = step_measure.clip_batch(timed, spec.image_size, spec.context_length, vocab, device)
            opt = torch.optim.AdamW(trainable, lr=1e-5)

            def step() -> None:
                loss = step_measure.clip_loss(model(images, tokens))
                extra = cost.extra_loss(model) if cost.extra_loss is not None else None
                (loss if extra is None else loss + extra).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)

            model.train()
            step_s = _median_seconds(step, repeats)
            if timed < bs:  # FLOPs of the whole step at both batches, counted as the budget counts them
                step_s *= _step_flops(cfg, method_name, bs) / _step_flops(cfg, method_name, timed)
        n = min(EVAL_SAMPLES, cfg.evaluation.batch_size)
        images, tokens = step_measure.clip_batch(n, spec.image_size, spec.context_length, vocab, device)
        model.eval()
        with torch.inference_mode():
            image_s = _median_seconds(lambda: (model.encode_image(images), _sync(device)), repeats) / n
            text_s = _median_seconds(lambda: (model.encode_text(tokens), _sync(device)), repeats) / n
    return Speed(backbone=spec.name, method=method_name, batch_size=bs, device_kind=budget.device_kind(device),
                 threads=threads, settings_hash=_hash(cfg, spec), step_s=step_s, image_s=image_s, text_s=text_s,
                 timed_batch=timed)


def timed_batch(cfg, sample_bytes: int = 0) -> int:
    """The batch a training step is timed at: a rank's batch, at most what :data:`TIMING_BYTES` holds at
    ``sample_bytes`` of saved activations a sample (0: unknown, then at most :data:`TIMED_BATCH`)."""
    fits = max(TIMED_BATCH, TIMING_BYTES // sample_bytes) if sample_bytes > 0 else TIMED_BATCH
    return min(cfg.mixture.batch_size, budget.rank_batch(cfg), fits)


def _step_flops(cfg, method_name: str, batch_size: int) -> float:
    """GFLOPs of one step at ``batch_size``: the budget's count on fake tensors (nothing allocated, nothing stored)."""
    spec = budget.backbone_spec(cfg.backbone.name)
    record = budget.measure_method(method_name, budget.registry_cost(cfg, method_name), spec.factory,
                                   backbone=spec.name, batch_size=batch_size, image_size=spec.image_size,
                                   context_length=spec.context_length, device="cpu", engine="count",
                                   rank_batch=min(batch_size, TIMED_BATCH),
                                   autocast_dtype=budget.autocast_dtype(cfg, torch.device("cpu")))
    return record.step_gflops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hash(cfg, spec: budget.BackboneSpec) -> str:
    return budget.settings_hash(cfg, {"context_length": spec.context_length, "image_size": spec.image_size,
                                      "speed": SPEED_VERSION})


def speed_path(cfg, method_name: str, device: torch.device, threads: int, sample_bytes: int = 0) -> Path:
    spec_name = budget.safe_name(cfg.backbone.name)
    return Path(cfg.budget.cache_dir) / (
        f"speed__{spec_name}__{budget.safe_name(method_name)}__b{cfg.mixture.batch_size}__"
        f"bt{timed_batch(cfg, sample_bytes)}__"
        f"{budget.safe_name(budget.device_kind(device))}__t{threads}__v{SPEED_VERSION}.json")


def measured_speed(cfg, method_name: str, *, device: str | torch.device = "cpu", threads: int = 1,
                   store: bool = True, sample_bytes: int = 0) -> Speed:
    """The cached :class:`Speed` of ``method_name`` for ``cfg``, timed on a miss (and stored unless ``store`` is
    False: a dry run writes nothing); ``sample_bytes``: saved activations a sample (sets the timed batch)."""
    device = torch.device(device)
    path = speed_path(cfg, method_name, device, threads, sample_bytes)
    if path in _UNSTORED:
        return _UNSTORED[path]
    if path.is_file():
        try:
            cached = Speed(**json.loads(path.read_text()))
            spec = budget.backbone_spec(cfg.backbone.name)
            if cached.settings_hash == _hash(cfg, spec):
                return cached
        except (ValueError, TypeError):
            pass  # unreadable or of another layout: timed again below
    speed = time_work(cfg, method_name, device=device, threads=threads, sample_bytes=sample_bytes)
    if store:
        write_json(path, dataclasses.asdict(speed), indent=1, sort_keys=True)
    else:
        _UNSTORED[path] = speed
    return speed


_UNSTORED: dict[Path, Speed] = {}  # timed but not stored (dry runs): timed once per process
