"""Data layer: on-disk format (FFCV betons + manifest), FiF-mini, loaders, streams, the P/D/B mixture, buffers.

Modules (docs/ARCHITECTURE.md "Data" sections):

- :mod:`.format`   ``open_benchmark``, ``Benchmark``, ``DatasetInfo``, ``BenchmarkWriter``, ``DataError``
- :mod:`.fifmini`  ``ensure_fifmini`` - the embedded benchmark (drawing in ``fifmini_draw``/``_scenes``/``_text``)
- :mod:`.loaders`  ``make_loader`` (backends "ffcv" and "memory"); :mod:`.augment` the seeded CLIP transforms
- :mod:`.stream`   ``load_stream``, ``task_sizes``, ``split_tasks``, ``task_rows``
- :mod:`.mixture`  ``mixture_sizes``, ``MixedBatches``;  :mod:`.buffer` ``make_buffer``

Only the format names are imported here (numpy only), so ``import fomo_ray.data`` stays cheap; torch and FFCV
load with the modules that need them.
"""
from .format import Benchmark, BenchmarkWriter, DataError, DatasetInfo, open_benchmark

__all__ = ["Benchmark", "BenchmarkWriter", "DataError", "DatasetInfo", "open_benchmark"]
