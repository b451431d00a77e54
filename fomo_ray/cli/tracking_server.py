"""``fomo-ray tracking-server``: the cluster's MLflow tracking server, authenticated, on the head's own disk.

Every trial of a multi-node sweep logs to one server (``--tracking-uri http://<head>:5000``). It runs MLflow's
basic-auth app: a request without the credentials gets 401, so nobody else on the cluster's network reads or
overwrites runs. The credentials are made the first time, at random, and kept with the store (``credentials.env``,
mode 0600; never in the repository): the sweep driver exports them (``set -a; . <store>/credentials.env``) and hands
them to its Ray workers through their environment (``ray_session.ensure_ray``). The store is SQLite on the head's
local disk (not on the network file system: SQLite's locks are not safe there) with one worker and one connection
per request, the settings ``bench/tracking_load.py --server`` validated (bench/RESULTS.md). It listens only on the
address given, the head's cluster address; ``0.0.0.0`` is refused.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Sequence

from fomo_ray.cli.text import Parser
from fomo_ray.cli.ui import port_in_use, serve

USER_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
CREDENTIALS_FILE, AUTH_INI, SECRET_FILE = "credentials.env", "basic_auth.ini", "flask_secret"
USER = "fomo_ray"


def _private_file(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable by its owner only (created 0600, never widened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def read_credentials(store: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of ``store/credentials.env``."""
    lines = (store / CREDENTIALS_FILE).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def ensure_credentials(store: Path) -> dict[str, str]:
    """The server's credentials and auth config under ``store``: made once (a random password), then reused, so a
    restarted server and the workers' environment keep agreeing."""
    store.mkdir(parents=True, exist_ok=True)
    if not (store / CREDENTIALS_FILE).is_file():
        _private_file(store / CREDENTIALS_FILE, f"# fomo-ray tracking-server credentials: export before a sweep\n"
                                                f"{USER_VAR}={USER}\n{PASSWORD_VAR}={secrets.token_urlsafe(24)}\n")
    creds = read_credentials(store)
    if not (store / AUTH_INI).is_file():
        _private_file(store / AUTH_INI, "[mlflow]\ndefault_permission = READ\n"
                                        f"database_uri = sqlite:///{(store / 'auth.db').resolve()}\n"
                                        f"admin_username = {creds[USER_VAR]}\nadmin_password = {creds[PASSWORD_VAR]}\n"
                                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    if not (store / SECRET_FILE).is_file():
        _private_file(store / SECRET_FILE, secrets.token_hex(32))
    return creds


def server_command(store: Path, host: str, port: int, artifacts: str) -> list[str]:
    destination = artifacts if "://" in artifacts else Path(artifacts).expanduser().resolve().as_uri()
    return [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{(store / 'mlflow.db').resolve()}",
            "--artifacts-destination", destination, "--host", host, "--port", str(port), "--workers", "1"]


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray tracking-server``: an authenticated MLflow server for a cluster's trials (Ctrl-C stops it)."""
    ap = Parser(prog="fomo-ray tracking-server", description=main.__doc__)
    ap.add_argument("--host", required=True, help="the head's cluster address to listen on (not 0.0.0.0)")
    ap.add_argument("--port", type=int, default=5000, help="the port to listen on (default 5000)")
    ap.add_argument("--store", default="~/fomo_ray_mlflow",
                    help="a directory on the head's local disk: the SQLite store, credentials and auth config")
    ap.add_argument("--artifacts", default="", help="where artifacts go (default STORE/artifacts; a shared mount "
                                                    "or s3:// keeps them beside the checkpoints)")
    ap.add_argument("--startup-timeout", type=float, default=120.0,
                    help="seconds to wait for the server to answer (it imports MLflow first)")
    args = ap.parse_args(argv)
    if args.host in ("0.0.0.0", "::", ""):
        print(f"fomo-ray tracking-server: --host {args.host or '(empty)'} would listen on every interface; pass the "
              f"head's cluster address (e.g. --host $(hostname -I | cut -d' ' -f1))", file=sys.stderr)
        return 2
    if port_in_use(args.port, args.host):
        print(f"fomo-ray tracking-server: port {args.port} on {args.host} is in use; pass --port N", file=sys.stderr)
        return 1
    store = Path(args.store).expanduser()
    ensure_credentials(store)
    artifacts = args.artifacts or str(store / "artifacts")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(store / AUTH_INI),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": (store / SECRET_FILE).read_text().strip()}
    print(f"credentials: {store / CREDENTIALS_FILE} (export them where the sweep driver runs: "
          f"set -a; . {store / CREDENTIALS_FILE}; set +a)", flush=True)
    return serve(server_command(store, args.host, args.port, artifacts), args.port, "/", f"http://{args.host}:"
                 f"{args.port}", args.startup_timeout, host=args.host, env=env, name="fomo-ray tracking-server",
                 what="MLflow tracking server")
