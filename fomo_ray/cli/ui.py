"""``fomo-ray ui``: the MLflow UI of the project's tracking store, bound to 127.0.0.1.

It prints the address of the experiment's runs table (the training view, opened on the study view of
``tracking.ui.study_views``) once the server answers, and stops the server -- its whole process group: ``mlflow server``
starts a uvicorn worker -- on Ctrl-C (SIGINT) or SIGTERM. A port in use fails at once, a server that dies before
answering fails as soon as it dies, both with exit code 1.

This process stays small: MLflow is imported only by a short-lived helper process (``tracking.ui.prepare_ui``: the
resolved store, the server command, the experiment's page, the study views) and by the server itself.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from fomo_ray.cli.text import Parser

HOST = "127.0.0.1"
# runs tracking.ui.prepare_ui in a child process; its answer is one line of JSON
_PREPARE = ("import json, sys; from fomo_ray.tracking.ui import prepare_ui; a = sys.argv; "
            "print(json.dumps(prepare_ui(a[1], a[2], a[3], int(a[4]), a[5] == '1')))")


class Stopped(Exception):
    """SIGTERM arrived: stop the server and exit."""


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray ui``: browse the project's MLflow store at http://127.0.0.1:PORT (Ctrl-C stops it)."""
    ap = Parser(prog="fomo-ray ui", description=main.__doc__)
    ap.add_argument("--output-dir", default="runs", help="the experiments' output_dir (holds mlflow.db)")
    ap.add_argument("--uri", default="", help="tracking URI (default: MLFLOW_TRACKING_URI or OUTPUT_DIR/mlflow.db)")
    ap.add_argument("--experiment", default="fomo_ray", help="the experiment whose runs page is printed "
                                                               "(tracking.experiment)")
    ap.add_argument("--port", type=int, default=5000, help="the port on 127.0.0.1 the UI listens on (default 5000)")
    ap.add_argument("--startup-timeout", type=float, default=120.0,
                    help="seconds to wait for the server to answer (it imports MLflow first: ~10 s on 2 cores)")
    ap.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = ap.parse_args(argv)
    if not args.dry_run and port_in_use(args.port):
        print(f"fomo-ray ui: port {args.port} on {HOST} is in use (another `fomo-ray ui` or MLflow server?); "
              f"pass --port N", file=sys.stderr)
        return 1
    info = prepare(args.uri, args.output_dir, args.experiment, args.port, write=not args.dry_run)
    if "error" in info:
        print(f"fomo-ray ui: {info['error']}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(" ".join(info["command"]))
        return 0
    return serve(info["command"], args.port, info["path"], info["uri"], args.startup_timeout,
                 also=info.get("also", ()))


def prepare(uri: str, output_dir: str, experiment: str, port: int, write: bool) -> dict:
    """``tracking.ui.prepare_ui`` in a child process (MLflow's imports would stay in this one: ~200 MB)."""
    out = subprocess.run([sys.executable, "-c", _PREPARE, uri, output_dir, experiment, str(port),
                          "1" if write else "0"], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return {"error": f"could not open the MLflow store: {last}"}
    return json.loads(lines[-1])


SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no background job runner (memory)
    "MLFLOW_DISABLE_TELEMETRY": "true",  # the UI runs offline; nothing to report to
    # one SQLite connection per request instead of a pool of 5 + 10: with the pool, 16 concurrent writers (trials
    # logging per-step metrics) waited 30 s for a connection and 9 of them died (bench/tracking_load.py --server)
    "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
}


def serve(command: list[str], port: int, path: str, uri: str, startup_timeout_s: float, host: str = HOST,
          env: dict[str, str] | None = None, name: str = "fomo-ray ui", what: str = "MLflow UI",
          also: Sequence[Sequence[str]] = ()) -> int:
    """Run the server in its own process group until SIGINT / SIGTERM (exit 0) or until it dies (exit 1); once it
    answers, print the address of ``path`` and of the ``also`` pages (``(label, path)``)."""
    env = {**os.environ, **SERVER_ENV, **(env or {})}
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    proc = None
    try:
        # its own session: a terminal's Ctrl-C reaches only this process, which then stops the whole group
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        base = f"http://{host}:{port}"
        if not wait_until_serving(proc, base, startup_timeout_s):
            rc = proc.poll()
            why = (f"exited with code {rc} before it answered (see its output above)" if rc is not None
                   else f"did not answer within {startup_timeout_s:.0f} s")
            print(f"{name}: the MLflow server on {base} {why}", file=sys.stderr)
            return 1
        print(f"{what} for {uri} at {base}{path}  (Ctrl-C stops it)", flush=True)
        for label, page in also:
            print(f"  {label}: {base}{page}", flush=True)
        rc = proc.wait()
        print(f"{name}: the MLflow server exited with code {rc}", file=sys.stderr)
        return rc or 1
    except (KeyboardInterrupt, Stopped):
        return 0
    finally:
        if proc is not None:
            stop_group(proc)
        signal.signal(signal.SIGTERM, previous)


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether a server already listens there (bound as a server would bind: with SO_REUSEADDR, so a port held
    only by connections closing down still counts as free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_until_serving(proc: subprocess.Popen, base: str, timeout_s: float) -> bool:
    """Poll ``base``/health until it answers 200 (True), the server exits or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return proc.poll() is None  # not another server that took the port meanwhile
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc (Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after ``grace_s``; reaps the server. Another
    SIGINT / SIGTERM meanwhile is ignored: the group must not outlive this process."""
    held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            if _group_gone(proc, grace_s):
                break
        proc.wait()
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def _group_gone(proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.poll()  # reap the server itself, so that only live members count
        if not group_members(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc: VmRSS), e.g. `fomo-ray ui` + server + worker."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


if __name__ == "__main__":
    sys.exit(main())
