"""Data-parallel training of the continual loop across ``torch.distributed`` ranks (DDP); a no-op on one process.

How the loop uses it (``fomo_ray/core/loop.py``), when ``torch.distributed`` is initialised with world size W > 1 (Ray
Train's ``TorchTrainer`` does so in every worker):

- every rank plans the *same* global mixed batch of ``mixture.batch_size`` samples (``MixedBatches`` is a pure
  function of (seed, task, step)) and decodes and encodes only its contiguous shard, rows
  ``[floor(r*b/W), floor((r+1)*b/W))`` (``fomo_ray.data.mixture.shard_bounds``): any W <= b works, so an elastic
  run that resizes to a W not dividing b trains on the same global batches;
- the image/text features of all shards are all-gathered *with* gradient (padded to the largest shard for the
  collective, the padding dropped after it) and every rank computes the model's contrastive loss (symmetric InfoNCE, or
  SigLIP's sigmoid loss for a model with a ``logit_bias``: ``losses.contrastive_loss``) over the whole global batch, so
  every sample still has the b-1 other samples as in-batch negatives (Radford et al. 2021; docs/BENCHMARK.md §Mixture) —
  as in open_clip's ``gather_with_grad`` training; for the sigmoid loss this is exactly the one-process loss of the
  global batch (open_clip's SigLIP exchanges text shards between neighbours instead, same value);
- BatchNorm layers become ``nn.SyncBatchNorm`` on CUDA ranks (global-batch statistics, identical running statistics
  on every rank, as one process); on CPU ranks (gloo, where SyncBatchNorm does not run) a BatchNorm model is refused
  (:func:`data_parallel`);
- the model is wrapped in ``DistributedDataParallel``. Every rank differentiates the same global loss, so the
  all-gather's backward sums W identical copies of each shard's feature gradient (W x the single-process share)
  and DDP averages over the W ranks: the averaged gradient equals the single-process gradient of the global batch
  (up to the order of floating-point sums);
- work that only reads the weights is shared: evaluation encodes every W-th batch of images and texts on each rank
  and gathers the features (:func:`share`, :func:`gather_rows`); each unit is the computation one process would
  do, so the gathered results equal one process's. EWC's Fisher batches are sharded like training (every rank its
  shard of every batch, the loss over the gathered features, the gradients averaged; ``batch_step.TaskLosses``), so
  the Fisher equals one process's up to summation order;
- everything else (method hooks, merges, optimizer, clipping) runs identically on every rank, so the weights and all
  state stay replicated and any rank's ``LoopState`` is a valid checkpoint (rank 0 alone writes it: the edge).

Collectives here must be entered by every rank in the same order: the loop calls them at the same points on all
ranks (never behind a rank-0 branch).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from fomo_ray.config import ConfigError


# --------------------------------------------------------------------------------------------------- who am I
def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if not _initialised():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_rank_zero() -> bool:
    """True on the rank that reports (logs, writes checkpoints); always True on one process."""
    return world()[0] == 0


def is_data_parallel() -> bool:
    """True when the loop runs on several ranks (shards batches, gathers features, syncs gradients)."""
    return world()[1] > 1


# --------------------------------------------------------------------------------------------------- pure helpers
def check_batch_size(batch_size: int, world_size: int) -> None:
    """Every rank needs at least one sample of the global batch (shards are near-equal, any world size works)."""
    if world_size > batch_size:
        raise ConfigError(f"config key 'mixture.batch_size' = {batch_size} is smaller than the world size "
                          f"{world_size} (data-parallel ranks, at most 'ray.num_workers'): every rank needs a sample")


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Rows of each rank's contiguous, near-equal shard of an ``n``-row global batch, in rank order."""
    from fomo_ray.data.mixture import shard_bounds

    return [hi - lo for lo, hi in (shard_bounds(n, r, world_size) for r in range(world_size))]


def share(items: int, rank: int, world_size: int) -> range:
    """Which of ``items`` work units (evaluation batches, Fisher batches) rank ``rank`` does: every W-th one, so each
    unit is the same computation as on one process and results gathered in unit order equal one process's."""
    return range(rank, items, world_size)


