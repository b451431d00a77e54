"""THE continual loop of FoMo-in-Flux (arXiv 2408.14471) in plain PyTorch: runnable on one CPU, no Ray, no MLflow.

Hook order (``method`` hooks return values; the loop applies them; ``hooks`` are the optional ``RunHooks`` the
Ray/MLflow edge plugs in)::

    run     = build_run(cfg)     # bench, CLIP with theta_0, method.setup(model), task plan, evaluator, buffer
    plan    = method.task_plan(task_rows, budget.steps_per_task(cfg))
    records = evaluate(theta_0: fixed subsets, + full test sets)   -> hooks.on_eval(0, records)
    for t, task in enumerate(plan):
        seed everything from (cfg.seed, t)
        model <- method.training_weights(t, model)                 # None: continue from theta_{t-1}
        opt    = fresh AdamW (no decay on biases / norms / embeddings / logit_scale)
        batches = MixedBatches(pool P, update D_t, buffer B)       # docs/BENCHMARK.md §Mixture; prefetched
        for step in range(task.steps):
            lr   = schedules.lr_at(step, ...)                       # per-task schedule x meta-schedule
            loss = contrastive_loss(model(batch)) + method.extra_loss(model, t); backward  # autocast; InfoNCE/SigLIP
                   (optimizer.accum_steps = k > 1: k micro-batches against the cached features of the rest of the
                    global batch, the same loss and gradient: forward_backward)
            non-finite loss -> raise TrainingDiverged(task, step)    # checked on the device, read every
                                                                       # tracking.log_every_n_steps steps, before a
                                                                       # checkpoint and at the task's end
            ONE global grad-norm clip; opt.step(); clamp logit_scale
            method.after_step(model, t, step, lr)                   -> hooks.on_step(t, step, loss, lr, grad_norm,
                                                                                    global_step)
            every cfg.ray.checkpoint_every_steps                    -> hooks.on_checkpoint(LoopState)
            hooks.checkpoint_now()? (a preemption notice)           -> hooks.on_checkpoint(LoopState)
        method.after_task(model, t, TaskLosses(D_t))                # Fisher / Omega / merges
        buffer.add(D_t)
        with method.deployed_weights(t, model) swapped in:
            records = evaluate(fixed subsets, + full sets after the last task)  -> hooks.on_eval(t + 1, records)
        -> hooks.on_checkpoint(LoopState at the start of task t + 1)
        hooks.should_stop()? (between tasks only)                   -> return the results so far (a sweep's rule)
    return tidy results (run, point, dataset, role, metric, value); point = evaluation point (0 = before any update)

Resume (``fomo_ray/core/checkpoint.py``): ``run_stream(cfg, resume=state)`` restores the run in one call and continues
at the state's cursor, ending with metrics bitwise identical to the uninterrupted run on CPU. Assembly
(``fomo_ray/core/assembly.py``) gets a ready benchmark and base checkpoint; it never builds them.

Data parallel (``fomo_ray/core/distributed.py``): when ``torch.distributed`` is initialised with world size W > 1 (Ray
Train's ``TorchTrainer`` does it), the same loop runs on every rank. Each rank plans the same global batch of
``mixture.batch_size`` (any W up to it), decodes and encodes only its near-equal contiguous shard through a
DDP-wrapped model, and computes the CLIP loss over the features of the whole global batch gathered with gradient, so
the averaged gradient is the single-process one (equal up to floating-point summation order; measured in
``tests/test_ddp.py``). Evaluation and the ``TaskLosses`` of ``after_task`` (EWC's Fisher) are shared out over the
ranks and gathered. Everything else — method hooks, merges — runs identically on every rank, so weights,
method state and results stay replicated, and **every ``hooks`` callback fires on every rank** with the same
arguments, except ``on_checkpoint``: rank 0 gets the ``LoopState``, the others a ``checkpoint.CheckpointMarker``
with the same cursor (no host copy of the state on ranks that do not write it). The edge decides who reports
(``distributed.is_rank_zero()``; Ray Train V2 needs every rank to call ``ray.train.report``, rank 0 passing the
checkpoint). ``hooks.should_stop`` is agreed across ranks (any rank stopping stops all).

No host sync per step: the loss reaches ``hooks.on_step`` as a 0-d tensor on the device (``float(loss)`` reads it;
the MLflow edge reads it off the training thread), and its finiteness is read once every
``tracking.log_every_n_steps`` steps (:data:`FINITE_CHECK_STEPS` when that is 0), before every checkpoint and at
the end of every task; a non-finite loss then fails the run naming the step that caused it, and neither a checkpoint
nor an evaluation ever sees the weights it left. ``hooks.should_stop`` is asked between tasks only (a sweep's
stopping rule decides at evaluation points); ``hooks.checkpoint_now`` (a preemption notice) at those finiteness
reads, agreed across ranks, and answered by a mid-task checkpoint from which Ray restarts the preempted run. Where
neither hook is set, training steps run no collective besides DDP's own.

A resume may use another world size: the global batches do not depend on it. With W = 1 nothing of this runs and
the loop is unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from fomo_ray.core import distributed
from fomo_ray.core.assembly import Run, build_run, eval_plan
from fomo_ray.core.batch_step import TaskLosses, _mixed, batch_loss, forward_backward  # noqa: F401 (batch_loss: re-exported)
from fomo_ray.core.checkpoint import CheckpointMarker, LoopState, Resumed, restore, take_snapshot
from fomo_ray.config import ExperimentConfig
from fomo_ray.maths.losses import clamp_logit_scale_
from fomo_ray.models.metrics import tidy_frame
from fomo_ray.maths.optim import make_optimizer, trainable_named
from fomo_ray.maths.schedules import lr_at
from fomo_ray.seeding import seed_everything, task_seed


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
    # (task, step, loss, lr, grad_norm, global_step): loss and grad_norm (the total gradient norm before the clip)
    # are 0-d tensors left on the device (``float(loss)`` reads one, waiting for the step: read them only when
    # logging); global_step counts the steps of every task so far (a continuous x axis over the stream)
    on_step: Callable[[int, int, torch.Tensor, float, torch.Tensor | None, int], None] | None = None
    # end of every task, every N steps: the LoopState on rank 0, a checkpoint.CheckpointMarker on the other ranks
    on_checkpoint: Callable[[LoopState | CheckpointMarker], None] | None = None
    should_stop: Callable[[], bool] | None = None  # cooperative early stopping (a sweep's rule), between tasks
    # a checkpoint wanted now (a preemption notice: fomo_ray/engine/preemptions.py); asked at each finiteness check,
    # agreed across ranks, answered by a mid-task checkpoint
    checkpoint_now: Callable[[], bool] | None = None


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
    check = cfg.tracking.log_every_n_steps or FINITE_CHECK_STEPS  # steps between reads of the losses' finiteness
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
            pending: list[torch.Tensor] = []  # this task's losses (0-d, on the device) not yet checked to be finite
            for step in range(first_step, task.steps):
                lr = lr_at(step, task.steps, t, cfg.schedule, cfg.optimizer.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                # CLIP loss + the method's term (once per step), backpropagated; accum_steps > 1: micro-batches
                loss = forward_backward(run, next(batches), encoder, scaler, method.extra_loss(model, t))
                value = loss.detach()  # stays on the device: no host sync per step (checked below, every `check`)
                pending.append(value)
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
                due = every and (step + 1) % every == 0 and step + 1 < task.steps and hooks.on_checkpoint
                checking = (step + 1) % check == 0 or step + 1 == task.steps
                if due or checking:  # never checkpoint/evaluate a NaN
                    check_finite(pending, step + 1 - len(pending), t, method.name)
                    pending.clear()
                if checking and step + 1 < task.steps and hooks.checkpoint_now and _checkpoint_now(hooks, run):
                    due = True  # a preemption notice: keep the steps so far (the resumed run continues from here)
                if due:
                    hooks.on_checkpoint(take_snapshot(run, t, step + 1, opt, scaler, results))

        method.after_task(model, t, TaskLosses(run, t, task.rows))
        run.buffer.add(task.rows)
        if t + 1 in points:
            with deployed(model, method.deployed_weights(t, model)):
                records = evaluate_point(run, t + 1, points[t + 1])
            results += records
            _emit(hooks.on_eval, t + 1, records)
        if hooks.on_checkpoint:
            hooks.on_checkpoint(take_snapshot(run, t + 1, 0, None, None, results))
        if t + 1 < len(run.plan) and _should_stop(hooks, run):  # after the last task there is nothing to stop
            break
    return tidy_frame(results)


# --------------------------------------------------------------------------------------------------- steps
def task_batches(run: Run, t: int, rows: np.ndarray, start_step: int, end_step: int):
    """The mixed P/D/B batches of task ``t`` for steps ``[start_step, end_step)``, with the per-source sizes of
    docs/BENCHMARK.md §Mixture (the buffer's share goes to P and D while it is empty), this rank's shard only, built
    ``data.prefetch`` steps ahead. Exactly resumable: batch k is a function of (cfg.seed, t, k) only. Use as a context
    manager."""
    from fomo_ray.data.mixture import mixture_sizes
    from fomo_ray.data.prefetch import Prefetcher

    m = run.cfg.mixture
    sizes = mixture_sizes(m.batch_size, (m.pool, m.update, m.buffer), buffer_empty=len(run.buffer) == 0)
    mixed = _mixed(run, rows, sizes, "batches", t, start_step, shard=distributed.world())
    lo, hi = mixed.shard
    shape = (hi - lo, mixed.image_size, mixed.image_size, 3)
    return Prefetcher(mixed.batch, range(start_step, end_step), run.device, run.cfg.data.prefetch, shape)


def evaluate_point(run: Run, point: int, full_too: bool) -> list[dict[str, Any]]:
    """Tidy records of evaluating the weights the model holds now at evaluation point ``point``: on the fixed subsets
    (the trajectory: the same samples at every point), and on the full test sets as well when ``full_too``."""
    out = []
    for eval_set in ("subset", "full") if full_too else ("subset",):
        records = run.evaluator.evaluate(run.model, run.backbone.tokenizer, full=eval_set == "full",
                                         weights_version=f"{run.name}/point{point}")
        out += [{"run": run.name, "point": point, "dataset": r["dataset"], "role": r["role"], "metric": r["metric"],
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


FINITE_CHECK_STEPS = 10  # steps between finiteness reads when tracking.log_every_n_steps = 0 (no logging)


def check_finite(losses: list[torch.Tensor], first_step: int, t: int, method: str) -> None:
    """Raise :class:`TrainingDiverged` naming the first of ``losses`` (0-d tensors of steps ``first_step``,
    ``first_step + 1``, ... of task ``t``) that is not finite: one host read for all of them, on the device."""
    if not losses:
        return
    values = torch.stack([v.float() for v in losses])
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        i = int(bad.int().argmax())
        raise TrainingDiverged(t, first_step + i, float(values[i]), method)


def _checkpoint_now(hooks: RunHooks, run: Run) -> bool:
    # agreed like _should_stop: every rank takes (and reports) the same checkpoint; only asked where the hook is set
    # (on every rank alike), so runs without it add no collective
    return bool(hooks.on_checkpoint) and distributed.any_rank(bool(hooks.checkpoint_now()), run.device)


def _should_stop(hooks: RunHooks, run: Run) -> bool:
    # agreed across data-parallel ranks: one rank leaving the loop alone would hang the others in the next all-reduce
    return distributed.any_rank(bool(hooks.should_stop and hooks.should_stop()), run.device)
