"""Seeds and RNG state: every random stream of a run derives from ``(experiment seed, purpose, task index)``.

The reference code seeded tasks independently of the experiment seed, so two "seeds" shared their data order
(docs/BENCHMARK.md §Reference faults).
Here :func:`derive_seed` hashes the experiment seed together with named keys: changing the experiment seed changes
every task's stream, and a task's stream does not depend on how many other streams were drawn before it (which is
what makes a mid-stream resume reproduce the uninterrupted run).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping

import numpy as np
import torch

#: derived seeds stay below 2**31 so every consumer accepts them (numpy's legacy seeding, python, torch, FFCV)
SEED_RANGE = 2**31 - 1


def derive_seed(seed: int, *keys: int | str) -> int:
    """A stable seed for ``keys`` under experiment ``seed`` (sha256, so independent of PYTHONHASHSEED)."""
    blob = "/".join([str(int(seed))] + [str(k) for k in keys]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") % SEED_RANGE


def task_seed(seed: int, task: int, purpose: str = "train") -> int:
    """The seed of task ``task``'s ``purpose`` stream (e.g. its batches) under experiment ``seed``."""
    return derive_seed(seed, purpose, int(task))


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's global and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states as plain data and tensors (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].copy()),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
