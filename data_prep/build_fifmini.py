"""Build the embedded FiF-mini benchmark: ``python data_prep/build_fifmini.py [--root data/fifmini] [--force]``.

A thin wrapper around ``fomo-ray prepare fifmini`` (see ``fomo_ray/data/fifmini.py`` for what it contains).
"""
import sys

from fomo_ray.prepare import main

if __name__ == "__main__":
    sys.exit(main(["fifmini", *sys.argv[1:]]))
