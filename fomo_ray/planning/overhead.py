"""What a trial costs besides its training steps and evaluation encodes: the fixed costs the cost estimate adds
(``fomo_ray/planning/cost_estimate.py``), timed on this machine and cached as JSON beside the step speeds
(``budget.cache_dir``).

- ``start_s``: a fresh Python process importing what a trial process imports (torch, open_clip, Ray, MLflow, the
  engine). It depends on the interpreter and its packages only, so it is timed once per environment
  (:func:`process_start`), not once per backbone and benchmark like the costs below: a sweep over several models
  or data scales spawns one interpreter to time it, not one for each;
- ``build_s``: the backbone built with the trial's weights (read from disk where they are a file) and the benchmark
  and evaluator opened;
- ``loader_s``: the first evaluation loader's one-time cost (an FFCV loader compiles its pipeline with numba on its
  first epoch);
- ``decode_s``: decoding one evaluation image with the run's loader (the subsets are decoded once and kept when they
  fit ``evaluation.cache_mb``; a set that does not fit, and every training batch on a CPU trial, are decoded each
  time);
- ``checkpoint_s``: one checkpoint of the run's state (the model and AdamW's two moments) written and copied once,
  as a Ray report persists it.

:func:`trial_seconds` turns them into a trial's fixed seconds. Every clock reading goes through ``clock`` and the
import timing through ``spawn``, so a test drives the whole measurement with a fake clock.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from fomo_ray.budgets import budget
from fomo_ray.atomic import write_json

#: bump when what is timed changes, so cached figures of another measurement are retaken (2: the process start has a
#: file of its own, per environment)
OVERHEAD_VERSION = 2
DECODE_SAMPLES = 64  # evaluation images decoded per timing pass
# what a trial process imports before its first step (a Tune function trial; a Train worker imports the same)
TRIAL_IMPORTS = ("import ray, ray.tune, ray.train, torch, open_clip, mlflow; "
                 "import fomo_ray.core.loop, fomo_ray.engine.ray_train, fomo_ray.engine.tune_sweep, "
                 "fomo_ray.tracking.writer")


@dataclass(frozen=True)
class Overhead:
    """Measured fixed costs of a trial of one backbone, benchmark and loader, on one device kind."""

    backbone: str
    device_kind: str
    threads: int
    settings_hash: str
    start_s: float
    build_s: float
    loader_s: float
    decode_s: float
    checkpoint_s: float


def _spawn_imports() -> None:
    subprocess.run([sys.executable, "-c", TRIAL_IMPORTS], check=True, capture_output=True)


def time_process_start(clock: Callable[[], float] = time.perf_counter,
                       spawn: Callable[[], None] = _spawn_imports) -> float:
    """Seconds a fresh interpreter takes to import what a trial process imports (:data:`TRIAL_IMPORTS`)."""
    t = clock()
    spawn()
    return clock() - t


def time_overhead(cfg: Any, *, device: torch.device, threads: int, clock: Callable[[], float] = time.perf_counter,
                  start_s: float) -> Overhead:
    """Time the fixed costs of a trial of ``cfg`` in this process (see the module docstring); ``start_s`` is the
    environment's process start (:func:`process_start`). The global RNG state is restored afterwards: estimating a
    sweep must not change what its runs draw."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _time_in_process(cfg, device, threads, clock, start_s)
    finally:
        torch.set_num_threads(previous)


