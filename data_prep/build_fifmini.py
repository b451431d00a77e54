"""Build the embedded FiF-mini benchmark: ``python data_prep/build_fifmini.py [--root data/fifmini] [--force]``.

A thin wrapper around ``fomo-ray prepare fifmini`` (see ``fomo_ray/prep/fifmini.py`` for what it contains).
"""
import sys

from fomo_ray.cli.prepare import fifmini_main

if __name__ == "__main__":
    sys.exit(fifmini_main(sys.argv[1:]))
