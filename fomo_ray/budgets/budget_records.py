"""The budget's measurements as records, and their cache: one JSON file per (backbone, method, batch size, image
size, device kind, method settings) under ``budget.cache_dir``, read back only when it matches what is asked."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fomo_ray.atomic import write_json

log = logging.getLogger("fomo_ray.budgets.budget")


@dataclass(frozen=True)
class CostRecord:
    """A cached measurement of one method on one backbone / batch / image size / device: one training step at the
    *global* batch ``batch_size`` as if on one device (the paper's definition of the MAF; what a data-parallel rank
    holds at its shard differs, but the budget, a property of the experiment, must not depend on the world size).
    ``measured`` says how it was obtained without running a pass larger than a rank's shard."""

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
    measured: str = ""          # "counted at b=512 (fake tensors)" | "scaled from b=1, 2" | "one step at b=8"
    batch_bytes: int = 0        # the part of peak_bytes that grows with the batch (saved activations; CPU count)
    checkpointed_batch_bytes: int = 0  # batch_bytes under backbone.grad_checkpointing (CPU count; 0: not known)

    @property
    def step_gflops(self) -> float:
        return self.counted_gflops + self.elementwise_gflops


def device_kind(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def safe_name(s: str) -> str:
    """``s`` as a file-name part (cache files are named by backbone, method and device)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def cache_path(cache_dir: str | Path, backbone: str, method: str, batch_size: int, image_size: int,
               kind: str, settings_hash: str) -> Path:
    name = f"{safe_name(backbone)}__{safe_name(method)}__b{batch_size}__px{image_size}__{safe_name(kind)}__{settings_hash}.json"
    return Path(cache_dir) / name


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
        write_json(path, dataclasses.asdict(record), indent=1, sort_keys=True)
    else:
        _UNSTORED[path] = record
    return record


_UNSTORED: dict[Path, CostRecord] = {}  # measured but not stored (dry runs): measured once per process
