"""Pretrain the tiny base CLIP(s) on FiF-mini's pool P and cache them beside the data.

Thin wrapper over ``fomo_ray.cli.pretrain.main`` (same options as ``fomo-ray pretrain``); ``fomo-ray run`` and
sweeps run this automatically (``prep.ensure_inputs``) when ``backbone.pretrained=auto`` and the cached base is
missing. Examples::

    python data_prep/pretrain_base.py                       # fomo-tiny-s on data/fifmini (built if missing)
    python data_prep/pretrain_base.py --all                 # every tiny size (model-size studies)
    python data_prep/pretrain_base.py data.root=/data/fifmini --arch fomo-tiny-m
"""
import sys

from fomo_ray.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
