"""The P/D/B mixture: every training batch holds fixed numbers of pool, update and buffer samples (DESIGN §1).

``mixture_sizes`` is the reference arithmetic (FiF, Roth, Udandarao et al. 2024): ``b_k = int(b * lambda_k)``,
the remainder handed out +1 each in the order P, D, B; while the buffer is empty (task 0) its share is split,
``div = 1 + [b_P > 0]``, D getting ``b_B//div + b_B%div`` more and P ``b_B//div`` more.

``MixedBatches`` yields one mixed batch per step. Each source cycles its rows endlessly, a fresh seeded
permutation per pass, so the rows of step k are a pure function of ``(seed, task, k)``; the caption of each row
and the random crops are seeded the same way. Starting at ``start_step=k`` therefore gives bit-for-bit the batches
an uninterrupted iterator yields from step k on (exact resume). Pool rows index the pool split, update and buffer
rows the train split; both are index sets over the betons, never copies.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .augment import CLIP_MEAN, CLIP_STD, generator_for, train_transform
from .format import Benchmark, DataError
from .loaders import BACKENDS, check_rows, decode_size, decoded_split, ffcv_available, ffcv_batches

SOURCES = ("pool", "update", "buffer")  # "source" ids 0 = P, 1 = D, 2 = B
_CHUNK_BYTES = 64 << 20                 # decoded uint8 images fetched per FFCV pass
_MIXTURE_STREAM = 1                     # domain tag keeping mixture seeds apart from loader seeds
_FETCH_BATCH = 256                      # rows per FFCV batch when fetching mixture images


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


class MixedBatches:
    """Endless iterator of mixed batches ``{"images", "texts", "source", "rows", "step"}`` for one task.

    ``images``: normalised float32 ``[b, 3, S, S]`` (CLIP RandomResizedCrop seeded per step); ``texts``: one
    caption per row, chosen by a seeded RNG; ``source``: LongTensor of 0 (P), 1 (D), 2 (B), in that order;
    ``rows``: row ids within each source's split. ``pool_bench`` serves the pool when it lives elsewhere.
    """

    def __init__(self, bench: Benchmark, pool_rows: np.ndarray | None, update_rows: np.ndarray,
                 buffer_rows: np.ndarray | None, sizes: Sequence[int], seed: int, task: int, start_step: int = 0, *,
                 backend: str = "ffcv", image_size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, num_workers: int = 2, pool_bench: Benchmark | None = None):
        if backend not in BACKENDS:
            raise DataError(f"unknown loader backend {backend!r}; valid: {list(BACKENDS)}")
        if backend == "ffcv" and not ffcv_available():
            raise DataError("loader backend 'ffcv' needs the ffcv package; install it or use data.loader=memory")
        if len(sizes) != 3 or any(int(s) < 0 for s in sizes) or sum(int(s) for s in sizes) < 1:
            raise DataError(f"mixture sizes must be 3 non-negative ints with a positive sum, got {list(sizes)}")
        if int(start_step) < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        self.bench, self.pool_bench = bench, pool_bench or bench
        self.sizes = tuple(int(s) for s in sizes)
        self.seed, self.task, self.start_step = int(seed), int(task), int(start_step)
        self.backend, self.image_size, self.num_workers = backend, int(image_size), int(num_workers)
        self.mean, self.std = tuple(mean), tuple(std)
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
        self._paths = [b.split_path(s) if n > 0 else None for b, s, n in zip(benches, splits, self.sizes)]
        self._captions = [benches[k].captions(splits[k]) if self.sizes[k] > 0 else None for k in range(3)]
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
        per_step = max(1, self.batch_size * self.image_size * self.image_size * 3)
        chunk = int(np.clip(_CHUNK_BYTES // per_step, 1, 64))
        while True:
            steps = list(range(step, step + chunk))
            yield from self._assemble(steps, self._fetch(steps))
            step += chunk

    def batch(self, step: int) -> dict:
        """The batch of one ``step`` (random access; decodes only that step)."""
        return next(self._assemble([step], self._fetch([step])))

    # ------------------------------------------------------------------------------------------- internals
    def _fetch(self, steps: list[int]) -> tuple[list[list[np.ndarray]], list[list[torch.Tensor]]]:
        """Rows and uint8 images of every source for ``steps``: P from its split, D and B together from train."""
        plan = [self.rows_at(s) for s in steps]
        images: list[list[torch.Tensor]] = [[] for _ in steps]
        groups = [(0,), (1, 2)]  # sources sharing a file are decoded in one pass
        for group in groups:
            n = sum(self.sizes[k] for k in group)
            if n == 0:
                continue
            path = self._paths[group[0]] or self._paths[group[-1]]
            wanted = [np.concatenate([plan[i][k] for k in group]) for i in range(len(steps))]
            for i, imgs in enumerate(self._decode(path, wanted, n)):
                images[i].append(imgs)
        return plan, images

    def _decode(self, path, wanted: list[np.ndarray], batch: int) -> Iterator[torch.Tensor]:
        size = decode_size(path, self.image_size)
        if self.backend == "memory":
            cache = decoded_split(path, size, self.num_workers)
            yield from (cache[torch.from_numpy(w)] for w in wanted)
            return
        # One sequential FFCV pass over the planned rows (duplicates allowed), fully consumed before yielding so
        # no two FFCV iterators ever run at once. FFCV's batch size is fixed (not the step's), so one compiled
        # loader per file serves every task whatever its mixture sizes.
        flat = np.concatenate(wanted)
        got = list(ffcv_batches(path, flat, _FETCH_BATCH, order="sequential", size=size,
                                num_workers=self.num_workers))
        rows = torch.cat([r for _, r in got]).numpy()
        if not np.array_equal(rows, flat):
            raise DataError(f"FFCV returned rows out of the requested order from {path}")
        yield from torch.cat([im for im, _ in got]).split(batch)

    def _assemble(self, steps: list[int], fetched) -> Iterator[dict]:
        plan, images = fetched
        for i, step in enumerate(steps):
            gen = generator_for(self.seed, self.task, step, _MIXTURE_STREAM)
            parts = []
            for imgs in images[i]:  # P, then D+B: crops drawn in that order from one generator
                parts.append(train_transform(imgs, self.image_size, gen, self.mean, self.std))
            rows = [plan[i][k] for k in range(3)]
            yield {"images": torch.cat(parts), "texts": self._texts(step, rows),
                   "source": torch.cat([torch.full((len(r),), k, dtype=torch.long) for k, r in enumerate(rows)]),
                   "rows": torch.from_numpy(np.concatenate(rows).astype(np.int64)), "step": step}

    def _texts(self, step: int, rows: list[np.ndarray]) -> list[str]:
        rng = np.random.default_rng([self.seed % (1 << 63), self.task, step, 7])
        out = []
        for k, r in enumerate(rows):
            if len(r) == 0:
                continue
            caps = self._captions[k]
            counts = np.array([len(caps[j]) for j in r])
            if (counts == 0).any():
                raise DataError(f"mixture source '{SOURCES[k]}': row {int(r[counts == 0][0])} has no caption")
            pick = (rng.random(len(r)) * counts).astype(np.int64)
            out += [caps[j][p] for j, p in zip(r.tolist(), pick.tolist())]
        return out
