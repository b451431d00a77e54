"""Shared helpers of the data tests: small FiF-mini builds (cached per pytest process) and a toy benchmark."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SCALE = 0.05  # ~1,000 pool images and 2-3 images per class: builds in seconds
_BUILT: dict[tuple[int, int], object] = {}


def small_fifmini(tmp_path_factory, seed: int = 0, image_size: int = 32):
    """A small FiF-mini, built once per (seed, image_size) per test session."""
    from fomo_ray.prep.fifmini import ensure_fifmini

    key = (seed, image_size)
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"fifmini_s{seed}_{image_size}")
        _BUILT[key] = ensure_fifmini(root, seed=seed, image_size=image_size, scale=SCALE, progress=False)
    return _BUILT[key]


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
