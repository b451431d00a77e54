"""``python -m fomo_ray.cli``: the same as the ``fomo-ray`` console script."""
import sys

from fomo_ray.cli import main

sys.exit(main())
