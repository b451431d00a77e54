"""The P/D/B mixture: every training batch holds fixed numbers of pool, update and buffer samples.

The sizes follow docs/BENCHMARK.md §Mixture.

``mixture_sizes`` is the reference arithmetic (FiF, Roth, Udandarao et al. 2024): ``b_k = int(b * lambda_k)``,
the remainder handed out +1 each in the order P, D, B; while the buffer is empty (task 0) its share is split,
``div = 1 + [b_P > 0]``, D getting ``b_B//div + b_B%div`` more and P ``b_B//div`` more.

``MixedBatches`` yields one mixed batch per step. Each source cycles its rows endlessly, a fresh seeded
permutation per pass, so the rows of step k are a pure function of ``(seed, task, k)``; the caption of each row
and the random crops are seeded the same way. Starting at ``start_step=k`` therefore gives bit-for-bit the batches
an uninterrupted iterator yields from step k on (exact resume), and a prefetcher that builds step k + 1 early
(:mod:`fomo_ray.data.prefetch`) changes nothing. Pool rows index the pool split, update and buffer rows the train
split; both are index sets over the betons, never copies.

A batch is planned whole (rows, crop boxes and caption choices of all ``b`` samples) and then only the ``shard``
slice ``[lo, hi)`` is decoded: under data parallelism each rank decodes its own rows of the one global batch, so
what is trained on does not depend on the world size and no rank repeats another's work.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .augment import RRC_RATIO, RRC_SCALE, generator_for, rrc_boxes
from .decode import crop_resize
from .format import Benchmark, DataError
from .loaders import check_backend, check_rows, decode_threads, image_source
from .tokens import load_tokens

SOURCES = ("pool", "update", "buffer")  # "source" ids 0 = P, 1 = D, 2 = B
_MIXTURE_STREAM = 1                     # domain tag keeping mixture seeds apart from loader seeds


def mixture_sizes(b: int, lambdas: Sequence[float], buffer_empty: bool) -> tuple[int, int, int]:
    """``(b_P, b_D, b_B)`` for batch size ``b`` and shares ``lambdas = (lambda_P, lambda_D, lambda_B)``.

    A source with share 0 never receives remainder samples. b=512, (.33, .34, .33) -> (169, 175, 168); with an
    empty buffer -> (253, 259, 0).
    """
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise DataError(f"mixture batch size must be a positive integer, got {b!r}")
    lam = [float(x) for x in lambdas]
    if len(lam) != 3:
        raise DataError(f"mixture needs 3 shares (pool, update, buffer), got {len(lam)}: {list(lambdas)}")
    bad = [f"{n}={x}" for n, x in zip(SOURCES, lam) if not x >= 0]
    if bad:
        raise DataError(f"mixture shares must be >= 0: {', '.join(bad)}")
    if abs(sum(lam) - 1.0) > 1e-6:
        raise DataError(f"mixture shares pool={lam[0]}, update={lam[1]}, buffer={lam[2]} sum to {sum(lam):.6g}, not 1")
    sizes = [int(b * x) for x in lam]
    remainder = b - sum(sizes)
    receivers = [k for k in range(3) if lam[k] > 0]
    for i in range(remainder):
        sizes[receivers[i % len(receivers)]] += 1
    b_p, b_d, b_b = sizes
    if buffer_empty and b_b:
        div = 1 + (b_p > 0)
        b_d += b_b // div + b_b % div
        b_p += b_b // div if b_p > 0 else 0
        b_b = 0
    return b_p, b_d, b_b


def epoch_permutation(rows: np.ndarray, key: Sequence[int], epoch: int) -> np.ndarray:
    """The order in which a source serves its rows in pass ``epoch``."""
    return np.random.default_rng([int(k) % (1 << 63) for k in (*key, epoch)]).permutation(rows)


def cycled_rows(rows: np.ndarray, count: int, step: int, key: Sequence[int],
                permutation: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """The ``count`` rows a source serves at ``step``: positions ``[step*count, (step+1)*count)`` of the endless
    concatenation of ``epoch_permutation(rows, key, e)`` for e = 0, 1, 2, ... (``permutation`` may cache them)."""
    n = len(rows)
    permutation = permutation or (lambda e: epoch_permutation(rows, key, e))
    start, end = step * count, (step + 1) * count
    out = []
    for epoch in range(start // n, (end - 1) // n + 1):
        lo, hi = max(start - epoch * n, 0), min(end - epoch * n, n)
        out.append(permutation(epoch)[lo:hi])
    return np.concatenate(out)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``'s contiguous, near-equal shard of an ``n``-row global batch."""
    if not 0 <= rank < world_size:
        raise DataError(f"shard rank {rank} is not in [0, {world_size})")
    return rank * n // world_size, (rank + 1) * n // world_size


