"""Convert webdataset tar shards (img2dataset output) into a pretraining pool (same as ``fomo-ray prepare pool``).

    python data_prep/convert_webdataset.py --shards /data/datacomp/shards --out /data/pool_ffcv --max-samples 2000000

See ``fomo_ray/prep/convert_webdataset.py`` and docs/REAL_DATA.md.
"""
import sys

from fomo_ray.cli.prepare import pool_main

if __name__ == "__main__":
    sys.exit(pool_main(sys.argv[1:]))
