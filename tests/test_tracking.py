"""MLflow tracking against a real SQLite store: URI rules, fail-fast, run layout, batching, FAILED runs, the UI."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from fomo_ray import tracking
from fomo_ray.cli.ui import main as ui_main
from fomo_ray.config import load_config
from fomo_ray.tracking import (PARENT_TAG, REASON_TAG, TRIAL_TAG, Tracker, TrackingError, check_reachable,
                               default_uri, eval_metrics, metric_key, resolve_uri, tracker_for, ui_command)

from _edges_util import free_port


def test_default_uri_is_absolute_sqlite_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = resolve_uri("", "runs", env={})
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # four slashes: an absolute path, whatever a trial's cwd is


def test_uri_precedence_and_relative_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("", "runs", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5001"}) == "http://127.0.0.1:5001"
    assert resolve_uri("http://127.0.0.1:5002", "runs", env={"MLFLOW_TRACKING_URI": "http://x:1"}) \
        == "http://127.0.0.1:5002"
    assert resolve_uri("sqlite:///rel/m.db", "runs", env={}) == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"


@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/mlruns"])
def test_file_store_is_refused_with_the_uri(uri):
    with pytest.raises(TrackingError, match="file store") as e:
        resolve_uri(uri, "runs", env={})
    assert uri in str(e.value)


def test_unreachable_server_fails_fast_naming_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(TrackingError) as e:
        Tracker(uri, "x")
    assert uri in str(e.value) and "unreachable" in str(e.value)
    assert time.perf_counter() - t0 < 10  # not MLflow's minutes of retries


def test_sqlite_path_that_cannot_exist_fails_naming_the_uri(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    uri = f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="cannot create directory") as e:
        check_reachable(uri)
    assert uri in str(e.value)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its schema costs seconds); tests use their own experiments."""
    out = tmp_path_factory.mktemp("store")
    Tracker(default_uri(out), "warmup")
    return out


def test_metric_keys_are_valid_mlflow_names():
    assert metric_key("SHAPES", "top1") == "SHAPES/top1"
    assert metric_key("RETRIEVAL", "R@5") == "RETRIEVAL/R_at_5"
    assert metric_key("a b+c", "x") == "a b_c/x"
    recs = [{"dataset": "D", "role": "adapt", "metric": "R@1", "value": 0.25}]
    assert eval_metrics(recs, {"A_KA": 0.5, "A_ZS": 0.5, "GM": 0.5}) == {"A_KA": 0.5, "A_ZS": 0.5, "GM": 0.5,
                                                                         "D/R_at_1": 0.25}


def test_parent_child_layout_params_metrics_artifacts_and_failure(store, tmp_path):
    cfg = load_config(None, {"output_dir": str(store), "tracking.experiment": "layout"})
    tr = tracker_for(cfg)
    assert tr.uri == default_uri(store)
    parent = tr.start_parent("sweep-a")
    assert tr.start_parent("sweep-a") == parent  # a resumed sweep reuses its parent run
    flat = cfg.flat()
    child = tr.start_child(parent, "abc_00000", flat, run_name="000-finetune")
    metrics = {f"D{i}/top1": i / 100 for i in range(40)} | {"A_KA": 0.3, "A_ZS": 0.6, "GM": 0.42}
    for step in range(3):
        tr.log_metrics(child, {k: v + step for k, v in metrics.items()}, step=step)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "loop_state.pt").write_bytes(b"\0" * 10)
    tr.log_artifacts(child, ckpt, artifact_path="checkpoints/final")
    tr.finish(child, failure="TrainingDiverged: loss is nan at task 1, step 3")

    (run,) = tr.children(parent)
    assert run.info.run_name == "000-finetune"
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags[TRIAL_TAG] == "abc_00000"
    assert run.info.status == "FAILED" and "loss is nan" in run.data.tags[REASON_TAG]
    assert len(run.data.params) == len(flat)  # params = the whole flat config
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.data.params["optimizer.betas"] == "0.9,0.98"
    assert tr.metric_history(child, "GM") == [(0, 0.42), (1, 1.42), (2, 2.42)]
    assert len(run.data.metrics) == len(metrics)
    assert [f.path for f in tr.client.list_artifacts(child, "checkpoints/final")] == \
        ["checkpoints/final/loop_state.pt"]
    # artifacts live beside the database, not in whatever directory the process ran in
    assert (store / tracking.ARTIFACT_DIR).is_dir()
    # a restarted trial finds its run again (by trial id, or by the id kept in its checkpoint)
    assert tr.start_child(parent, "abc_00000", flat) == child
    assert tr.start_child(parent, "other", flat, run_id=child) == child
    assert len(tr.children(parent)) == 1


def test_artifacts_never_land_in_the_working_directory(store, tmp_path, monkeypatch):
    """MLflow's default artifact root is ./mlruns of whatever process creates the experiment; a Tune trial's cwd
    is its own directory, so the tracker pins artifacts beside the database instead."""
    monkeypatch.chdir(tmp_path)
    tr = Tracker(default_uri(store), "cwd-independent")
    run = tr.start_child(None, "t", {})
    (tmp_path / "f.txt").write_text("x")
    tr.client.log_artifact(run, str(tmp_path / "f.txt"))
    assert tr.client.get_experiment(tr.experiment_id).artifact_location == (store / tracking.ARTIFACT_DIR).as_uri()
    assert not (tmp_path / "mlruns").exists()


def test_many_params_are_chunked(store):
    tr = Tracker(default_uri(store), "chunks")
    run = tr.start_child(None, "t", {f"p{i}": i for i in range(250)})  # MLflow allows 100 per batch
    assert len(tr.client.get_run(run).data.params) == 250


def test_ui_command_binds_loopback_with_one_worker(tmp_path):
    cmd = ui_command(default_uri(tmp_path), 5055, tmp_path / "art")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == default_uri(tmp_path)


def test_ui_without_a_database_says_so(tmp_path, capsys):
    assert ui_main(["--output-dir", str(tmp_path)]) == 2
    assert "no MLflow database" in capsys.readouterr().err


@pytest.mark.slow
def test_ui_serves_the_store(store):
    """`fomo-ray ui` really starts an MLflow server on 127.0.0.1 that answers /health (stopped by its PID)."""
    tmp_path = store
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "fomo_ray.cli", "ui", "--output-dir", str(tmp_path), "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, ok = time.time() + 60, False
        while time.time() < deadline and not ok:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    ok = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert ok, "the MLflow UI did not answer on /health within 60 s"
    finally:
        os.killpg(proc.pid, 15)  # its own session: the server and its worker, nothing else
        proc.wait(timeout=30)