def _time_in_process(cfg: Any, device: torch.device, threads: int, clock: Callable[[], float],
                     start_s: float) -> Overhead:
    from fomo_ray.core.assembly import open_data, resolve_pretrained
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.data.loaders import make_loader
    from fomo_ray.models.evaluation import Evaluator
    from fomo_ray.core.inputs import InputsMissing

    with torch.random.fork_rng(devices=[]):
        t = clock()
        bench = open_data(cfg)
        try:
            pretrained = resolve_pretrained(cfg, bench)
        except InputsMissing:  # a tiny base not trained yet: a random init builds alike (its file read is small)
            pretrained = ""
        backbone = create_backbone(cfg.backbone.name, pretrained, device=device, precision=cfg.backbone.precision,
                                   quick_gelu=cfg.backbone.quick_gelu)
        ev = Evaluator(bench, cfg.evaluation, cfg.seed, backbone.image_size, backbone.mean, backbone.std,
                       backend=cfg.data.loader, num_workers=cfg.data.num_workers)
        build_s = clock() - t
        rows = ev.rows(False)
        some = np.sort(np.concatenate(list(rows.values())))[:DECODE_SAMPLES] if rows else np.zeros(0, np.int64)
        passes = []
        for _ in range(2):  # the first pass pays the loader's one-time compilation, the second is the steady state
            t = clock()
            for _batch in make_loader(bench, "test", some, cfg.evaluation.batch_size, train=False, seed=cfg.seed,
                                      image_size=backbone.image_size, backend=cfg.data.loader,
                                      num_workers=cfg.data.num_workers):
                pass
            passes.append(clock() - t)
        decode_s = passes[1] / max(1, len(some))
        checkpoint_s = _time_checkpoint(backbone.model, clock)
    return Overhead(backbone=cfg.backbone.name, device_kind=budget.device_kind(device), threads=threads,
                    settings_hash=_hash(cfg), start_s=start_s, build_s=build_s,
                    loader_s=max(0.0, passes[0] - passes[1]), decode_s=decode_s, checkpoint_s=checkpoint_s)


def _time_checkpoint(model: torch.nn.Module, clock: Callable[[], float]) -> float:
    """One checkpoint: the model and two AdamW moments per trainable weight saved, then copied (Ray's persist)."""
    state = {"model": model.state_dict(),
             "moments": [torch.zeros_like(p) for p in model.parameters() if p.requires_grad for _ in range(2)]}
    with tempfile.TemporaryDirectory(prefix="fomo_overhead_") as d:
        t = clock()
        torch.save(state, Path(d, "state.pt"))
        shutil.copytree(Path(d), Path(d, "persisted"), ignore=shutil.ignore_patterns("persisted"))
        return clock() - t


def trial_seconds(o: Overhead, *, eval_images: int, checkpoints: int, train_images: int) -> float:
    """A trial's fixed seconds: process start, build, the loader's one-time cost, the images it decodes for
    evaluation (``eval_images``: ``cost_estimate.decoded_eval_images``) and for training (``train_images``: on a CPU
    trial, where decoding takes the cores the steps use) and its checkpoints."""
    return (o.start_s + o.build_s + o.loader_s + o.decode_s * (eval_images + train_images)
            + o.checkpoint_s * checkpoints)


