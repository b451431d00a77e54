"""Convert the FoMo-in-Flux download to the project's FFCV format (same as ``fomo-ray prepare fif``).

    python data_prep/convert_fif.py --root /data/fif --info-dir fomo_in_flux/data_lib/00_info --out /data/fif_ffcv

See ``fomo_ray/prep/convert_fif.py`` and docs/REAL_DATA.md.
"""
import sys

from fomo_ray.cli.prepare import fif_main

if __name__ == "__main__":
    sys.exit(fif_main(sys.argv[1:]))
