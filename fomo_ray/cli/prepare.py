"""``fomo-ray prepare``: build the embedded FiF-mini benchmark, convert real data, write stream files.

    fomo-ray prepare fifmini [--root data/fifmini] [--seed 0] [--image-size 32] [--scale 1] [--force]
    fomo-ray prepare fif ...      convert the real FoMo-in-Flux data   (fomo_ray.data.convert_fif)
    fomo-ray prepare pool ...     convert web image-text shards to P  (fomo_ray.data.convert_webdataset)
    fomo-ray prepare stream ...   write a stream ordering file        (fomo_ray.data.orderings)

Each target forwards its arguments to the ``main(argv)`` of the module that owns it, imported only when used.
"""
from __future__ import annotations

import argparse
import sys
import time

TARGETS: dict[str, tuple[str, str]] = {
    "fifmini": ("fomo_ray.prepare:fifmini_main", "build (or reuse) the embedded FiF-mini benchmark"),
    # ---- dispatch slots: these modules belong to the data-conversion work, not to this file ----
    "fif": ("fomo_ray.data.convert_fif:main", "convert the real FoMo-in-Flux datasets to FFCV"),
    "pool": ("fomo_ray.data.convert_webdataset:main", "convert webdataset image-text shards into a pool P"),
    "stream": ("fomo_ray.data.orderings:main", "write a FiF stream file for an ordering (random, similarity, ...)"),
}


def fifmini_main(argv: list[str] | None = None) -> int:
    """``fomo-ray prepare fifmini``: build FiF-mini unless a matching build exists; print its dataset table."""
    from fomo_ray.data.fifmini import describe, ensure_fifmini, format_table
    from fomo_ray.data.format import DataError

    p = argparse.ArgumentParser(prog="fomo-ray prepare fifmini",
                                description="Build the embedded FiF-mini benchmark (deterministic, offline).")
    p.add_argument("--root", default="data/fifmini", help="output directory (default: data/fifmini)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: 32)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every dataset by this factor (default: 1)")
    p.add_argument("--workers", type=int, default=None, help="processes drawing the pool (default: up to 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        bench = ensure_fifmini(a.root, a.seed, a.image_size, a.force, a.scale, a.workers)
    except DataError as e:
        print(f"fomo-ray prepare fifmini: {e}", file=sys.stderr)
        return 1
    print(format_table(describe(bench)))
    print(f"FiF-mini ready at {bench.root} (content hash {bench.content_hash[:16]}..., {time.time() - t0:.1f} s)")
    return 0


def _usage() -> str:
    lines = ["usage: fomo-ray prepare <target> [args...]", "", "targets:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in TARGETS.items()]
    return "\n".join(lines + ["", "Run 'fomo-ray prepare <target> --help' for a target's options."])


def main(argv: list[str] | None = None) -> int:
    from fomo_ray.cli import dispatch

    return dispatch("fomo-ray prepare", "target", TARGETS, _usage(), argv)


if __name__ == "__main__":
    sys.exit(main())
