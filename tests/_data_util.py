"""Shared helpers of the tests: small FiF-mini builds (cached per pytest process), the tiniest run and sweep configs on
them, and a toy benchmark. Plain functions (not fixtures): spawned ranks and the cluster scenario scripts import them
too."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SCALE = 0.05  # ~1,000 pool images and 2-3 images per class: builds in seconds
BUDGET_CACHE_ENV = "FOMO_RAY_TEST_BUDGET_CACHE"  # the session's shared budget cache (tests/conftest.py)
_BUILT: dict[tuple[int, int], object] = {}


def small_fifmini(tmp_path_factory, seed: int = 0, image_size: int = 32):
    """A small FiF-mini, built once per (seed, image_size) per test session."""
    from fomo_ray.prep.fifmini import ensure_fifmini

    key = (seed, image_size)
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"fifmini_s{seed}_{image_size}")
        _BUILT[key] = ensure_fifmini(root, seed=seed, image_size=image_size, scale=SCALE, progress=False)
    return _BUILT[key]


def tiny_run(root, out, **overrides) -> dict:
    """The tiniest in-process run of the real loop, as config overrides: random-init fomo-tiny-s on the FiF-mini at
    ``root`` (as built, in memory), 2 tasks x 2 steps at batch 8, a few evaluation rows per dataset and no full test
    sets, no MLflow; writes under ``out`` (``runs/``, ``budget/``). Dotted keys change it:
    ``tiny_run(root, out, **{"method.name": "ewc"})``."""
    out = Path(out)
    return {"data.root": str(root), "data.prepare_if_missing": False, "data.loader": "memory",
            "backbone.pretrained": "",  # random init: the cached pretrained base takes minutes to train
            "stream.num_tasks": 2, "budget.mode": "equal_steps", "budget.total_ft_steps": 4,
            "budget.cache_dir": str(out / "budget"), "mixture.batch_size": 8,
            "evaluation.subset_min": 2, "evaluation.subset_fraction": 0.01, "evaluation.full_at_ends": False,
            "output_dir": str(out / "runs"), "tracking.enabled": False, **overrides}


#: per method, overrides for tests whose subject is not the method's own optimisation: DOP's default 200 Adam steps
#: per matrix take ~15 s per merge on fomo-tiny-s (tests/test_method_params.py runs the defaults,
#: tests/test_continual_merge.py DOP's optimisation)
FEW_DOP_STEPS = {"dop_merge": {"method.merge.dop_steps": 5}}


def tiny_config(root, out, **overrides):
    """``tiny_run`` as an ExperimentConfig."""
    from fomo_ray.config import load_config

    return load_config(None, tiny_run(root, out, **overrides))


def budget_cache(root) -> str:
    """The ``budget.cache_dir`` the tests' sweeps share: one for the whole session (both pytest-xdist workers and
    every scenario script they start; ``tests/conftest.py`` names it in ``FOMO_RAY_TEST_BUDGET_CACHE``), else beside
    the benchmark at ``root``. Step speeds and a trial's fixed costs are facts of this machine, not of a test: each
    is measured once, not once per sweep (timing a trial's start alone spawns an interpreter that imports torch, Ray
    and MLflow). Tests of the measurement itself keep a cache of their own."""
    return os.environ.get(BUDGET_CACHE_ENV) or str(Path(root).parent / "budget_cache")


def tiny_sweep(root, out, **overrides) -> dict:
    """The base of the tiniest real sweep, as config overrides: random-init fomo-tiny-s on the FiF-mini at ``root``
    (real FFCV loaders, one loader worker), 2 tasks x 8 fine-tuning steps at batch 16 (each method's steps from the
    budget), 20 evaluation rows per dataset, one CPU per trial, MLflow on; writes under ``out`` (its
    ``output_dir``), measures into the shared :func:`budget_cache`."""
    return {"output_dir": str(out), "data.root": str(root), "data.scale": SCALE, "backbone.pretrained": "",
            "stream.num_tasks": 2, "budget.total_ft_steps": 8, "mixture.batch_size": 16, "evaluation.subset_min": 20,
            "data.num_workers": 1, "budget.cache_dir": budget_cache(root), "ray.cpus_per_worker": 1.0,
            **overrides}


def toy_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_toy(root: Path, images: np.ndarray, finish: bool = True):
    """A 3-dataset benchmark: 12 pool rows, 8 train rows of A (2 classes), 6 test rows of A then 6 of E."""
    from fomo_ray.data.format import DatasetInfo
    from fomo_ray.data.writer import BenchmarkWriter

    w = BenchmarkWriter(root, "toy", images.shape[1])
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    w.add_dataset(DatasetInfo("A", "adapt", "classification", ("cat", "dog"), "a photo of a {}."))
    w.add_dataset(DatasetInfo("E", "eval", "classification", ("red", "blue", "green"), "something {}."))
    w.write_split("pool", [(images[i], "POOL", -1, [f"pool {i}", f"alt {i}"]) for i in range(12)])
    w.write_split("train", [(images[12 + i], "A", i % 2, [f"a {i}"]) for i in range(8)])
    w.write_split("test", [(images[20 + i], "A" if i < 6 else "E", i % 2 if i < 6 else i % 3, [])
                           for i in range(12)])
    w.add_stream("random", ["A+++dog", "A+++cat"])
    return w.finish() if finish else w
