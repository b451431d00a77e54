"""Concurrent writers into one SQLite MLflow store: does anything get lost, does "database is locked" end a writer?

N processes (as N trials of a sweep on one machine) each open the store through ``fomo_ray.tracking.writer.Tracker``,
start one child run under a shared parent, and log ``--steps`` steps of 4 per-step metrics (loss, lr, grad norm,
samples/s) in batches of ``--every`` steps, one MLflow call per batch, as fast as they can. Afterwards the store
is read back and every (run, metric, step) counted against what was sent. Reported per N: metrics sent, metrics
stored, writers that raised (and the first error), wall time and stored metrics/s. ``--server`` puts an MLflow
tracking server (``mlflow server`` on 127.0.0.1, one worker, as ``fomo-ray ui`` starts it) in front of the same
SQLite store, as a cluster's trials would log to it over HTTP. Usage::

    python bench/tracking_load.py [--writers 4 16 32] [--steps 200] [--every 10] [--server]
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
METRICS = ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s")


def _writer(k: int, uri: str, parent: str, steps: int, every: int, start: mp.Barrier, out: mp.Queue) -> None:
    from mlflow.entities import Metric

    from fomo_ray.tracking.writer import Tracker

    try:
        tracker = Tracker(uri, "load")
        run_id = tracker.start_child(parent, f"trial{k}", {"k": k}, run_name=f"trial{k}")
        start.wait()
        batch = []
        for step in range(steps):
            ts = int(time.time() * 1000)
            batch += [Metric(m, float(step + i), ts, step) for i, m in enumerate(METRICS)]
            if (step + 1) % every == 0 or step + 1 == steps:
                tracker.client.log_batch(run_id, metrics=batch)
                batch = []
        tracker.finish(run_id)
        out.put((k, run_id, ""))
    except Exception as e:  # noqa: BLE001 - the point is to see what a writer would die of
        start.abort()  # a writer that dies before the start must not leave the others waiting for it
        out.put((k, "", f"{type(e).__name__}: {str(e)[:300]}"))


@contextlib.contextmanager
def tracking_server(db: str, directory: str, pool: str = "") -> Iterator[str]:
    """An ``mlflow server`` over the SQLite store ``db``, as ``fomo-ray ui`` starts it (``pool``: another SQLAlchemy
    pool class, e.g. ``QueuePool``, MLflow's default); yields its URI once it answers."""
    import socket
    import urllib.request

    from fomo_ray.tracking.ui import ui_command

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from fomo_ray.cli.ui import SERVER_ENV

    env = {**os.environ, **SERVER_ENV, **({"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": pool} if pool else {})}
    log = open(Path(directory, "server.log"), "w")
    server = subprocess.Popen(ui_command(db, port, Path(directory, "artifacts")), env=env, stdout=log, stderr=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: see {log.name}")
                time.sleep(0.2)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def measure(n: int, steps: int, every: int, server: bool = False, pool: str = "") -> dict:
    from fomo_ray.tracking.writer import Tracker

    with tempfile.TemporaryDirectory(prefix="tracking_load_") as d, contextlib.ExitStack() as stack:
        uri = f"sqlite:///{d}/mlflow.db"
        Tracker(uri, "load")  # creates the schema before a server or the writers open it
        if server:
            uri = stack.enter_context(tracking_server(uri, d, pool))
        parent = Tracker(uri, "load").start_parent(f"load{n}")
        ctx = mp.get_context("spawn")
        start, out = ctx.Barrier(n + 1), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(k, uri, parent, steps, every, start, out)) for k in range(n)]
        for p in procs:
            p.start()
        try:
            start.wait(timeout=600)  # every writer has opened the store and started its run: release them together
        except threading.BrokenBarrierError:  # one died first: count what the others did anyway
            pass
        t0 = time.time()
        results = []
        for _ in range(n):
            results.append(out.get(timeout=900))
        wall = time.time() - t0
        for p in procs:
            p.join()
        tracker = Tracker(uri, "load")
        stored = sum(len(tracker.client.get_metric_history(run_id, m)) for _, run_id, err in results if run_id
                     for m in METRICS)
    errors = [err for _, _, err in results if err]
    sent = n * steps * len(METRICS)
    return {"writers": n, "sent": sent, "stored": stored, "failed_writers": len(errors),
            "first_error": errors[0] if errors else "", "wall_s": round(wall, 1),
            "stored_per_s": round(stored / wall) if wall else 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writers", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--server", action="store_true", help="log through an MLflow tracking server on 127.0.0.1")
    p.add_argument("--pool", default="", help="with --server: SQLAlchemy pool class (default: fomo-ray ui's NullPool)")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one "View run" line per writer
    print(f"tracking load: {a.steps} steps x {len(METRICS)} metrics per writer, one log_batch per {a.every} steps, "
          f"one SQLite store{' behind an MLflow server (pool ' + (a.pool or 'NullPool') + ')' if a.server else ''}; {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print("| writers | sent | stored | writers that failed | wall s | stored metrics/s | first error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in a.writers:
        r = measure(n, a.steps, a.every, a.server, a.pool)
        print(f"| {r['writers']} | {r['sent']} | {r['stored']} | {r['failed_writers']} | {r['wall_s']} | "
              f"{r['stored_per_s']} | {r['first_error'] or '-'} |", flush=True)


if __name__ == "__main__":
    main()
