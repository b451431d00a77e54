"""One training step's forward and backward, and the task losses of ``method.after_task``, for the continual loop
(``fomo_ray/core/loop.py``): the contrastive loss of one mixed batch (:func:`batch_loss`; InfoNCE, or SigLIP's sigmoid
loss), one step's backward with ``optimizer.accum_steps`` micro-batches that keep the whole global batch as
negatives (:func:`forward_backward`, as open_clip's ``accum_freq``), and EWC's Fisher batches sharded like training
(:class:`TaskLosses`). Under data parallelism every rank runs only its shard of a batch and the loss is the global
batch's over the gathered features."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fomo_ray.core import distributed
from fomo_ray.core.assembly import Run
from fomo_ray.data.augment import model_input
from fomo_ray.maths.losses import contrastive_loss, logit_terms
from fomo_ray.maths.memory_saving import micro_sizes, micro_spans, splice
from fomo_ray.seeding import derive_seed


def batch_loss(run: Run, batch: Mapping[str, Any], encoder: nn.Module | None = None) -> torch.Tensor:
    """Contrastive loss of one mixed batch (all P/D/B samples are each other's negatives), under the run's autocast:
    the model's own loss (``losses.contrastive_loss``: SigLIP's sigmoid loss for a model with a ``logit_bias``,
    else InfoNCE).

    The batch holds uint8 images and stored token ids; they are moved to the device (a no-op when the prefetcher
    already did) and normalised there. ``encoder`` (data parallel: ``distributed.data_parallel``) encodes this
    rank's shard; the loss then runs over the features of the whole global batch gathered from all ranks,
    identical on every rank. Without ``encoder`` the model encodes the batch itself (one process; a
    ``SyncBatchNorm`` then stays rank-local, ``distributed.rank_local``)."""
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


def forward_backward(run: Run, batch: Mapping[str, Any], encoder: nn.Module | None, scaler: torch.amp.GradScaler,
                     extra: torch.Tensor | None) -> torch.Tensor:
    """One step's loss, backpropagated through ``scaler`` into the parameters' ``.grad``: :func:`batch_loss` of the
    global batch plus the method's ``extra`` term (added once per step). Returns the loss, detached.

    With ``optimizer.accum_steps`` = k > 1, as open_clip's ``accum_freq`` (``fomo_ray/maths/memory_saving.py``): a
    no-grad pass caches the features of the whole global batch (this rank's shard in k micro-batches, gathered over the
    ranks); then each micro-batch is encoded again with gradient, spliced into the cached features and the loss over
    the whole global batch is backpropagated (the reported loss is the cached pass's, the one-batch loss). The k
    backward passes sum to the one-batch gradient; ``logit_scale``/``logit_bias`` and ``extra`` take theirs in the
    last one only, and under DDP the gradients are all-reduced once, after the last (``no_sync`` before)."""
    k = run.cfg.optimizer.accum_steps
    if k == 1:
        loss = batch_loss(run, batch, encoder)
        if extra is not None:
            loss = loss + extra
        scaler.scale(loss).backward()
        return loss.detach()
    model, bb = run.model, run.backbone
    rank, world = distributed.world()
    shards = distributed.shard_sizes(run.cfg.mixture.batch_size, world)
    images, tokens = (batch[key].to(run.device, non_blocking=True) for key in ("images", "tokens"))
    bounds = np.cumsum([0] + [micro_sizes(n, k) for n in shards][rank])  # every rank checks every shard: all raise

    def micro(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(int(bounds[j]), int(bounds[j + 1]))
        return model_input(images[rows], bb.image_size, bb.mean, bb.std), tokens[rows]

    plain = distributed.PairEncoder(model)
    with torch.no_grad(), bb.autocast(run.device):  # the cached pass: features of the whole global batch
        parts = [plain(*micro(j)) for j in range(k)]
        cached = [distributed.gather_batch(torch.cat([p[i] for p in parts]), shards) for i in (0, 1)]
        value = contrastive_loss(*cached, *parts[0][2:])
    for j in range(k):
        last = j == k - 1
        with contextlib.nullcontext() if last or encoder is None else encoder.no_sync():  # DDP: all-reduce once
            with bb.autocast(run.device):
                image_features, text_features, *logit = (plain if encoder is None else encoder)(*micro(j))
                spans = micro_spans(shards, k, j)
                sizes = [hi - lo for lo, hi in spans]
                features = [splice(c, distributed.gather_batch(f, sizes), spans)
                            for c, f in zip(cached, (image_features, text_features))]
                loss = contrastive_loss(*features, *(logit if last else [x.detach() for x in logit]))
                if last and extra is not None:
                    loss = loss + extra
            scaler.scale(loss).backward()
    return value + extra.detach() if extra is not None else value


def _mixed(run: Run, rows: np.ndarray, sizes: tuple[int, int, int], purpose: str, t: int, start_step: int,
           shard: tuple[int, int] = (0, 1)):
    from fomo_ray.data.mixture import MixedBatches

    return MixedBatches(run.bench, run.pool_rows, rows, run.buffer.rows(), sizes, derive_seed(run.cfg.seed, purpose),
                        t, start_step, token_key=run.token_key, backend=run.cfg.data.loader,
                        image_size=run.backbone.image_size, num_workers=run.cfg.data.num_workers,
                        pool_bench=run.pool_bench, shard=shard)


class TaskLosses:
    """The CLIP losses of batches of task ``t``'s update data D_t only, for ``method.after_task`` (EWC's Fisher):
    ``sum_over(n, per_batch)`` sums ``per_batch(loss_k)`` over the global batches k < n (``mixture.batch_size``).

    Under data parallelism the batches are sharded like training: every rank takes part in every batch, decodes and
    encodes only its shard, and the loss is the global batch's over the features gathered from all ranks (the
    one-process in-batch negatives), so no rank ever runs more than its shard; with ``optimizer.accum_steps`` = k > 1
    the shard runs as k micro-batches against the cached features of the rest (``forward_backward``), as training
    does. A rank's gradient of that loss is only its shard's share (plus the replicated logit scale's), and
    ``per_batch`` may square it (EWC: the empirical Fisher squares each batch's gradient), so the ranks' gradients
    are first averaged as DDP averages them (one all-reduce per dtype of a flat buffer) and ``per_batch`` gets a loss
    of the same value whose gradient with respect to every trainable parameter is exactly that global-batch gradient
    (``loss + S - S.detach()`` with ``S = sum_p <p, g_p>``). Every rank then holds the one-process sums (up to
    summation order), identically. On one process without accumulation ``per_batch`` gets the loss itself."""

    def __init__(self, run: Run, t: int, rows: np.ndarray):
        self.run = run
        self.batches = _mixed(run, rows, (0, run.cfg.mixture.batch_size, 0), "fisher", t, 0,
                              shard=distributed.world())

    def sum_over(self, n: int, per_batch: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        total = None
        for k in range(n):  # random access decodes one batch (this rank's shard of it) at a time
            part = per_batch(self._loss(k))
            total = part if total is None else torch._foreach_add(total, part)
        return total

    def _loss(self, k: int) -> torch.Tensor:
        run, batch = self.run, self.batches.batch(k)
        world = distributed.world()[1]
        accum = int(getattr(run.cfg.optimizer, "accum_steps", 1))
        if world == 1 and accum == 1:
            return batch_loss(run, batch)
        params = [p for p in run.model.parameters() if p.requires_grad]
        if accum == 1:  # the model itself, not the DDP wrapper (whose hooks torch.autograd.grad would not run)
            loss = batch_loss(run, batch, distributed.PairEncoder(run.model))
            grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        else:  # micro-batches against the cached features, backpropagated into .grad (training's own grads kept)
            kept = [p.grad for p in params]
            for p in params:
                p.grad = None
            try:
                loss = forward_backward(run, batch, None, torch.amp.GradScaler(run.device.type, enabled=False), None)
                grads = [p.grad for p in params]
            finally:
                for p, g in zip(params, kept):
                    p.grad = g
        used = [i for i, g in enumerate(grads) if g is not None]  # the same on every rank: the same graph
        mean: list[torch.Tensor] = [grads[i] for i in used]
        del grads  # the averaged copies replace them (one gradient-sized buffer at a time)
        if world > 1:
            for dtype in sorted({g.dtype for g in mean}, key=str):
                idx = [i for i, g in enumerate(mean) if g.dtype == dtype]
                flat = torch.cat([mean[i].reshape(-1) for i in idx])
                distributed.sum_over_ranks([flat], run.device)
                flat.div_(world)
                for i, g in zip(idx, flat.split([mean[i].numel() for i in idx])):
                    mean[i] = g.view_as(mean[i])
        s = sum((torch.dot(params[i].reshape(-1), g.reshape(-1)) for i, g in zip(used, mean)),  # d s / d p = g exactly
                torch.zeros((), device=loss.device))
        return loss.detach() + (s - s.detach())
