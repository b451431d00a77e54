"""THE continual loop of FoMo-in-Flux (DESIGN §2) in plain PyTorch: runnable on one CPU, no Ray, no MLflow.

Hook order (``method`` hooks return values; the loop applies them; ``hooks`` are the optional ``RunHooks`` the
Ray/MLflow edge plugs in)::

    bench, backbone = benchmark data, CLIP with the zero-shot weights theta_0
    model   = method.setup(backbone.model)                       # freeze / inject adapters / remember theta_0
    plan    = method.task_plan(task_rows, budget.steps_per_task(cfg))
    records = evaluate(theta_0, full)                              -> hooks.on_eval(0, records)
    for t, task in enumerate(plan):
        seed everything from (cfg.seed, t)
        model <- method.training_weights(t, model)                 # None: continue from theta_{t-1}
        opt    = fresh AdamW (no decay on biases / norms / embeddings / logit_scale)
        batches = MixedBatches(pool P, update D_t, buffer B)       # per-source sizes of DESIGN §1
        for step in range(task.steps):
            lr   = schedules.lr_at(step, ...)                       # per-task schedule x meta-schedule
            loss = clip_loss(model(batch)) + method.extra_loss(model, t)     # under autocast
            non-finite loss -> raise TrainingDiverged(task, step)
            backward; ONE global grad-norm clip; opt.step(); clamp logit_scale
            method.after_step(model, t, step, lr)                   -> hooks.on_step(t, step, loss, lr)
            every cfg.ray.checkpoint_every_steps                    -> hooks.on_checkpoint(LoopState)
            hooks.should_stop()?                                    -> return the results so far
        method.after_task(model, t, fisher_batches(D_t))            # Fisher / Omega / merges
        buffer.add(D_t)
        with method.deployed_weights(t, model) swapped in:
            records = evaluate(subset in-stream, full after the last task)   -> hooks.on_eval(t + 1, records)
        -> hooks.on_checkpoint(LoopState at the start of task t + 1)
    return tidy results (run, task, dataset, role, metric, value); task = evaluation point (0 = before any update)

A ``LoopState`` holds everything an exact resume needs (model incl. adapters, optimizer mid-task, method, buffer,
all RNG states, the (task, step) cursor, results so far); ``run_stream(cfg, resume=state)`` continues and ends with
metrics bitwise identical to the uninterrupted run on CPU.

Data parallel (``fomo_ray/distributed.py``): when ``torch.distributed`` is initialised with world size W > 1 (Ray
Train's ``TorchTrainer`` does it), the same loop runs on every rank. Each rank draws the same global batch of
``mixture.batch_size`` (which W must divide), encodes its contiguous shard through a DDP-wrapped model, and computes
the CLIP loss over the features of the whole global batch gathered with gradient, so the averaged gradient is the
single-process one (equal up to floating-point summation order; measured in ``tests/test_ddp.py``). Everything else —
method hooks, evaluation, snapshots — runs identically on every rank, so weights, method state and results stay
replicated, and **every ``hooks`` callback fires on every rank** with the same arguments: the edge decides who
reports (``distributed.is_rank_zero()``; Ray Train V2 needs every rank to call ``ray.train.report``, rank 0 passing
the checkpoint). ``hooks.should_stop`` is agreed across ranks (any rank stopping stops all). A resume may use another
world size: the global batches do not depend on it. With W = 1 nothing of this runs and the loop is unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from fomo_ray import distributed
from fomo_ray.atomic import torch_save, write_json
from fomo_ray.config import ConfigError, ExperimentConfig, load_config
from fomo_ray.methods import Method, build_method
from fomo_ray.methods.base import TaskPlan, trainable_named
from fomo_ray.seeding import derive_seed, rng_state, seed_everything, set_rng_state, task_seed

log = logging.getLogger("fomo_ray.loop")

RESULT_COLUMNS = ["run", "task", "dataset", "role", "metric", "value"]
STATE_FILE = "loop_state.pt"
STATE_FORMAT = "fomo_ray.loop_state/v1"
#: run_stream is data-parallel under torch.distributed (the Ray Train edge checks this before starting N workers)
DISTRIBUTED = True


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf; the run must be marked failed (never train on)."""

    def __init__(self, task: int, step: int, loss: float, method: str):
        self.task, self.step, self.loss = task, step, loss
        super().__init__(f"training diverged: loss is {loss} at task {task}, step {step} (method '{method}'); "
                         f"the run is failed, lower optimizer.lr or check the data")


