"""Replay buffers B over train-split row ids (index sets; the images stay in ``train.beton``).

- ``unbounded`` (the FiF reference): the union of all training samples of tasks 0..t-1; ``MixedBatches`` samples
  it uniformly (a fresh seeded permutation per pass).
- ``reservoir``: a fixed-size uniform sample of every row ever added, Vitter's Algorithm R (J. S. Vitter, "Random
  Sampling with a Reservoir", ACM TOMS 1985): the i-th item (0-based) fills a free slot, or replaces slot
  ``j ~ U{0..i}`` when ``j < size``. Seeded; its RNG state is part of ``state_dict`` so a resumed run continues the
  same sample.

- ``cumulative_exp`` / ``cumulative_equal``: TiC-CLIP's bounded cumulative buffers (Garg et al. 2024, "TiC-CLIP:
  Continual Training of CLIP Models", arXiv 2310.16226, Sec. 3): at most ``size`` rows over the T past tasks, task
  shares from :func:`cumulative_shares` (Cumulative-Exp: the newest past task half, the one before a quarter, ...,
  the oldest what is left; Cumulative-Equal: ``size / T`` each). Each ``add`` is one task; a task keeps a prefix of
  a seeded permutation of its rows, cut to its share as the buffer fills, so shares only shrink and a row once
  dropped never comes back (a bounded buffer cannot recover it).

All keep plain-Python ``state_dict``s (lists and ints) that ``torch.save`` and JSON both accept.
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


def cumulative_shares(size: int, num_tasks: int, rule: str) -> list[int]:
    """Rows of a ``size``-row buffer per past task, oldest first, for ``rule`` "exp" or "equal" (TiC-CLIP).

    "exp": the task j places from the newest (j = 0 newest) gets ``size / 2^(j+1)``, the oldest the same as the one
    after it, so the fractions sum to 1 (one task: all of it). "equal": ``size / T`` each. Fractional rows are
    rounded down and the rows left over go one each to the tasks with the largest fractional parts, newer first on
    ties, so the counts sum to ``size``."""
    if num_tasks <= 0:
        return []
    if rule == "equal":
        fractions = [1.0 / num_tasks] * num_tasks
    elif rule == "exp":
        fractions = [2.0 ** -(num_tasks - i) for i in range(num_tasks)]  # oldest first: ..., 1/4, 1/2
        fractions[0] = fractions[1] if num_tasks > 1 else 1.0
    else:
        raise DataError(f"unknown cumulative rule {rule!r}; valid: exp, equal")
    exact = [size * f for f in fractions]
    counts = [int(x) for x in exact]
    order = sorted(range(num_tasks), key=lambda i: (-(exact[i] - counts[i]), -i))
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


class CumulativeBuffer:
    """TiC-CLIP's bounded cumulative replay: per past task a seeded subset, cut to its share of ``size`` rows."""

    rule = "exp"

    def __init__(self, size: int, seed: int = 0):
        if isinstance(size, bool) or int(size) < 1:
            raise DataError(f"{self.policy} buffer size must be >= 1, got {size}")
        self.size, self.seed = int(size), int(seed)
        self._tasks: list[np.ndarray] = []  # per task, oldest first: its kept rows in its permutation's order

    @property
    def policy(self) -> str:
        return f"cumulative_{self.rule}"

    def add(self, rows: Any) -> None:
        rows = np.unique(_as_rows(rows))
        # one generator per task from (seed, task index): the same subset whatever came before
        rng = np.random.default_rng([self.seed % (1 << 63), len(self._tasks)])
        self._tasks.append(rows[rng.permutation(len(rows))])
        shares = cumulative_shares(self.size, len(self._tasks), self.rule)
        self._tasks = [kept[:share] for kept, share in zip(self._tasks, shares)]

    def rows(self) -> np.ndarray:
        return np.sort(np.concatenate(self._tasks)) if self._tasks else np.zeros(0, np.int64)

    def task_rows(self) -> list[np.ndarray]:
        """The rows each past task keeps, oldest first."""
        return [kept.copy() for kept in self._tasks]

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._tasks)

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "size": self.size, "seed": self.seed,
                "tasks": [kept.tolist() for kept in self._tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_policy(state, self.policy)
        if int(state["size"]) != self.size:
            raise DataError(f"{self.policy} buffer state has size {state['size']}, this buffer {self.size}")
        self.seed = int(state["seed"])
        self._tasks = [_as_rows(kept) for kept in state["tasks"]]


class CumulativeExpBuffer(CumulativeBuffer):
    """Cumulative-Exp: exponentially decaying shares, the newest past task keeping half."""

    rule = "exp"


class CumulativeEqualBuffer(CumulativeBuffer):
    """Cumulative-Equal: equal shares of the buffer for every past task."""

    rule = "equal"


def _check_policy(state: dict[str, Any], policy: str) -> None:
    if state.get("policy") != policy:
        raise DataError(f"buffer state is for policy {state.get('policy')!r}, not {policy!r}")


BUFFERS: dict[str, type] = {"unbounded": UnboundedBuffer, "reservoir": ReservoirBuffer,
                            "cumulative_exp": CumulativeExpBuffer, "cumulative_equal": CumulativeEqualBuffer}


def make_buffer(policy: str, size: int, seed: int):
    """A replay buffer by name (``BUFFERS``); ``size`` is ignored by ``unbounded``."""
    if policy not in BUFFERS:
        raise DataError(f"unknown buffer policy {policy!r}; valid: {list(BUFFERS)}")
    return BUFFERS[policy](size, seed)
