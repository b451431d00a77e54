"""Replay buffers B over train-split row ids (index sets; the images stay in ``train.beton``).

- ``unbounded`` (the FiF reference): the union of all training samples of tasks 0..t-1; ``MixedBatches`` samples
  it uniformly (a fresh seeded permutation per pass).
- ``reservoir``: a fixed-size uniform sample of every row ever added, Vitter's Algorithm R (J. S. Vitter, "Random
  Sampling with a Reservoir", ACM TOMS 1985): the i-th item (0-based) fills a free slot, or replaces slot
  ``j ~ U{0..i}`` when ``j < size``. Seeded; its RNG state is part of ``state_dict`` so a resumed run continues the
  same sample.

Both keep plain-Python ``state_dict``s (lists and ints) that ``torch.save`` and JSON both accept.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .format import DataError


def _as_rows(rows: Any) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 1 or (len(arr) and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"buffer rows must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if len(arr) and arr.min() < 0:
        raise DataError(f"buffer rows must be >= 0, got {int(arr.min())}")
    return arr.astype(np.int64)


class UnboundedBuffer:
    """Every row ever added (deduplicated, sorted)."""

    policy = "unbounded"

    def __init__(self, size: int = 0, seed: int = 0):
        self._rows = np.zeros(0, np.int64)

    def add(self, rows: Any) -> None:
        self._rows = np.union1d(self._rows, _as_rows(rows))

    def rows(self) -> np.ndarray:
        return self._rows.copy()

    def __len__(self) -> int:
        return len(self._rows)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "rows": self._rows.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_policy(state, self.policy)
        self._rows = np.unique(_as_rows(state["rows"]))


class ReservoirBuffer:
    """A uniform sample of at most ``size`` rows of everything added (Algorithm R)."""

    policy = "reservoir"

    def __init__(self, size: int, seed: int = 0):
        if isinstance(size, bool) or int(size) < 1:
            raise DataError(f"reservoir buffer size must be >= 1, got {size}")
        self.size, self.seed = int(size), int(seed)
        self._slots = np.zeros(0, np.int64)
        self._seen = 0
        self._rng = np.random.default_rng(self.seed % (1 << 63))

    def add(self, rows: Any) -> None:
        rows = _as_rows(rows)
        free = max(0, min(self.size - len(self._slots), len(rows)))
        self._slots = np.concatenate([self._slots, rows[:free]])  # filling phase: no random draw
        rest = rows[free:]
        if len(rest):
            # item i (global 0-based index seen+free+m) replaces slot j ~ U{0..i} if j < size; drawn in item order
            highs = self._seen + free + np.arange(len(rest)) + 1
            j = self._rng.integers(0, highs)
            hit = np.flatnonzero(j < self.size)
            # apply in order: for a slot hit several times the last item wins
            last = {int(j[h]): int(rest[h]) for h in hit}
            if last:
                self._slots[list(last)] = list(last.values())
        self._seen += len(rows)

    def rows(self) -> np.ndarray:
        return self._slots.copy()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def seen(self) -> int:
        return self._seen

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "size": self.size, "seed": self.seed, "slots": self._slots.tolist(),
                "seen": self._seen, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_policy(state, self.policy)
        if int(state["size"]) != self.size:
            raise DataError(f"reservoir buffer state has size {state['size']}, this buffer {self.size}")
        self.seed, self._seen = int(state["seed"]), int(state["seen"])
        self._slots = _as_rows(state["slots"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]


def _check_policy(state: dict[str, Any], policy: str) -> None:
    if state.get("policy") != policy:
        raise DataError(f"buffer state is for policy {state.get('policy')!r}, not {policy!r}")


BUFFERS: dict[str, type] = {"unbounded": UnboundedBuffer, "reservoir": ReservoirBuffer}


def make_buffer(policy: str, size: int, seed: int):
    """A replay buffer by name (``BUFFERS``); ``size`` is ignored by ``unbounded``."""
    if policy not in BUFFERS:
        raise DataError(f"unknown buffer policy {policy!r}; valid: {list(BUFFERS)}")
    return BUFFERS[policy](size, seed)
