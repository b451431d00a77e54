"""Two ways to trade compute for activation memory in the training step, and what each costs to the budget.

The budget is docs/BENCHMARK.md §Budgets.

- **Gradient checkpointing** (``backbone.grad_checkpointing``): open_clip's ``set_grad_checkpointing`` runs every
  transformer block of both towers through non-reentrant ``torch.utils.checkpoint``: the forward keeps only each
  block's input, the backward recomputes the block's forward before differentiating it. The gradient is the same
  computation (bitwise on CPU fp32 for the tiny archs; ``tests/test_accumulation.py``); peft's adapters and the
  swapped ``LinearAttention`` (``methods/peft_mha.py``) live inside the blocks and are recomputed with them.
- **Gradient accumulation** (``optimizer.accum_steps`` = k): each rank's shard of the global batch runs as k
  contiguous, near-equal micro-batches (:func:`micro_sizes`), yet every sample keeps the whole global batch as in-batch
  negatives, as open_clip's ``accum_freq``: a no-grad pass encodes every micro-batch and caches (and gathers over the
  ranks) the features of the global batch; then each micro-batch is encoded again with gradient, its rows of the cached
  features are replaced by the live ones (:func:`splice`) and the loss over the whole global batch is backpropagated.
  The k backward passes sum to the one-batch gradient (each feature's gradient is taken once, at the cached values of
  the others); ``logit_scale`` / ``logit_bias``, which every micro-batch's loss uses directly, take their gradient in
  one of them only (open_clip's loop adds it k times). The loop's ``forward_backward`` runs it. The forward must give
  the same features twice: with dropout (``method.peft.dropout`` > 0) the cached and the re-encoded features differ
  and the gradient is open_clip's approximation, not the one-batch gradient.

What the budget must charge (``step_cost``; F = forward FLOPs of the towers at the rank's shard, B = backward FLOPs,
R = the forward FLOPs of the checkpointed blocks, all linear in the batch): a plain step ``F + B``; checkpointing
``F + R + B`` (``FlopCounterMode`` counts the recomputation when the measured model has checkpointing on); accumulation
``2F + B`` for any k > 1 (the cached pass is one more forward of the whole shard), both ``2F + R + B``. Activation
memory: accumulation keeps that of one micro-batch (the largest, ``ceil(n/k)`` rows of an n-row shard) plus the
cached features (2 x global batch x embedding width, negligible); checkpointing keeps what is saved outside the blocks,
every block's input, and one block's saved tensors at a time (recomputed in the backward):
:func:`checkpointed_activation_bytes`, e.g. from one plain measurement through :func:`block_ledger`. (A
``saved_tensors_hooks`` count of a step with checkpointing on sees the first two terms, not the third: the
non-reentrant checkpoint saves the blocks' inputs through the caller's hooks and hides the rest.) Parameters,
gradients and optimizer state do not change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fomo_ray.config import ConfigError


# --------------------------------------------------------------------------------------------------- checkpointing
def enable_grad_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on open_clip's gradient checkpointing of ``model`` (in place; returns it). Raises ``ConfigError`` for a
    model without ``set_grad_checkpointing``. open_clip's ModifiedResNet image tower ignores it (its text tower is
    still checkpointed)."""
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ConfigError(f"config key 'backbone.grad_checkpointing': the model ({type(model).__name__}) has no "
                          f"open_clip set_grad_checkpointing")
    model.set_grad_checkpointing(True)
    return model


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks open_clip runs through ``torch.utils.checkpoint`` when checkpointing is on: every residual block of
    each open_clip ``Transformer`` (image and text towers), in module order. (timm and HF towers checkpoint their own
    blocks and are not listed.)"""
    return [block for m in model.modules() if hasattr(m, "grad_checkpointing") and hasattr(m, "resblocks")
            for block in m.resblocks]


# --------------------------------------------------------------------------------------------------- accumulation
def micro_sizes(rows: int, accum_steps: int) -> list[int]:
    """Rows of each of the ``accum_steps`` contiguous, near-equal micro-batches of a shard of ``rows`` rows (the
    larger ones last, as ``data.mixture.shard_bounds`` splits a global batch). Every micro-batch needs a row."""
    if accum_steps < 1:
        raise ConfigError(f"config key 'optimizer.accum_steps' must be >= 1, got {accum_steps}")
    if rows < accum_steps:
        raise ConfigError(f"config key 'optimizer.accum_steps' = {accum_steps} is larger than this rank's shard of "
                          f"{rows} rows of 'mixture.batch_size': every micro-batch needs a sample")
    return [(j + 1) * rows // accum_steps - j * rows // accum_steps for j in range(accum_steps)]


def micro_spans(shards: Sequence[int], accum_steps: int, j: int) -> list[tuple[int, int]]:
    """Global rows ``[lo, hi)`` of micro-batch ``j`` on every rank, in rank order, for ranks holding contiguous shards
    of ``shards[r]`` rows of the global batch (rank order = row order)."""
    spans, start = [], 0
    for rows in shards:
        sizes = micro_sizes(rows, accum_steps)
        lo = start + sum(sizes[:j])
        spans.append((lo, lo + sizes[j]))
        start += rows
    return spans


def splice(cached: torch.Tensor, live: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``cached`` ([global batch, D], no gradient) with rows ``spans`` replaced by ``live`` (their rows stacked in span
    order, e.g. gathered over the ranks): the global batch's features with gradient through ``live`` only."""
    pieces, start, at = [], 0, 0
    for lo, hi in spans:
        pieces += [cached[start:lo], live[at:at + hi - lo]]
        start, at = hi, at + hi - lo
    if at != live.shape[0]:
        raise ValueError(f"splice: {live.shape[0]} live rows for spans holding {at}")
    pieces.append(cached[start:])
    return torch.cat([p.to(live.dtype) for p in pieces])


