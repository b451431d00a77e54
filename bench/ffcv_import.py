"""What importing FFCV costs a fresh process, with and without numba's disk cache for the typed dict FFCV fills at
import (``fomo_ray/data/ffcv_import.py``). Every trial and Ray Train worker process pays this once.

Runs the two imports in alternating fresh processes (``plain``: ``import ffcv.loader``; ``cached``:
``cache_typed_dict()`` first, with a numba cache directory warmed by one untimed run) and prints each one's median
CPU (user + system) and wall seconds, and the ratio of the medians. Usage::

    python bench/ffcv_import.py [--runs 7]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

IMPORTS = {
    "plain": "import ffcv.loader",
    "cached": "from fomo_ray.data.ffcv_import import cache_typed_dict; cache_typed_dict(); import ffcv.loader",
}


def timed(code: str, env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one fresh ``python -c code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        timed(IMPORTS["cached"], env)  # warms the cache: what every process after a machine's first one finds
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in IMPORTS}
        for _ in range(args.runs):
            for name, code in IMPORTS.items():
                runs[name].append(timed(code, env))
    med = {name: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r)) for name, r in runs.items()}
    for name, (cpu, wall) in med.items():
        print(f"{name:<7} CPU {cpu:.2f} s  wall {wall:.2f} s  (median of {args.runs})")
    print(f"cached/plain: CPU {med['cached'][0] / med['plain'][0]:.2f}, wall {med['cached'][1] / med['plain'][1]:.2f}")


if __name__ == "__main__":
    main()
