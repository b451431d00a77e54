"""THE continual loop of FoMo-in-Flux (DESIGN §2) in plain PyTorch: runnable on one CPU, no Ray, no MLflow.

Hook order (``method`` hooks return values; the loop applies them; ``hooks`` are the optional ``RunHooks`` the
Ray/MLflow edge plugs in)::

    run     = build_run(cfg)     # bench, CLIP with theta_0, method.setup(model), task plan, evaluator, buffer
    plan    = method.task_plan(task_rows, budget.steps_per_task(cfg))
    records = evaluate(theta_0: fixed subsets, + full test sets)   -> hooks.on_eval(0, records)
    for t, task in enumerate(plan):
        seed everything from (cfg.seed, t)
        model <- method.training_weights(t, model)                 # None: continue from theta_{t-1}
        opt    = fresh AdamW (no decay on biases / norms / embeddings / logit_scale)
        batches = MixedBatches(pool P, update D_t, buffer B)       # per-source sizes of DESIGN §1, prefetched
        for step in range(task.steps):
            lr   = schedules.lr_at(step, ...)                       # per-task schedule x meta-schedule
            loss = contrastive_loss(model(batch)) + method.extra_loss(model, t)  # autocast; InfoNCE/SigLIP
            non-finite loss -> raise TrainingDiverged(task, step)
            backward; ONE global grad-norm clip; opt.step(); clamp logit_scale
            method.after_step(model, t, step, lr)                   -> hooks.on_step(t, step, loss, lr, grad_norm,
                                                                                    global_step)
            every cfg.ray.checkpoint_every_steps                    -> hooks.on_checkpoint(LoopState)
            hooks.should_stop()?                                    -> return the results so far
        method.after_task(model, t, TaskLosses(D_t))                # Fisher / Omega / merges
        buffer.add(D_t)
        with method.deployed_weights(t, model) swapped in:
            records = evaluate(fixed subsets, + full sets after the last task)  -> hooks.on_eval(t + 1, records)
        -> hooks.on_checkpoint(LoopState at the start of task t + 1)
        hooks.should_stop()? (not after the last task)              -> return the results so far (a sweep's rule)
    return tidy results (run, task, dataset, role, metric, value); task = evaluation point (0 = before any update)

Resume (``fomo_ray/checkpoint.py``): ``run_stream(cfg, resume=state)`` restores the run in one call and continues at
the state's cursor, ending with metrics bitwise identical to the uninterrupted run on CPU. Assembly
(``fomo_ray/assembly.py``) gets a ready benchmark and base checkpoint; it never builds them.

Data parallel (``fomo_ray/distributed.py``): when ``torch.distributed`` is initialised with world size W > 1 (Ray
Train's ``TorchTrainer`` does it), the same loop runs on every rank. Each rank plans the same global batch of
``mixture.batch_size`` (any W up to it), decodes and encodes only its near-equal contiguous shard through a
DDP-wrapped model, and computes the CLIP loss over the features of the whole global batch gathered with gradient, so
the averaged gradient is the single-process one (equal up to floating-point summation order; measured in
``tests/test_ddp.py``). Evaluation and the ``TaskLosses`` of ``after_task`` (EWC's Fisher) are shared out over the
ranks and gathered. Everything else — method hooks, merges, snapshots — runs identically on every rank, so weights,
method state and results stay replicated, and **every ``hooks`` callback fires on every rank** with the same
arguments: the edge decides who reports (``distributed.is_rank_zero()``; Ray Train V2 needs every rank to call
``ray.train.report``, rank 0 passing the checkpoint). ``hooks.should_stop`` is agreed across ranks (any rank stopping
stops all). A resume may use another world size: the global batches do not depend on it. With W = 1 nothing of this
runs and the loop is unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from fomo_ray import distributed
from fomo_ray.assembly import Run, build_run, eval_plan
from fomo_ray.checkpoint import LoopState, Resumed, restore, snapshot
from fomo_ray.config import ExperimentConfig
from fomo_ray.data.augment import model_input
from fomo_ray.losses import clamp_logit_scale_, contrastive_loss, logit_terms
from fomo_ray.metrics import tidy_frame
from fomo_ray.optim import make_optimizer, trainable_named
from fomo_ray.schedules import lr_at
from fomo_ray.seeding import derive_seed, seed_everything, task_seed


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf; the run must be marked failed (never train on)."""

    def __init__(self, task: int, step: int, loss: float, method: str):
        self.task, self.step, self.loss = task, step, loss
        super().__init__(f"training diverged: loss is {loss} at task {task}, step {step} (method '{method}'); "
                         f"the run is failed, lower optimizer.lr or check the data")


