"""Importing FFCV without recompiling numba's typed dict in every process.

``ffcv.fields.rgb_image`` fills a numba typed ``Dict`` (``IMAGE_MODES``) when it is imported, so numba compiles the
typed dict's helper functions (``numba.typed.typeddict``) in every new process that imports FFCV: every trial and
Ray Train worker. numba compiles them without its on-disk cache; this turns the cache on for them first, so every
process after the first loads the compiled code (a fresh process's ``import ffcv.loader`` on an idle 2-core
machine: 5.3 CPU seconds, then 2.8; ``bench/ffcv_import.py``, bench/RESULTS.md). The cache lives where numba keeps
caches (``numba/typed/__pycache__``, else the user's cache directory, or ``NUMBA_CACHE_DIR``); where none is
writable, FFCV imports as before.

Every FFCV import of the package calls :func:`cache_typed_dict` first.
"""
from __future__ import annotations

import functools

#: the numba.typed.typeddict helpers that building and filling a typed Dict compiles
_TYPED_DICT_HELPERS = ("_make_dict", "_setitem", "_getitem", "_length", "_contains")


@functools.cache
def cache_typed_dict() -> bool:
    """Turn numba's on-disk cache on for the typed dict's helpers, once per process; False where it cannot be
    (numba missing or of another layout, no writable cache location): then they compile as before."""
    try:
        from numba.typed import typeddict

        for name in _TYPED_DICT_HELPERS:
            getattr(typeddict, name).enable_caching()
    except Exception:  # noqa: BLE001 - only a speed-up: any failure leaves numba as it was
        return False
    return True