# --------------------------------------------------------------------------------------------------- state & hooks
@dataclass
class LoopState:
    """Everything needed to continue a run exactly: the cursor says the next (task, step) to run."""

    run: str
    task: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # AdamW state mid-task; None at a task boundary (the next task starts fresh)
    method: dict[str, Any]
    buffer: dict[str, Any]
    rng: dict[str, Any]
    results: list[dict[str, Any]]
    config_hash: str = ""
    scaler: dict[str, Any] | None = None  # fp16 loss-scaler state mid-task (bf16/fp32 need none)


@dataclass
class RunHooks:
    """Optional callbacks through which the Ray/MLflow edge observes and steers the loop without the loop
    importing either library."""

    on_eval: Callable[[int, list[dict[str, Any]]], None] | None = None  # (evaluation point, tidy records)
    on_step: Callable[[int, int, float, float], None] | None = None  # (task, step, loss, lr)
    on_checkpoint: Callable[[LoopState], None] | None = None  # end of every task, every N steps
    should_stop: Callable[[], bool] | None = None  # cooperative early stopping (e.g. ASHA)


def _plain(obj: Any) -> Any:
    """A detached CPU deep copy with numpy arrays wrapped as tensors, so ``torch.load(weights_only=True)`` reads it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return copy.deepcopy(obj)


def _unplain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unplain(v) for v in obj)
    return obj


def save_state(state: LoopState, directory: str | Path) -> Path:
    """Write ``state`` to ``directory/loop_state.pt`` atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    payload = {"format": STATE_FORMAT, **_plain(dataclasses.asdict(state))}
    return torch_save(payload, path)


def load_state(directory: str | Path) -> LoopState:
    """Read what :func:`save_state` wrote (tensors only: ``weights_only=True``)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no loop state at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.pop("format", None) != STATE_FORMAT:
        raise ValueError(f"{path} is not a {STATE_FORMAT} file")
    return LoopState(**_unplain(payload))


# --------------------------------------------------------------------------------------------------- pure helpers
def run_name(cfg: ExperimentConfig) -> str:
    """Deterministic run name: the experiment name plus the config hash (never a timestamp)."""
    return f"{cfg.name}-{cfg.config_hash()}"


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether AdamW decays ``name``: not biases, norm gains (all 1-D), embeddings or logit_scale (as open_clip)."""
    return p.ndim >= 2 and "embedding" not in name and "logit_scale" not in name


def make_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """A fresh AdamW over the trainable parameters (two groups when decay exemption is on)."""
    named = trainable_named(model)
    o = cfg.optimizer
    if o.exempt_no_decay:
        groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": o.weight_decay},
                  {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": o.weight_decay}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def eval_plan(num_tasks: int, cfg: ExperimentConfig) -> dict[int, bool]:
    """``{evaluation point: full?}``: 0 and the last point full (if ``full_at_ends``), subsets in between."""
    e = cfg.evaluation
    points = {0: e.full_at_ends, num_tasks: e.full_at_ends}
    for p in range(1, num_tasks):
        if p % e.every_n_tasks == 0:
            points[p] = False
    return points


@contextlib.contextmanager
def deployed(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily load ``weights`` into ``model`` (the trained weights come back afterwards); a no-op when
    ``weights`` are the model's own tensors."""
    own = model.state_dict()
    if all(k in weights and weights[k].data_ptr() == v.data_ptr() for k, v in own.items()):
        yield model
        return
    backup = {k: v.detach().clone() for k, v in own.items()}
    model.load_state_dict(weights)
    try:
        yield model
    finally:
        model.load_state_dict(backup)


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{c: r[c] for c in RESULT_COLUMNS} for r in records], columns=RESULT_COLUMNS)