def check_accumulation(model: nn.Module, accum_steps: int) -> None:
    """Refuse accumulation for a model with BatchNorm layers: they would normalise each micro-batch with its own
    statistics (not the global batch's, so not the one-batch gradient) and update their running statistics twice per
    micro-batch (the cached pass runs in training mode)."""
    if accum_steps <= 1:
        return
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers:
        raise ConfigError(f"config key 'optimizer.accum_steps' = {accum_steps}: the model has {len(layers)} BatchNorm "
                          f"layers ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}), whose statistics "
                          f"would be the micro-batches' instead of the global batch's; use accum_steps=1")


# --------------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class StepCost:
    """FLOPs and activation memory of one optimizer step with the memory-saving options (see module docstring)."""

    flops: float             # forward + backward (+ recomputation, + the cached pass), without the optimizer
    activation_bytes: float  # activations alive at the peak; add parameters, gradients, optimizer and method state


def step_cost(forward_flops: float, backward_flops: float, activation_bytes: float, *, accum_steps: int = 1,
              rows: int | None = None, grad_checkpointing: bool = False, recompute_flops: float | None = None,
              checkpointed_bytes: float | None = None) -> StepCost:
    """What one step over a rank's shard of ``rows`` rows costs, from a plain measurement of that shard (or one
    scaled to it: all inputs are linear in the batch): ``forward_flops`` (F), ``backward_flops`` (B) and
    ``activation_bytes`` (saved for backward). With ``grad_checkpointing``: ``recompute_flops`` (R, the checkpointed
    blocks' forward; default F, an upper bound) and ``checkpointed_bytes`` (required: the activation memory with
    checkpointing on, :func:`checkpointed_activation_bytes` / :meth:`BlockLedger.checkpointed_bytes`). With
    ``accum_steps`` = k > 1, one more forward (the cached pass) and the activations of the largest micro-batch,
    :func:`micro_fraction` of the shard's (``1/k`` when ``rows`` is not given)."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    flops = forward_flops + backward_flops
    memory = activation_bytes
    if grad_checkpointing:
        if checkpointed_bytes is None:
            raise ValueError("step_cost: grad_checkpointing needs checkpointed_bytes (checkpointed_activation_bytes)")
        flops += forward_flops if recompute_flops is None else recompute_flops
        memory = checkpointed_bytes
    if accum_steps > 1:
        flops += forward_flops  # the no-grad pass that caches the features of every micro-batch
        memory *= micro_fraction(rows, accum_steps) if rows is not None else 1 / accum_steps
    return StepCost(flops=flops, activation_bytes=memory)


def micro_fraction(rows: int, accum_steps: int) -> float:
    """The largest micro-batch's share of a ``rows``-row shard, ``ceil(rows/k)/rows`` (:func:`micro_sizes`): what
    activation memory scales by under accumulation."""
    return math.ceil(rows / accum_steps) / rows


def checkpointed_activation_bytes(outside_bytes: float, block_saved_bytes: Sequence[float],
                                  block_input_bytes: Sequence[float]) -> float:
    """Activation memory of a step with checkpointing from a measurement without it: what is saved outside the
    checkpointed blocks, plus every block's input (kept for the recomputation), plus the largest block's saved
    tensors (recomputed one block at a time in the backward). ``block_*`` are per block call, e.g. as
    :func:`block_ledger` attributes a ``saved_tensors_hooks`` count."""
    return outside_bytes + sum(block_input_bytes) + max(block_saved_bytes, default=0.0)


@dataclass
class BlockLedger:
    """Saved-for-backward bytes of one forward, attributed to the checkpointed block that saved them (``None``:
    outside every block), and each block call's input bytes; :func:`block_ledger` keeps ``current`` up to date, the
    caller's ``saved_tensors_hooks`` pack function calls :meth:`add` for every (deduplicated) saved tensor."""

    current: int | None = None
    saved: dict[int | None, float] = field(default_factory=dict)
    inputs: dict[int, float] = field(default_factory=dict)

    def add(self, nbytes: float) -> None:
        self.saved[self.current] = self.saved.get(self.current, 0.0) + nbytes

    def checkpointed_bytes(self) -> float:
        """:func:`checkpointed_activation_bytes` of what was recorded (from a forward *without* checkpointing)."""
        return checkpointed_activation_bytes(self.saved.get(None, 0.0),
                                             [v for k, v in self.saved.items() if k is not None],
                                             list(self.inputs.values()))