def checkpoint_count(steps_per_task: list[int], every: int) -> int:
    """Checkpoints a run reports: every task end, every ``every`` steps within a task, and the final report."""
    mid = sum((s - 1) // every for s in steps_per_task if s > 0) if every > 0 else 0
    return len(steps_per_task) + mid + 1


# --------------------------------------------------------------------------------------------------- the cache
def _hash(cfg: Any) -> str:
    """What the fixed costs besides the process start depend on: the backbone and its weights, the data and its
    loader, the evaluation (not the method: its share is in the step speed)."""
    blob = {"backbone": cfg.backbone.name, "pretrained": cfg.backbone.pretrained, "precision": cfg.backbone.precision,
            "data": cfg.data.root, "scale": cfg.data.scale, "loader": cfg.data.loader, "workers": cfg.data.num_workers,
            "eval": str(cfg.evaluation), "torch": torch.__version__, "overhead": OVERHEAD_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


#: the distributions whose import a trial's start times (their versions key the cached timing)
START_PACKAGES = ("torch", "torchvision", "open_clip_torch", "ray", "mlflow", "ffcv", "numba", "fomo_ray")


@functools.cache  # fixed for a process's life; an estimate of many trials asks for it once each
def environment() -> dict[str, str]:
    """What a process start depends on: the interpreter, the versions of what it imports and the imports timed."""
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {"python": sys.executable, "python_version": sys.version.split()[0], "imports": TRIAL_IMPORTS,
            **{dist: version(dist) for dist in START_PACKAGES}}


def _digest(env: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(env), sort_keys=True).encode()).hexdigest()[:10]


def start_path(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir) / f"start__v{OVERHEAD_VERSION}__{digest}.json"


def overhead_path(cfg: Any, device: torch.device, threads: int) -> Path:
    return Path(cfg.budget.cache_dir) / (
        f"overhead__{budget.safe_name(cfg.backbone.name)}__{budget.safe_name(budget.device_kind(device))}__t{threads}__"
        f"v{OVERHEAD_VERSION}__{_hash(cfg)}.json")


_UNSTORED: dict[Path, dict] = {}  # fixed costs timed but not stored (dry runs): timed once per process


def _cached(path: Path, read: Callable[[dict], Any]) -> Any:
    """What ``path`` holds (read by ``read``), or the fixed costs this process timed for it without storing them;
    None if neither."""
    if path in _UNSTORED:
        return _UNSTORED[path]
    if path.is_file():
        try:
            return read(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass  # unreadable or of another layout: timed again
    return None


_STARTS: dict[str, float] = {}  # the start figure this process found (read or timed) per environment


def process_start(cache_dir: str | Path, *, store: bool = True, clock: Callable[[], float] = time.perf_counter,
                  spawn: Callable[[], None] = _spawn_imports) -> float:
    """This environment's process start in seconds (:func:`time_process_start`): read from ``cache_dir``, or timed,
    at most once per process; stored in ``cache_dir`` (unless ``store`` is False) under the :func:`environment` it
    was timed in, so another Python or other package versions time it again."""
    env = environment()
    digest = _digest(env)
    path = start_path(cache_dir, digest)
    start_s = _STARTS.get(digest)
    if start_s is None:
        start_s = _cached(path, lambda d: float(d["start_s"]))
    if start_s is None:
        start_s = time_process_start(clock, spawn)
    _STARTS[digest] = start_s
    if store and not path.is_file():
        write_json(path, {"start_s": start_s, **env}, indent=1, sort_keys=True)
    return start_s


def measured_overhead(cfg: Any, *, device: str | torch.device = "cpu", threads: int = 1, store: bool = True,
                      clock: Callable[[], float] = time.perf_counter,
                      spawn: Callable[[], None] = _spawn_imports) -> Overhead | None:
    """The cached :class:`Overhead` for ``cfg``, timed on a miss (stored unless ``store`` is False); None when the
    benchmark is not built yet (a dry run on a fresh machine: the estimate then leaves the fixed costs out, and
    says so). Nothing is timed before the benchmark is found: a process start alone costs seconds."""
    from fomo_ray.core.assembly import open_data

    device = torch.device(device)
    path = overhead_path(cfg, device, threads)
    fixed = _cached(path, dict)  # the costs besides the start: the start is read (or timed) per environment
    if fixed is None:
        try:
            open_data(cfg)
        except (OSError, ValueError):  # the benchmark is not there yet (PreparedByRun, DataError)
            return None
    start_s = process_start(cfg.budget.cache_dir, store=store, clock=clock, spawn=spawn)
    if fixed is not None:
        try:
            return Overhead(**fixed, start_s=start_s)
        except TypeError:
            pass  # of another layout: timed again below
    measured = time_overhead(cfg, device=device, threads=threads, clock=clock, start_s=start_s)
    fixed = {k: v for k, v in dataclasses.asdict(measured).items() if k != "start_s"}
    if store:
        write_json(path, fixed, indent=1, sort_keys=True)
    else:
        _UNSTORED[path] = fixed
    return measured