# --------------------------------------------------------------------------------------------------- collectives
def gather_batch(features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' shard features (``sizes[r]`` rows on rank r) concatenated in rank order (= the global batch's row
    order), differentiable: the backward sends each shard its gradient summed over the ranks. Shards of unequal size
    are padded to the largest for the collective and the padding is dropped after it (it gets no gradient)."""
    if not is_data_parallel():
        return features
    # differentiable (its backward reduce-scatters with SUM); replaces the deprecated torch.distributed.nn all_gather
    from torch.distributed._functional_collectives import all_gather_single

    most = max(sizes)
    if features.shape[0] < most:
        features = torch.nn.functional.pad(features, (0, 0, 0, most - features.shape[0]))
    gathered = all_gather_single(features.contiguous(), 0, torch.distributed.group.WORLD)
    if all(n == most for n in sizes):
        return gathered
    return torch.cat([gathered[r * most:r * most + n] for r, n in enumerate(sizes)])


def gather_rows(rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Every rank's ``[n_r, ...]`` tensor (sizes may differ) concatenated in rank order, on every rank; not
    differentiable (evaluation features and keys). On one process ``rows`` itself."""
    if not is_data_parallel():
        return rows
    dev = _collective_device(device)
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(world()[1])]
    torch.distributed.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=dev)
    padded[:rows.shape[0]] = rows.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]).to(rows.device)