# --------------------------------------------------------------------------------------------------- set-up
@dataclass
class Run:
    """What one run needs besides the loop's own variables (built once by :func:`prepare`)."""

    cfg: ExperimentConfig
    name: str
    device: torch.device
    bench: Any
    backbone: Any
    model: nn.Module
    method: Method
    plan: list[TaskPlan]
    pool_bench: Any  # where P lives: the benchmark itself or the directory of ``data.pool``
    pool_rows: np.ndarray
    evaluator: Any
    buffer: Any


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_data(cfg: ExperimentConfig) -> Any:
    """The benchmark of ``cfg.data``; FiF-mini is built first when missing (``data.prepare_if_missing``)."""
    from fomo_ray.data.format import open_benchmark

    root = Path(cfg.data.root)
    if cfg.data.benchmark == "fifmini" and cfg.data.prepare_if_missing:
        from fomo_ray.data.fifmini import ensure_fifmini

        ensure_fifmini(root, cfg.data.generator_seed, cfg.data.image_size, scale=cfg.data.scale, progress=False)
    return open_benchmark(root)


def resolve_pretrained(cfg: ExperimentConfig, bench: Any) -> str:
    """``backbone.pretrained``; ``auto`` means the cached CPU-pretrained base of a tiny architecture."""
    from fomo_ray.backbones import TINY_ARCHS

    p = cfg.backbone.pretrained
    if p != "auto":
        return p
    if cfg.backbone.name not in TINY_ARCHS:
        raise ConfigError(f"config key 'backbone.pretrained': 'auto' only exists for the tiny architectures "
                          f"{list(TINY_ARCHS)}; give '{cfg.backbone.name}' an open_clip tag or a checkpoint file")
    from fomo_ray.pretrain import ensure_base_checkpoint

    return str(ensure_base_checkpoint(cfg.backbone.name, bench, backend=cfg.data.loader))


def stream_task_rows(cfg: ExperimentConfig, bench: Any) -> list[np.ndarray]:
    """Train-split row ids of every task's update data D_t (DESIGN §1 chunking)."""
    from fomo_ray.data.stream import load_stream, resolve_stream, split_tasks, task_rows

    entries = load_stream(resolve_stream(bench, cfg.stream.file, cfg.stream.ordering), bench)
    # dataset-incremental orderings are cut only at dataset boundaries (DESIGN §1)
    by_dataset = "dataset_incremental" in cfg.stream.ordering and not cfg.stream.file
    return [task_rows(bench, task, "train") for task in split_tasks(entries, cfg.stream.num_tasks, by_dataset)]


def prepare(cfg: ExperimentConfig, device: torch.device | str | None = None) -> Run:
    """Data, backbone (theta_0), method (set up), task plan, evaluator and buffer of a run; deterministic."""
    from fomo_ray.backbones import create_backbone
    from fomo_ray.budget import steps_per_task
    from fomo_ray.data.buffer import make_buffer
    from fomo_ray.data.format import open_benchmark
    from fomo_ray.evaluation import Evaluator

    device = torch.device(device) if device is not None else default_device()
    with distributed.rank_zero_first():  # builds FiF-mini / the pretrained base / the budget cache once, not W times
        bench = open_data(cfg)
        pretrained = resolve_pretrained(cfg, bench)
        method = build_method(cfg)
        tasks = stream_task_rows(cfg, bench)
        # the budget may build and measure models (drawing random numbers) or read its cache: do it before seeding
        steps = steps_per_task(cfg, method.cost_as or method.name, len(tasks), device=device)
    steps = distributed.from_rank_zero(steps)  # ranks must agree on the step count or the all-reduces deadlock
    seed_everything(derive_seed(cfg.seed, "setup"))  # random init ('' pretrained) and adapter init draw here
    backbone = create_backbone(cfg.backbone.name, pretrained, device=device, precision=cfg.backbone.precision)
    model = method.setup(backbone.model)
    plan = method.task_plan(tasks, steps)
    evaluator = Evaluator(bench, cfg.evaluation, cfg.seed, backbone.image_size, backbone.mean, backbone.std,
                          backend=cfg.data.loader, num_workers=cfg.data.num_workers,
                          precision=cfg.backbone.precision)
    buffer = make_buffer(cfg.mixture.buffer_policy, cfg.mixture.buffer_size, derive_seed(cfg.seed, "buffer"))
    pool_bench = open_benchmark(cfg.data.pool) if cfg.data.pool else bench
    pool_rows = np.arange(pool_bench.num_rows("pool"), dtype=np.int64)
    return Run(cfg, run_name(cfg), device, bench, backbone, model, method, plan, pool_bench, pool_rows, evaluator,
               buffer)


