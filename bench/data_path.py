"""What the loop consumes, old data path against new, side by side in one run (issue 11).

Measures the mixed pool/update/buffer batches exactly as ``run_stream`` gets them, at two settings:

- ``224``: the paper's setting, b = 512 at 224 px, on a synthetic JPEG benchmark stored as ``fomo-ray prepare fif``
  stores real FiF data (224 x 224 JPEG, quality 90), built once under ``data/bench/data_path_224_v2``;
- ``32``: the embedded default, b = 64 at 32 px, on FiF-mini (``data/fifmini``).

Old path: the code at ``--baseline`` (default: the last commit before the new path), checked out with ``git
archive`` into a temp directory and imported from there: FFCV decodes, the crop and normalisation run in float32
with ``grid_sample``, and the caption strings are tokenised per step (the loop did that on the training thread, so
it is counted). New path: this checkout's ``MixedBatches`` (compiled decode + crop to uint8, stored token ids;
normalisation happens on the device and is not host work).

Each measurement runs in its own process (numba and torch limited to ``--threads``), old and new alternate,
``--repeats`` times, and the median is reported. Loader peak host memory: the process's high-water RSS over the
timed steps (reset after the warm-up, so numba's and FFCV's one-time compilation is reported separately) minus its
RSS before the loader was built. With ``--threads 1`` the figures are images/s per CPU
core. Also measured: the new path's per-rank data time with 2 data-parallel ranks (shard 0 of 2) against one.
From Tab. 4's 63,395 GFLOP per ViT-B/16 step at b = 512 it derives the samples/s one H100 consumes at 40% MFU
(``--peak-tflops``, default 790 as in the issue; 989 for an H100 SXM's dense bf16 peak) and the CPU cores that
takes. Usage::

    python bench/data_path.py [--settings 224 32] [--steps 6] [--threads 1] [--repeats 3] [--baseline REF]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE = "8cdec44"  # the data path before issue 11
SETTINGS = {"224": dict(image_size=224, batch=512, ctx=77), "32": dict(image_size=32, batch=64, ctx=32)}
VIT_B16_GFLOP_PER_STEP = 63_395  # Tab. 4, b = 512
H100_BF16_TFLOPS, MFU = 790.0, 0.4  # the figures: 40% of 790 TFLOP/s -> ~2,550 samples/s


# --------------------------------------------------------------------------------------------------- data
def build_224(root: Path, n_pool: int = 1536, n_train: int = 1536) -> Path:
    """A synthetic JPEG benchmark at 224 x 224 (smooth shapes plus grain, so JPEG sizes are photo-like)."""
    from PIL import Image

    from fomo_ray.data.format import DatasetInfo, open_benchmark
    from fomo_ray.data.writer import BenchmarkWriter

    try:
        return open_benchmark(root).root
    except Exception:  # noqa: BLE001 - missing or partial: build it
        pass
    rng = np.random.default_rng(0)

    def image(i: int) -> np.ndarray:
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(low).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.int16)
        return np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)

    classes = tuple(f"class {k}" for k in range(16))
    w = BenchmarkWriter(root, "data_path_224", 224, write_mode="jpg", jpeg_quality=90)
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    w.add_dataset(DatasetInfo("A", "adapt", "classification", classes, "a photo of a {}."))
    w.write_split("pool", ((image(i), "POOL", -1, [f"a web caption number {i} about a scene", f"alt text {i}"])
                           for i in range(n_pool)))
    w.write_split("train", ((image(i), "A", i % 16, [f"a photo of a class {i % 16}."]) for i in range(n_train)))
    w.write_split("test", ((image(i), "A", i % 16, []) for i in range(16)))
    w.add_stream("random", [f"A+++{c}" for c in classes])
    return w.finish().root


def with_tokens(root: Path, ctx: int) -> None:
    import open_clip

    from fomo_ray.data.tokens import add_tokens

    add_tokens(root, open_clip.get_tokenizer("ViT-B-16", context_length=ctx), ctx)


def baseline_tree(ref: str) -> Path:
    out = Path(tempfile.gettempdir()) / f"fomo_ray_baseline_{ref}"
    if not (out / "fomo_ray" / "__init__.py").is_file():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "fomo_ray"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


# --------------------------------------------------------------------------------------------------- worker
def worker(a: argparse.Namespace) -> dict:
    """One measurement in this process: ``steps`` batches after ``warmup`` (numba/FFCV compilation)."""
    import open_clip
    import torch

    torch.set_num_threads(a.threads)
    from fomo_ray.data.format import open_benchmark
    from fomo_ray.data.mixture import MixedBatches, mixture_sizes

    bench = open_benchmark(a.root)
    train = np.arange(bench.num_rows("train"))
    sizes = mixture_sizes(a.batch, (0.33, 0.34, 0.33), False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=a.ctx)
    common = dict(bench=bench, pool_rows=None, update_rows=train[: len(train) // 2],
                  buffer_rows=train[len(train) // 2:], sizes=sizes, seed=0, task=1, backend="ffcv",
                  image_size=a.image_size, num_workers=a.threads)
    rss0 = _status_mb()
    if a.path == "old":
        it = iter(MixedBatches(**common))
        step = lambda: tokenizer(list(next(it)["texts"]))  # noqa: E731 - the old loop tokenised per step
    else:
        from fomo_ray.data.tokens import tokenizer_key

        mixed = MixedBatches(**common, token_key=tokenizer_key(tokenizer, a.ctx), shard=(0, a.world))
        counter = iter(range(10 ** 9))
        step = lambda: mixed.batch(next(counter))  # noqa: E731
    for _ in range(a.warmup):
        step()
    compiled_peak = _status_mb("VmHWM")
    _reset_peak()  # the timed steps' own high-water mark, without numba's/FFCV's one-time compilation
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    seconds = (time.perf_counter() - t0) / a.steps
    return {"s_per_step": seconds, "images_per_s": a.batch / a.world / seconds,
            "loader_peak_mb": _status_mb("VmHWM") - rss0, "with_compile_mb": max(compiled_peak, 0) - rss0}


def _status_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def measure(path: str, setting: dict, root: Path, a: argparse.Namespace, world: int = 1) -> dict:
    tree = baseline_tree(a.baseline) if path == "old" else REPO
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_NUM_THREADS": str(a.threads), "OMP_NUM_THREADS":
           str(a.threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", "--path", path, "--root", str(root), "--threads", str(a.threads),
           "--image-size", str(setting["image_size"]), "--batch", str(setting["batch"]), "--ctx", str(setting["ctx"]),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--world", str(world)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise RuntimeError(f"{path} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["224", "32"], choices=sorted(SETTINGS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per measurement (1 = per-core figures)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=BASELINE, help="git ref of the old data path")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="accelerator bf16 peak, TFLOP/s")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("path", str), ("root", str), ("image-size", int), ("batch", int), ("ctx", int),
                       ("world", int)):
        p.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    sys.path.insert(0, str(REPO))
    from fomo_ray.prep.fifmini import ensure_fifmini

    roots = {"224": build_224(REPO / "data" / "bench" / "data_path_224_v2"),
             "32": ensure_fifmini(REPO / "data" / "fifmini").root}  # the main job's benchmark
    print(f"data path: threads={a.threads}, steps={a.steps} (+{a.warmup} warm-up), repeats={a.repeats}, "
          f"baseline {a.baseline}; {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    for name in a.settings:
        setting, root = SETTINGS[name], roots[name]
        with_tokens(root, setting["ctx"])
        runs = {"old": [], "new": [], "new_shard": []}
        for _ in range(a.repeats):  # alternate, so drifting machine load hits both paths alike
            runs["old"].append(measure("old", setting, root, a))
            runs["new"].append(measure("new", setting, root, a))
            runs["new_shard"].append(measure("new", setting, root, a, world=2))
        old, new = median(runs["old"], "images_per_s"), median(runs["new"], "images_per_s")
        one, half = median(runs["new"], "s_per_step"), median(runs["new_shard"], "s_per_step")
        print(f"\n{setting['image_size']} px, b = {setting['batch']}:")
        for path, rate in (("old", old), ("new", new)):
            print(f"  {path} path  {rate:9.1f} images/s per {a.threads} core(s); loader peak host memory "
                  f"{median(runs[path], 'loader_peak_mb'):.0f} MB while stepping "
                  f"({median(runs[path], 'with_compile_mb'):.0f} MB incl. one-time compilation)")
        print(f"  new / old {new / old:9.2f}x")
        print(f"  data time per step, 1 rank {one * 1e3:.1f} ms, rank 0 of 2 {half * 1e3:.1f} ms "
              f"(ratio {half / one:.2f})")
        if name == "224":
            need = a.peak_tflops * 1e3 * MFU / (VIT_B16_GFLOP_PER_STEP / 512)
            print(f"  one H100 at {MFU:.0%} MFU trains {need:,.0f} samples/s -> {need / (new / a.threads):.1f} cores "
                  f"of the new path feed it (old path: {need / (old / a.threads):.1f})")


if __name__ == "__main__":
    main()
