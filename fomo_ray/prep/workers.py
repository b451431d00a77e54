"""Worker processes of the data preparation (the FiF-mini draw and both converters).

They are *spawned*, not forked. A forked child of a process that runs threads (tqdm's monitor while a conversion
draws, a tracking writer, an executor) inherits their locks in whatever state they were and can deadlock on one; it
also inherits Python signal handlers (``ray.init`` leaves one for SIGTERM) that a deadlocked child never runs, so the
pool's terminate cannot end it. CI once saw such a join wait forever. A spawned child starts clean; the price is
that a script that starts workers must guard its entry point with ``if __name__ == "__main__":``, as on macOS,
where spawn is Python's default.
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def worker_pool(workers: int, what: str, error: type[Exception]) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` spawned processes for ``what``. A worker that dies, or a script that starts one without
    the ``__main__`` guard, raises ``error`` naming ``what`` instead of hanging the pool (a ``multiprocessing.Pool``
    replaces dead workers and waits for their tasks forever)."""
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            yield pool
    except BrokenProcessPool as e:
        raise error(f"{what}: a worker process died ({e}): killed (out of memory?), or started by a script "
                    "without the if __name__ == \"__main__\" guard that spawned workers need (one worker, e.g. "
                    "--workers 1, runs in this process)") from None


def manager():
    """A ``multiprocessing`` manager whose queues the spawned workers of :func:`worker_pool` can use."""
    return mp.get_context("spawn").Manager()