# --------------------------------------------------------------------------------------------------- steps
def batch_loss(run: Run, batch: Mapping[str, Any], encoder: nn.Module | None = None) -> torch.Tensor:
    """CLIP loss of one mixed batch (all P/D/B samples are each other's negatives), under the run's autocast.

    ``encoder`` (data parallel: ``distributed.data_parallel``) encodes only this rank's shard; the loss then runs
    over the features of the whole global batch gathered from all ranks, identical on every rank."""
    from fomo_ray.losses import clip_loss

    model, bb = run.model, run.backbone
    if encoder is not None:
        batch = distributed.shard_batch(batch, *distributed.world())
    images = batch["images"].to(run.device, non_blocking=True)
    tokens = bb.tokenizer(list(batch["texts"])).to(run.device, non_blocking=True)
    with bb.autocast(run.device):
        if encoder is not None:
            image_features, text_features, logit_scale = encoder(images, tokens)
            return clip_loss(distributed.gather_batch(image_features), distributed.gather_batch(text_features),
                             logit_scale)
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        return clip_loss(image_features, text_features, model.logit_scale.exp())


def _mixed(run: Run, rows: np.ndarray, sizes: tuple[int, int, int], purpose: str, t: int, start_step: int):
    from fomo_ray.data.mixture import MixedBatches

    bb = run.backbone
    return MixedBatches(run.bench, run.pool_rows, rows, run.buffer.rows(), sizes, derive_seed(run.cfg.seed, purpose),
                        t, start_step, backend=run.cfg.data.loader, image_size=bb.image_size, mean=bb.mean,
                        std=bb.std, num_workers=run.cfg.data.num_workers, pool_bench=run.pool_bench)


def task_batches(run: Run, t: int, rows: np.ndarray, start_step: int) -> Iterator[dict[str, Any]]:
    """The mixed P/D/B batches of task ``t`` from ``start_step`` on, with DESIGN §1's per-source sizes (the buffer's
    share goes to P and D while it is empty). Exactly resumable: batch k is a function of (cfg.seed, t, k) only."""
    from fomo_ray.data.mixture import mixture_sizes

    m = run.cfg.mixture
    sizes = mixture_sizes(m.batch_size, (m.pool, m.update, m.buffer), buffer_empty=len(run.buffer) == 0)
    return iter(_mixed(run, rows, sizes, "batches", t, start_step))


def fisher_batches(run: Run, t: int, rows: np.ndarray) -> Iterator[torch.Tensor]:
    """Lazily, the CLIP loss of successive batches of task ``t``'s update data D_t only (EWC's Fisher pass).
    Never sharded: under data parallelism every rank computes the same Fisher (method state stays replicated)."""
    batches = _mixed(run, rows, (0, run.cfg.mixture.batch_size, 0), "fisher", t, 0)
    step = 0
    while True:  # random access decodes one batch at a time: a consumer stops after the batches it needs
        yield batch_loss(run, batches.batch(step))
        step += 1