@dataclass
class RunHooks:
    """Optional callbacks through which the Ray/MLflow edge observes and steers the loop without the loop
    importing either library."""

    on_eval: Callable[[int, list[dict[str, Any]]], None] | None = None  # (evaluation point, tidy records)
    # (task, step, loss, lr, grad_norm, global_step): grad_norm is the total gradient norm before the clip, a 0-d
    # tensor left on the device (reading it waits for the step: read it only when logging); global_step counts
    # the steps of every task so far (a continuous x axis over the stream)
    on_step: Callable[[int, int, float, float, torch.Tensor | None, int], None] | None = None
    on_checkpoint: Callable[[LoopState], None] | None = None  # end of every task, every N steps
    should_stop: Callable[[], bool] | None = None  # cooperative early stopping (a sweep's ``stopping`` rule)


# --------------------------------------------------------------------------------------------------- THE loop
def run_stream(cfg: ExperimentConfig, *, hooks: RunHooks | None = None, resume: LoopState | None = None,
               device: torch.device | str | None = None) -> pd.DataFrame:
    """Run the whole stream (or continue ``resume``) and return the tidy results table (see module docstring)."""
    hooks = hooks or RunHooks()
    distributed.check_batch_size(cfg.mixture.batch_size, distributed.world()[1])
    run = build_run(cfg, device)
    model, method = run.model, run.method
    encoder = distributed.data_parallel(model, run.device)  # None on one process: batch_loss encodes directly
    every = cfg.ray.checkpoint_every_steps
    points = eval_plan(len(run.plan), cfg)
    if resume:
        start = restore(run, resume)
    else:
        start = Resumed(0, 0, evaluate_point(run, 0, points[0]))  # trajectory point 0: theta_0
        _emit(hooks.on_eval, 0, list(start.results))
    results = start.results

    for t in range(start.task, len(run.plan)):
        task = run.plan[t]
        if t == start.task and start.optimizer is not None:  # mid-task resume: optimizer and RNGs continue
            first_step, opt, scaler = start.step, start.optimizer, start.scaler
        else:
            first_step = 0
            seed_everything(task_seed(cfg.seed, t, "rng"))
            weights = method.training_weights(t, model)
            if weights is not None:
                model.load_state_dict(weights)
            opt, scaler = (make_optimizer(model, cfg) if task.steps > 0 else None), run.new_scaler()
        model.train()
        params = [p for _, p in trainable_named(model)]
        offset = sum(earlier.steps for earlier in run.plan[:t])  # the global step of this task's step 0
        with task_batches(run, t, task.rows, first_step, task.steps) as batches:  # prefetches; stops on exit
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
                norm = None  # the total gradient norm before the clip, for hooks.on_step
                if cfg.optimizer.grad_clip > 0:  # ONE global norm over every trainable parameter
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
                elif hooks.on_step is not None:  # reads the gradients only: the step is unchanged
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                scaler.step(opt)
                scaler.update()
                clamp_logit_scale_(model)
                method.after_step(model, t, step, lr)
                _emit(hooks.on_step, t, step, value, lr, norm, offset + step)
                if every and (step + 1) % every == 0 and step + 1 < task.steps and hooks.on_checkpoint:
                    hooks.on_checkpoint(snapshot(run, t, step + 1, opt, scaler, results))
                if _should_stop(hooks, run):
                    return tidy_frame(results)

        method.after_task(model, t, TaskLosses(run, t, task.rows))
        run.buffer.add(task.rows)
        if t + 1 in points:
            with deployed(model, method.deployed_weights(t, model)):
                records = evaluate_point(run, t + 1, points[t + 1])
            results += records
            _emit(hooks.on_eval, t + 1, records)
        if hooks.on_checkpoint:
            hooks.on_checkpoint(snapshot(run, t + 1, 0, None, None, results))
        if t + 1 < len(run.plan) and _should_stop(hooks, run):  # after the last task there is nothing to stop
            break
    return tidy_frame(results)


# --------------------------------------------------------------------------------------------------- steps
def batch_loss(run: Run, batch: Mapping[str, Any], encoder: nn.Module | None = None) -> torch.Tensor:
    """Contrastive loss of one mixed batch (all P/D/B samples are each other's negatives), under the run's autocast:
    the model's own loss (``losses.contrastive_loss``: SigLIP's sigmoid loss for a model with a ``logit_bias``,
    else InfoNCE).

    The batch holds uint8 images and stored token ids; they are moved to the device (a no-op when the prefetcher
    already did) and normalised there. ``encoder`` (data parallel: ``distributed.data_parallel``) encodes this
    rank's shard; the loss then runs over the features of the whole global batch gathered from all ranks,
    identical on every rank. Without ``encoder`` under data parallelism (EWC's Fisher pass: each rank its own whole
    batches) BatchNorm layers stay rank-local (``distributed.rank_local``)."""
    model, bb = run.model, run.backbone
    images = model_input(batch["images"].to(run.device, non_blocking=True), bb.image_size, bb.mean, bb.std)
    tokens = batch["tokens"].to(run.device, non_blocking=True)
    with bb.autocast(run.device):
        if encoder is not None:
            image_features, text_features, *logit = encoder(images, tokens)  # (scale,) or (scale, bias)
            sizes = distributed.shard_sizes(run.cfg.mixture.batch_size, distributed.world()[1])
            return contrastive_loss(distributed.gather_batch(image_features, sizes),
                                    distributed.gather_batch(text_features, sizes), *logit)
        with distributed.rank_local(model):
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
        return contrastive_loss(image_features, text_features, *logit_terms(model))