class MixedBatches:
    """Endless iterator of mixed batches ``{"images", "tokens", "source", "rows", "step"}`` for one task.

    ``images``: ``uint8 [n, S, S, 3]`` (CLIP RandomResizedCrop seeded per step; normalised later, on the device);
    ``tokens``: ``int64 [n, L]``, one stored caption per row chosen by a seeded RNG (``token_key`` names the
    tokenizer, :mod:`fomo_ray.data.tokens`); ``source``: 0 (P), 1 (D), 2 (B), in that order; ``rows``: row ids
    within each source's split. ``n`` is the batch size, or the size of the ``shard = (rank, world size)`` slice.
    ``pool_bench`` serves the pool when it lives elsewhere. ``num_workers``: threads of the decode/crop stage
    (:func:`~fomo_ray.data.loaders.decode_threads`; 0 follows the process's CPUs).
    """

    def __init__(self, bench: Benchmark, pool_rows: np.ndarray | None, update_rows: np.ndarray,
                 buffer_rows: np.ndarray | None, sizes: Sequence[int], seed: int, task: int, start_step: int = 0, *,
                 token_key: str, backend: str = "ffcv", image_size: int, num_workers: int = 0,
                 pool_bench: Benchmark | None = None, shard: tuple[int, int] = (0, 1),
                 scale: Sequence[float] = RRC_SCALE, ratio: Sequence[float] = RRC_RATIO):
        check_backend(backend)
        if len(sizes) != 3 or any(int(s) < 0 for s in sizes) or sum(int(s) for s in sizes) < 1:
            raise DataError(f"mixture sizes must be 3 non-negative ints with a positive sum, got {list(sizes)}")
        if int(start_step) < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        self.bench, self.pool_bench = bench, pool_bench or bench
        self.sizes = tuple(int(s) for s in sizes)
        self.seed, self.task, self.start_step = int(seed), int(task), int(start_step)
        self.backend, self.image_size = backend, int(image_size)
        self.num_workers = decode_threads(num_workers)  # 0: the process's CPUs (ray.cpus_per_worker in a trial)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.shard = shard_bounds(self.batch_size, *shard)
        given = (pool_rows, update_rows, buffer_rows)
        benches = (self.pool_bench, bench, bench)
        splits = ("pool", "train", "train")
        self.rows: list[np.ndarray] = []
        for name, rows, b, split, size in zip(SOURCES, given, benches, splits, self.sizes):
            if rows is None:
                rows = np.arange(b.num_rows(split)) if name == "pool" and split in b.splits else np.zeros(0, int)
            rows = check_rows(b, split, rows, f"{name} rows")
            if size > 0 and len(rows) == 0:
                raise DataError(f"mixture source '{name}' gets {size} samples per batch but has no rows")
            self.rows.append(rows)
        self._images = [image_source(b.split_path(s), backend) if n > 0 else None
                        for b, s, n in zip(benches, splits, self.sizes)]
        self._tokens = [load_tokens(b, s, token_key) if n > 0 else None for b, s, n in zip(benches, splits, self.sizes)]
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def batch_size(self) -> int:
        return sum(self.sizes)

    def rows_at(self, step: int) -> list[np.ndarray]:
        """Row ids each source serves at ``step`` (pure function of seed, task, step)."""
        return [cycled_rows(self.rows[k], n, step, self._key(k), lambda e, k=k: self._permutation(k, e)) if n else
                np.zeros(0, np.int64) for k, n in enumerate(self.sizes)]

    def _key(self, source: int) -> tuple[int, ...]:
        return (self.seed, self.task, source, _MIXTURE_STREAM)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        # consecutive steps read the same pass; keep the last few permutations per source
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 6:
                self._perms.clear()
            self._perms[key] = epoch_permutation(self.rows[source], self._key(source), epoch)
        return self._perms[key]

    def __iter__(self) -> Iterator[dict]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1

    def batch(self, step: int, out: torch.Tensor | None = None) -> dict:
        """The batch of ``step`` (random access), this shard's slice only; ``out`` (e.g. a pinned
        ``uint8 [n, S, S, 3]`` buffer) receives the images."""
        rows = self.rows_at(step)
        boxes = self._boxes(step, rows)
        tokens = self._pick_tokens(step, rows)
        source = np.concatenate([np.full(len(r), k, np.int64) for k, r in enumerate(rows)])
        flat = np.concatenate(rows).astype(np.int64)
        lo, hi = self.shard
        if out is None:
            out = torch.empty((hi - lo, self.image_size, self.image_size, 3), dtype=torch.uint8)
        target = out.numpy()
        for k, (a, b) in enumerate(self._spans()):  # decode this shard's part of each source
            a, b = max(a, lo), min(b, hi)
            if a < b:
                crop_resize(self._images[k], flat[a:b], boxes[a:b], self.image_size, target[a - lo:b - lo],
                            self.num_workers)
        return {"images": out, "tokens": torch.from_numpy(tokens[lo:hi]), "source": torch.from_numpy(source[lo:hi]),
                "rows": torch.from_numpy(flat[lo:hi]), "step": step}

    # ------------------------------------------------------------------------------------------- internals
    def _spans(self) -> list[tuple[int, int]]:
        ends = np.cumsum(self.sizes).tolist()
        return [(e - n, e) for e, n in zip(ends, self.sizes)]

    def _boxes(self, step: int, rows: list[np.ndarray]) -> np.ndarray:
        """Crop boxes of the whole global batch: P's, then D's and B's, from one generator (the world size never
        changes a box)."""
        gen = generator_for(self.seed, self.task, step, _MIXTURE_STREAM)
        parts = []
        for k, r in enumerate(rows):
            if len(r):
                src = self._images[k]
                parts.append(rrc_boxes(torch.from_numpy(src.height[r]), torch.from_numpy(src.width[r]), gen,
                                       self.scale, self.ratio).numpy())
        return np.concatenate(parts)

    def _pick_tokens(self, step: int, rows: list[np.ndarray]) -> np.ndarray:
        rng = np.random.default_rng([self.seed % (1 << 63), self.task, step, 7])
        out = []
        for k, r in enumerate(rows):
            if len(r) == 0:
                continue
            counts = self._tokens[k].counts(r)
            if (counts == 0).any():
                raise DataError(f"mixture source '{SOURCES[k]}': row {int(r[counts == 0][0])} has no caption")
            out.append(self._tokens[k].pick(r, (rng.random(len(r)) * counts).astype(np.int64)))
        return np.concatenate(out)