def sum_over_ranks(tensors: list[torch.Tensor], device: torch.device | str) -> None:
    """In place: each tensor becomes its sum over the ranks (the same on every rank)."""
    if not is_data_parallel():
        return
    dev = _collective_device(device)
    for t in tensors:
        buf = t.to(dev)
        torch.distributed.all_reduce(buf)
        t.copy_(buf)


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True if ``flag`` is true on any rank (e.g. cooperative early stopping): every rank then stops at the same step,
    where otherwise the others would wait forever in the next gradient all-reduce."""
    if not is_data_parallel():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(device))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects), so a decision made once (e.g. the budget's steps per
    task) is the same everywhere."""
    if not is_data_parallel():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` on one process. Runs over gloo
    (a CPU group beside an NCCL default group), so it works before, and without, CUDA: the ranks of a GPU run
    agree through it that one of them has no usable GPU (``ray_train.continual_run``)."""
    if not is_data_parallel():
        return [value]
    out: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(out, value, group=_cpu_group())
    return out


_CPU_GROUPS: dict[int, Any] = {}  # id(default process group) -> its gloo twin (None: the default is gloo already)


def _cpu_group() -> Any:
    """A gloo group over all ranks for host-side objects (created once per process group, by every rank at the same
    call: :func:`gather_objects` is entered by every rank)."""
    from torch.distributed import distributed_c10d

    key = id(distributed_c10d._get_default_group())
    if key not in _CPU_GROUPS:
        gloo = torch.distributed.get_backend() == "gloo"
        _CPU_GROUPS[key] = None if gloo else torch.distributed.new_group(backend="gloo")
    return _CPU_GROUPS[key]


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building FiF-mini or the pretrained base into a shared directory); the other
    ranks run it after, finding the result on shared storage or building their own copy on another node."""
    if not is_data_parallel():
        yield
        return
    if not is_rank_zero():
        torch.distributed.barrier()
        yield
        return
    try:
        yield
    finally:  # also when rank 0 fails (bad input): the others then run the block and fail the same way, not hang
        torch.distributed.barrier()


def _collective_device(device: torch.device | str) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones)
    device = torch.device(device)
    return device if torch.distributed.get_backend() != "gloo" else torch.device("cpu")


# --------------------------------------------------------------------------------------------------- the model
class PairEncoder(nn.Module):
    """``(images, tokens) -> (image features, text features, exp(logit_scale)[, logit_bias])`` of a CLIP model,
    L2-normalised: the one forward DDP wraps (DDP syncs gradients only of what runs through its ``forward``). A
    SigLIP-style model's ``logit_bias`` is returned too (as open_clip's forward does), so that its sigmoid loss uses
    it inside the wrapped forward and DDP sees the bias take part."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from fomo_ray.maths.losses import logit_terms

        m = self.model
        scale, bias = logit_terms(m)
        features = (m.encode_image(images, normalize=True), m.encode_text(tokens, normalize=True), scale)
        return features if bias is None else (*features, bias)


class BatchNormError(ValueError):
    """A model with BatchNorm layers cannot train data-parallel here; the message names the layers and the way out."""


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s BatchNorm layers (``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm``) in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def needs_sync_batchnorm(layers: list[str], world_size: int, device: torch.device | str) -> bool:
    """Whether a model with BatchNorm layers ``layers`` must have them synchronised for ``world_size`` ranks on
    ``device``: True for several CUDA ranks, False for one rank or no BatchNorm; raises :class:`BatchNormError` for
    several CPU ranks (torch's SyncBatchNorm runs on GPUs only, and per-rank statistics would drift apart)."""
    if world_size <= 1 or not layers:
        return False
    if torch.device(device).type != "cuda":
        shown = ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "")
        raise BatchNormError(
            f"the model has {len(layers)} BatchNorm layers ({shown}): on {world_size} data-parallel ranks their batch "
            f"statistics must be synchronised (SyncBatchNorm), which torch runs on GPUs only; train on GPU workers "
            f"('ray.gpus_per_worker' > 0) or one worker ('ray.num_workers' = 1)")
    return True


def sync_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm layer of ``model`` by an ``nn.SyncBatchNorm`` sharing its parameters and buffers, in
    place (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``): names, and so state-dict keys, stay the same, and the
    parameters stay the same objects (optimizers and methods keep working). Returns how many were converted."""
    plain = [n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError("sync_batchnorm converts the BatchNorm layers inside a model, not a bare BatchNorm layer")
    if plain:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # returns ``model`` itself, its children replaced
    return len(plain)


@contextlib.contextmanager
def rank_local(model: nn.Module) -> Iterator[None]:
    """For a forward each rank runs on its own whole batches (EWC's Fisher pass, not the sharded training step):
    ``nn.SyncBatchNorm`` layers normalise with this batch's own statistics, as on one process, and enter no
    collective (the ranks run different numbers of such batches: a collective would hang); their running statistics
    are restored afterwards, so they stay replicated across ranks. A no-op on one process and for models without
    SyncBatchNorm."""
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)] if is_data_parallel() else []
    if not layers:
        yield
        return
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in layers]
    for m in layers:  # the plain BatchNorm forward (F.batch_norm with this rank's statistics)
        m.forward = nn.modules.batchnorm._BatchNorm.forward.__get__(m)
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved):
                del m.forward
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def data_parallel(model: nn.Module, device: torch.device | str) -> nn.Module | None:
    """``DistributedDataParallel(PairEncoder(model))`` sharing ``model``'s parameters, or None on one process or when
    nothing is trainable (nothing to synchronise). Methods keep working on ``model`` itself (state-dict keys
    unchanged).

    ``find_unused_parameters=False`` (no autograd-graph walk per step): every registered method's trainable
    parameters all take part in the contrastive forward — locked towers and PEFT freeze what they leave out, so
    frozen parameters are simply not synchronised, and a SigLIP model's ``logit_bias`` is returned by
    :class:`PairEncoder` and used by its sigmoid loss (``tests/test_ddp.py`` checks this for the whole registry; a
    method breaking it fails at its second step with DDP's "find_unused_parameters" error).

    BatchNorm (open_clip's ModifiedResNet RN50..., timm convnets): each rank's batch statistics would be its shard's,
    and its running statistics would drift apart from the other ranks'. On CUDA the layers become ``nn.SyncBatchNorm``
    (:func:`sync_batchnorm`, in place, same state-dict keys): they normalise with the statistics of the whole global
    batch, as one process does, and update identical running statistics on every rank. On CPU (gloo) torch's
    SyncBatchNorm does not run: such a model is refused (:class:`BatchNormError`, naming the layers).
    ``forward_sync_buffers=False``: buffers are then either constants (attention masks) or running statistics that
    SyncBatchNorm keeps identical, all synced once at construction.
    """
    if not is_data_parallel() or not any(p.requires_grad for p in model.parameters()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    if needs_sync_batchnorm(batchnorm_layers(model), world()[1], device):
        sync_batchnorm(model)
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(PairEncoder(model), device_ids=ids, forward_sync_buffers=False,
                                   find_unused_parameters=False)
