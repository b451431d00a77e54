"""Data layer: on-disk format (FFCV betons + manifest), loaders, streams and orderings, the P/D/B mixture, buffers.

Modules (docs/ARCHITECTURE.md "Data" sections):

- :mod:`.format`    ``open_benchmark``, ``Benchmark``, ``DatasetInfo``, ``BenchmarkWriter``, ``DataError``,
  ``sha256_file``
- :mod:`.loaders`   ``make_loader`` (backends "ffcv" and "memory"); :mod:`.augment` the seeded CLIP transforms
- :mod:`.ffcv_import` ``cache_typed_dict``: FFCV's import without recompiling numba's typed dict per process
- :mod:`.stream`    ``load_stream``, ``parse_entries`` (the one ``DATASET+++class`` parser), ``task_sizes``,
  ``split_tasks``, ``task_rows``
- :mod:`.orderings` the paper's stream orderings as pure functions of concepts, a seed and a table;
  :mod:`.fif_catalogue` the FoMo-in-Flux dataset table
- :mod:`.mixture`   ``mixture_sizes``, ``MixedBatches``;  :mod:`.buffer` ``make_buffer``

Making data (FiF-mini, converting real FiF data and web shards, orderings that need a model) is preparation:
:mod:`fomo_ray.prep`, which builds on this layer; this layer never imports it.

Only the format names are imported here (numpy only), so ``import fomo_ray.data`` stays cheap; torch and FFCV
load with the modules that need them.
"""
from .format import Benchmark, DataError, DatasetInfo, open_benchmark
from .writer import BenchmarkWriter

__all__ = ["Benchmark", "BenchmarkWriter", "DataError", "DatasetInfo", "open_benchmark"]