@contextlib.contextmanager
def block_ledger(model: nn.Module) -> Iterator[BlockLedger]:
    """A :class:`BlockLedger` for forwards of ``model`` run inside the block (checkpointing off): forward hooks on
    :func:`checkpointed_blocks` set ``ledger.current`` while a block runs and record its input's bytes."""
    ledger = BlockLedger()
    handles = []

    def enter(i: int):
        def hook(_module, args):
            ledger.current = i
            x = args[0]
            ledger.inputs[i] = ledger.inputs.get(i, 0.0) + x.untyped_storage().nbytes()
        return hook

    def leave(_module, _args, _out):
        ledger.current = None

    for i, block in enumerate(checkpointed_blocks(model)):
        handles += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave)]
    try:
        yield ledger
    finally:
        for h in handles:
            h.remove()


def charge_memory_saving(r: Any, accum_steps: int = 1, grad_checkpointing: bool = False) -> Any:
    """A budget record ``r`` (``budget.CostRecord``) as the step really runs with ``optimizer.accum_steps`` and
    ``backbone.grad_checkpointing`` (:func:`step_cost`): accumulation adds one forward (the no-grad pass that caches
    every micro-batch's features) and keeps the activations of one micro-batch; checkpointing adds the recomputed
    forward and keeps what :func:`block_ledger` counted alongside the plain step (``r.checkpointed_batch_bytes``).
    The forward is taken as a third of the counted forward + backward (a backward runs two matmuls per forward
    matmul). Where the record has no checkpointed count (a CUDA allocator peak) the plain step's memory stays, an
    upper bound, so a checkpointed method never gets more steps than it can pay for."""
    if not r.trainable_params or (accum_steps == 1 and not grad_checkpointing):
        return r
    forward = r.counted_gflops / 3
    ckpt_bytes = r.checkpointed_batch_bytes or r.batch_bytes
    cost = step_cost(forward, r.counted_gflops - forward, r.batch_bytes, accum_steps=accum_steps, rows=r.batch_size,
                     grad_checkpointing=grad_checkpointing, checkpointed_bytes=ckpt_bytes)
    peak = r.peak_bytes - r.batch_bytes + cost.activation_bytes if r.memory_kind == "cpu_analytic" else r.peak_bytes
    what = ", ".join(x for x in (f"{accum_steps} micro-batches" if accum_steps > 1 else "",
                                 "grad checkpointing" if grad_checkpointing else "") if x)
    return dataclasses.replace(r, counted_gflops=cost.flops, peak_bytes=int(round(peak)),
                               measured=f"{r.measured}; charged for {what}")
