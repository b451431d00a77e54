"""The cluster's tracking server (issue 28): ``fomo-ray tracking-server`` runs MLflow's basic-auth app with
credentials it makes once (mode 0600, never in the repository), listens only on the address given, refuses an
unauthenticated request, and a run with the credentials in its environment logs through it."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from fomo_ray.cli import tracking_server as ts

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("tracking") / "store"
    port = _free_port()
    log = store.parent / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "fomo_ray.cli", "tracking-server", "--host", HOST, "--port",
                             str(port), "--store", str(store)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while "MLflow tracking server for" not in log.read_text():  # printed once /health answers
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the tracking server did not answer within 180 s"
        time.sleep(0.2)
    yield {"url": f"http://{HOST}:{port}", "store": store, "proc": proc}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_credentials_are_made_once_and_private(server):
    store = server["store"]
    for name in (ts.CREDENTIALS_FILE, ts.AUTH_INI, ts.SECRET_FILE):
        assert stat.S_IMODE((store / name).stat().st_mode) == 0o600, name
    creds = ts.read_credentials(store)
    assert creds[ts.USER_VAR] == ts.USER and len(creds[ts.PASSWORD_VAR]) >= 24
    assert ts.ensure_credentials(store) == creds  # a restarted server keeps them


def test_an_unauthenticated_request_is_refused(server):
    url = f"{server['url']}/api/2.0/mlflow/experiments/search?max_results=1"
    creds = ts.read_credentials(server["store"])
    assert _status(url) == 401
    assert _status(url, (creds[ts.USER_VAR], "not-the-password")) == 401
    assert _status(url, (creds[ts.USER_VAR], creds[ts.PASSWORD_VAR])) == 200


def test_a_run_with_the_credentials_logs_through_it(server, tmp_path, tmp_path_factory, monkeypatch):
    """A real run of the loop (tiny model, 2 tasks), its MLflow run on the server; read back with the credentials."""
    from _data_util import SCALE, small_fifmini

    import fomo_ray
    from fomo_ray.tracking.writer import Tracker

    for key, value in ts.read_credentials(server["store"]).items():
        monkeypatch.setenv(key, value)
    fomo_ray.run(overrides={"data.root": str(small_fifmini(tmp_path_factory).root), "data.scale": SCALE,
                            "data.prepare_if_missing": False, "backbone.pretrained": "",
                            "stream.num_tasks": 2, "budget.total_ft_steps": 4, "budget.mode": "equal_steps",
                            "output_dir": str(tmp_path / "runs"), "tracking.uri": server["url"],
                            "tracking.experiment": "auth", "budget.cache_dir": str(tmp_path / "budget")})
    runs = Tracker(server["url"], "auth").client.search_runs([Tracker(server["url"], "auth").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "GM" in "".join(runs[0].data.metrics)


def test_listening_on_every_interface_is_refused(capsys):
    assert ts.main(["--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 would listen on every interface" in capsys.readouterr().err