def evaluate_point(run: Run, point: int, full: bool) -> list[dict[str, Any]]:
    """Tidy records of evaluating the weights the model holds now at evaluation point ``point``."""
    records = run.evaluator.evaluate(run.model, run.backbone.tokenizer, full=full,
                                     weights_version=f"{run.name}/point{point}")
    return [{"run": run.name, "task": point, "dataset": r["dataset"], "role": r["role"], "metric": r["metric"],
             "value": float(r["value"])} for r in records]


def make_scaler(run: Run) -> torch.amp.GradScaler:
    """fp16 autocast needs loss scaling against gradient underflow; for bf16/fp32 the scaler is a pass-through."""
    return torch.amp.GradScaler(run.device.type, enabled=run.backbone.precision == "fp16")


def snapshot(run: Run, task: int, step: int, optimizer: torch.optim.Optimizer | None,
             scaler: torch.amp.GradScaler | None, results: list[dict[str, Any]]) -> LoopState:
    """A detached CPU copy of everything an exact resume needs (safe to keep while training continues)."""
    return LoopState(run=run.name, task=task, step=step, model=_plain(run.model.state_dict()),
                     optimizer=_plain(optimizer.state_dict()) if optimizer is not None else None,
                     method=_plain(run.method.state_dict()), buffer=_plain(run.buffer.state_dict()),
                     rng=_plain(rng_state()), results=copy.deepcopy(results), config_hash=run.cfg.config_hash(),
                     scaler=_plain(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None)


def _restore(run: Run, state: LoopState) -> None:
    if state.run != run.name or (state.config_hash and state.config_hash != run.cfg.config_hash()):
        raise ValueError(f"resume state belongs to run '{state.run}', not to '{run.name}' (config changed?)")
    run.model.load_state_dict(state.model)
    run.method.load_state_dict(state.method)
    run.buffer.load_state_dict(state.buffer)


# --------------------------------------------------------------------------------------------------- THE loop
def run_stream(cfg: ExperimentConfig, *, hooks: RunHooks | None = None, resume: LoopState | None = None,
               device: torch.device | str | None = None) -> pd.DataFrame:
    """Run the whole stream (or continue ``resume``) and return the tidy results table (see module docstring)."""
    from fomo_ray.losses import clamp_logit_scale_
    from fomo_ray.schedules import lr_at

    hooks = hooks or RunHooks()
    distributed.check_batch_size(cfg.mixture.batch_size, distributed.world()[1])
    run = prepare(cfg, device)
    model, method = run.model, run.method
    encoder = distributed.data_parallel(model, run.device)  # None on one process: batch_loss encodes directly
    every = cfg.ray.checkpoint_every_steps
    points = eval_plan(len(run.plan), cfg)
    start_task, start_step = (resume.task, resume.step) if resume else (0, 0)
    if resume:
        _restore(run, resume)
        results = list(resume.results)
    else:
        results = evaluate_point(run, 0, points[0])  # trajectory point 0: theta_0
        _emit(hooks.on_eval, 0, list(results))

    for t in range(start_task, len(run.plan)):
        task = run.plan[t]
        first_step = start_step if t == start_task else 0
        if first_step == 0:
            seed_everything(task_seed(cfg.seed, t, "rng"))
            weights = method.training_weights(t, model)
            if weights is not None:
                model.load_state_dict(weights)
        model.train()
        opt = make_optimizer(model, cfg) if task.steps > 0 else None
        scaler = make_scaler(run)
        if first_step > 0:  # mid-task resume: the optimizer and every RNG continue where they stopped
            opt.load_state_dict(resume.optimizer)
            if resume.scaler:
                scaler.load_state_dict(resume.scaler)
            set_rng_state(resume.rng)
        params = [p for _, p in trainable_named(model)]
        batches = task_batches(run, t, task.rows, first_step) if task.steps > first_step else iter(())
        for step in range(first_step, task.steps):
            lr = lr_at(step, task.steps, t, cfg.schedule, cfg.optimizer.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = batch_loss(run, next(batches), encoder)
            extra = method.extra_loss(model, t)
            if extra is not None:
                loss = loss + extra
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(t, step, value, method.name)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # true gradients for the clip and for after_step (SI); a no-op unless fp16
            if cfg.optimizer.grad_clip > 0:  # ONE global norm over every trainable parameter
                torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
            scaler.step(opt)
            scaler.update()
            clamp_logit_scale_(model)
            method.after_step(model, t, step, lr)
            _emit(hooks.on_step, t, step, value, lr)
            if every and (step + 1) % every == 0 and step + 1 < task.steps and hooks.on_checkpoint:
                hooks.on_checkpoint(snapshot(run, t, step + 1, opt, scaler, results))
            if _should_stop(hooks, run):
                return records_frame(results)

        method.after_task(model, t, fisher_batches(run, t, task.rows))
        run.buffer.add(task.rows)
        if t + 1 in points:
            with deployed(model, method.deployed_weights(t, model)):
                records = evaluate_point(run, t + 1, points[t + 1])
            results += records
            _emit(hooks.on_eval, t + 1, records)
        if hooks.on_checkpoint:
            hooks.on_checkpoint(snapshot(run, t + 1, 0, None, None, results))
        if _should_stop(hooks, run):
            break
    return records_frame(results)


def _emit(callback: Callable[..., None] | None, *args: Any) -> None:
    if callback is not None:
        callback(*args)


def _should_stop(hooks: RunHooks, run: Run) -> bool:
    # agreed across data-parallel ranks: one rank leaving the loop alone would hang the others in the next all-reduce
    return distributed.any_rank(bool(hooks.should_stop and hooks.should_stop()), run.device)


# --------------------------------------------------------------------------------------------------- command line
def _write_json_atomic(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=2, sort_keys=True)


def input_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input (config, data, backbone, budget, merge, evaluation), not a bug."""
    from fomo_ray.backbones import BackboneError
    from fomo_ray.budget import BudgetError
    from fomo_ray.data.format import DataError
    from fomo_ray.evaluation import EvaluationError
    from fomo_ray.merge_ops import MergeError
    from fomo_ray.pretrain import PretrainError

    return ConfigError, DataError, BackboneError, BudgetError, MergeError, EvaluationError, PretrainError


def main(argv: list[str] | None = None) -> int:
    """``fomo-ray run [config.yaml] [dotted.key=value ...]``: one continual run; prints the A_KA / A_ZS / GM table
    and writes ``<output_dir>/<run name>/results.parquet`` (task-end states go to ``.../state`` for ``--resume``)."""
    from fomo_ray.config import to_dict
    from fomo_ray.metrics import format_report, save_results

    p = argparse.ArgumentParser(prog="fomo-ray run", description=main.__doc__)
    p.add_argument("args", nargs="*", help="an optional experiment YAML, then dotted overrides (optimizer.lr=1e-4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/<run name>/state if present")
    args = p.parse_args(argv)
    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if config else args.args
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"fomo-ray run: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir) / run_name(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "config.json", to_dict(cfg))
    resume = load_state(out / "state") if args.resume and (out / "state" / STATE_FILE).is_file() else None
    hooks = RunHooks(on_checkpoint=lambda state: save_state(state, out / "state"),
                     on_eval=lambda point, recs: log.info("evaluation point %d: %d records", point, len(recs)))
    try:
        df = run_stream(cfg, hooks=hooks, resume=resume, device=args.device)
    except TrainingDiverged as e:
        _write_json_atomic(out / "FAILED.json", {"status": "failed", "task": e.task, "step": e.step, "error": str(e)})
        print(f"fomo-ray run: {e}", file=sys.stderr)
        return 1
    except input_errors() as e:
        print(f"fomo-ray run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    path = save_results(df, out / "results.parquet")
    print(format_report(df))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
