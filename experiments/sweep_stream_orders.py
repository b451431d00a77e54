"""Stream ordering x method.

Runs on the embedded FiF-mini benchmark with no arguments; see `--help` for real data, backbones, a Ray cluster
address and GPUs per trial. Sweep definition: configs/sweep_stream_orders.yaml.
"""
import sys
from pathlib import Path

from fomo_ray.cli.sweep import experiment_main

if __name__ == "__main__":
    sys.exit(experiment_main(Path(__file__).with_name("configs") / "sweep_stream_orders.yaml", description=__doc__))
