"""The data preparation's worker processes are spawned (a clean interpreter, not a fork of a threaded parent), and
a worker that dies fails the pool with one line instead of hanging it."""
from __future__ import annotations

import os
import signal

import pytest

from fomo_ray.data.format import DataError
from fomo_ray.prep.workers import worker_pool


def _keep_running(signum, frame):  # a Python SIGTERM handler, like the one ray.init leaves behind
    pass


def test_workers_do_not_inherit_the_parents_signal_handlers():
    previous = signal.signal(signal.SIGTERM, _keep_running)
    try:
        with worker_pool(2, "test", DataError) as pool:
            assert list(pool.map(signal.getsignal, [signal.SIGTERM] * 2)) == [signal.SIG_DFL] * 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_worker_that_dies_fails_the_pool_with_one_line():
    with pytest.raises(DataError, match=r"^FiF-mini POOL pool: a worker process died .*__main__"):
        with worker_pool(1, "FiF-mini POOL pool", DataError) as pool:
            pool.submit(os._exit, 3).result()