def _mixed(run: Run, rows: np.ndarray, sizes: tuple[int, int, int], purpose: str, t: int, start_step: int,
           shard: tuple[int, int] = (0, 1)):
    from fomo_ray.data.mixture import MixedBatches

    return MixedBatches(run.bench, run.pool_rows, rows, run.buffer.rows(), sizes, derive_seed(run.cfg.seed, purpose),
                        t, start_step, token_key=run.token_key, backend=run.cfg.data.loader,
                        image_size=run.backbone.image_size, num_workers=run.cfg.data.num_workers,
                        pool_bench=run.pool_bench, shard=shard)


def task_batches(run: Run, t: int, rows: np.ndarray, start_step: int, end_step: int):
    """The mixed P/D/B batches of task ``t`` for steps ``[start_step, end_step)``, with DESIGN §1's per-source sizes
    (the buffer's share goes to P and D while it is empty), this rank's shard only, built ``data.prefetch`` steps
    ahead. Exactly resumable: batch k is a function of (cfg.seed, t, k) only. Use as a context manager."""
    from fomo_ray.data.mixture import mixture_sizes
    from fomo_ray.data.prefetch import Prefetcher

    m = run.cfg.mixture
    sizes = mixture_sizes(m.batch_size, (m.pool, m.update, m.buffer), buffer_empty=len(run.buffer) == 0)
    mixed = _mixed(run, rows, sizes, "batches", t, start_step, shard=distributed.world())
    lo, hi = mixed.shard
    shape = (hi - lo, mixed.image_size, mixed.image_size, 3)
    return Prefetcher(mixed.batch, range(start_step, end_step), run.device, run.cfg.data.prefetch, shape)


class TaskLosses:
    """The CLIP losses of batches of task ``t``'s update data D_t only, for ``method.after_task`` (EWC's Fisher):
    ``sum_over(n, per_batch)`` sums ``per_batch(loss_k)`` over batches k < n. Under data parallelism each rank takes
    every W-th batch (unsharded, encoded by the model itself) and the sums are added over the ranks, so every rank
    holds the one-process sum and method state stays replicated."""

    def __init__(self, run: Run, t: int, rows: np.ndarray):
        self.run = run
        self.batches = _mixed(run, rows, (0, run.cfg.mixture.batch_size, 0), "fisher", t, 0)

    def sum_over(self, n: int, per_batch: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        rank, world = distributed.world()
        total = None
        for k in distributed.share(n, rank, world):  # random access decodes one batch at a time
            part = per_batch(batch_loss(self.run, self.batches.batch(k)))
            total = part if total is None else torch._foreach_add(total, part)
        if n < world:  # ranks without a batch join the sum with zeros shaped like rank 0's (who always has one)
            like = distributed.from_rank_zero([(tuple(x.shape), x.dtype) for x in total] if rank == 0 else None)
            total = total or [torch.zeros(shape, dtype=dtype, device=self.run.device) for shape, dtype in like]
        distributed.sum_over_ranks(total, self.run.device)
        return total


def evaluate_point(run: Run, point: int, full_too: bool) -> list[dict[str, Any]]:
    """Tidy records of evaluating the weights the model holds now at evaluation point ``point``: on the fixed subsets
    (the trajectory: the same samples at every point), and on the full test sets as well when ``full_too``."""
    out = []
    for eval_set in ("subset", "full") if full_too else ("subset",):
        records = run.evaluator.evaluate(run.model, run.backbone.tokenizer, full=eval_set == "full",
                                         weights_version=f"{run.name}/point{point}")
        out += [{"run": run.name, "task": point, "dataset": r["dataset"], "role": r["role"], "metric": r["metric"],
                 "value": float(r["value"]), "eval_set": eval_set, "prompts": r["prompts"]} for r in records]
    return out


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


def _emit(callback: Callable[..., None] | None, *args: Any) -> None:
    if callback is not None:
        callback(*args)


def _should_stop(hooks: RunHooks, run: Run) -> bool:
    # agreed across data-parallel ranks: one rank leaving the loop alone would hang the others in the next all-reduce
    return distributed.any_rank(bool(hooks.should_stop and hooks.should_stop()), run.device)
