"""Training-loader throughput: FFCV vs a plain torch DataLoader over the same images as PNG files.

Both sides serve the same N pool images of FiF-mini with the same batch size, worker count and augmentation
(CLIP RandomResizedCrop scale 0.9-1.0, bicubic, + CLIP normalisation) and drop the last partial batch:

- ffcv:  ``fomo_ray.data.loaders.make_loader(backend="ffcv", train=True)``: the beton memory-mapped, the compiled
  decode + seeded crop stage to uint8 (numba threads), then ``model_input`` normalises on the host here (a run does
  that on its device), so both sides do the same work;
- torch: ``torch.utils.data.DataLoader`` (worker processes, shuffle) over a Dataset that opens each PNG with PIL
  and applies ``torchvision.transforms`` per image.

One warm-up epoch each (FFCV compiles its pipeline; DataLoader forks its workers), then ``--epochs`` timed
epochs. Prints images/s of each and their ratio from this one run. Usage::

    python bench/loader_throughput.py [--root data/fifmini] [--images 10000] [--batch-size 256] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def export_png(bench, rows: np.ndarray, out: Path) -> list[Path]:
    """Write the rows' images as PNG files once (a ``.complete`` marker makes reruns skip it)."""
    from fomo_ray.data.format import read_images

    paths = [out / f"{int(r):06d}.png" for r in rows]
    marker = out / f".complete-{bench.content_hash[:12]}-{len(rows)}"
    if marker.is_file():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    images = read_images(bench.split_path("pool"), rows)
    for im, p in zip(images, paths):
        Image.fromarray(im).save(p)
    marker.touch()
    return paths


class PngDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], image_size: int):
        import torchvision.transforms as T

        from fomo_ray.data.augment import CLIP_MEAN, CLIP_STD, RRC_SCALE

        self.paths = paths
        self.transform = T.Compose([
            T.RandomResizedCrop(image_size, scale=RRC_SCALE, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), i


class Normalised:
    """Each epoch of ``loader`` with its uint8 images converted and normalised on the host, as torchvision does."""

    def __init__(self, loader, size: int):
        self.loader, self.size = loader, size

    def __iter__(self):
        from fomo_ray.data.augment import model_input

        return ((model_input(images, self.size), rows) for images, rows in self.loader)


def time_epochs(loader, epochs: int) -> tuple[float, float, int]:
    """(warm-up seconds, timed seconds, images in the timed epochs)."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _rows in loader:
            n += images.shape[0]
    return warm, time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/fifmini", help="FiF-mini root (built if missing)")
    p.add_argument("--png-dir", default=None, help="where the PNG copies go (default: <root>_png)")
    p.add_argument("--images", type=int, default=10000, help="pool images served per epoch")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="FFCV threads / DataLoader worker processes")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    a = p.parse_args(argv)

    from fomo_ray.prep.fifmini import ensure_fifmini
    from fomo_ray.data.loaders import make_loader

    bench = ensure_fifmini(a.root)
    rows = np.arange(min(a.images, bench.num_rows("pool")))
    size = bench.image_size
    paths = export_png(bench, rows, Path(a.png_dir or f"{a.root.rstrip('/')}_png"))
    torch.set_num_threads(max(1, a.workers))

    ffcv = make_loader(bench, "pool", rows, a.batch_size, train=True, seed=0, image_size=size, backend="ffcv",
                       num_workers=a.workers)
    f_warm, f_time, f_n = time_epochs(Normalised(ffcv, size), a.epochs)
    dl = torch.utils.data.DataLoader(PngDataset(paths, size), batch_size=a.batch_size, shuffle=True,
                                     num_workers=a.workers, drop_last=True, persistent_workers=a.workers > 0,
                                     generator=torch.Generator().manual_seed(0))
    t_warm, t_time, t_n = time_epochs(dl, a.epochs)

    f_rate, t_rate = f_n / f_time, t_n / t_time
    print(f"images={len(rows)} size={size}px batch={a.batch_size} workers={a.workers} epochs={a.epochs} "
          f"cpus={os.cpu_count()}")
    print(f"ffcv  (beton + compiled crop stage):      {f_rate:10.0f} images/s   (warm-up epoch {f_warm:.2f} s)")
    print(f"torch (PNG + PIL + torchvision, workers): {t_rate:10.0f} images/s   (warm-up epoch {t_warm:.2f} s)")
    print(f"ratio ffcv / torch: {f_rate / t_rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
