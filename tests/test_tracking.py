"""MLflow tracking against a real SQLite store: URI rules, fail-fast, run layout, batching, FAILED runs, the view
(metric names and units, study views, provenance, the training signal), `fomo-ray run` in MLflow, `fomo-ray ui`."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from fomo_ray.tracking import writer
from fomo_ray.cli.ui import main as ui_main
from fomo_ray.config import load_config
from fomo_ray.provenance import platform_label
from fomo_ray.tracking.writer import (PARENT_TAG, REASON_TAG, TRIAL_TAG, StepLogger, Tracker, TrackingError,
                                      check_reachable, default_uri, eval_metrics, metric_key, resolve_uri, summary_key,
                                      sweep_metrics, tracker_for)
from fomo_ray.tracking import ui
from fomo_ray.tracking.ui import runs_path, ui_command

from _edges_util import REPO, free_port


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


def test_metric_keys_are_valid_mlflow_names_in_percent():
    assert metric_key("SHAPES", "top1") == "datasets/SHAPES/top1"
    assert metric_key("RETRIEVAL", "R@5") == "datasets/RETRIEVAL/R_at_5"
    assert metric_key("a b+c", "x") == "datasets/a b_c/x"
    recs = [{"dataset": "D", "role": "adapt", "metric": "R@1", "value": 0.25}]
    assert eval_metrics(recs, {"A_KA": 0.5, "A_ZS": 0.125, "GM": 0.25}) == {
        "Summary/A_KA": 50.0, "Summary/A_ZS": 12.5, "Summary/GM": 25.0, "datasets/D/R_at_1": 25.0}


def test_full_set_scores_at_the_zero_shot_point_have_names_of_their_own():
    """At the ends only (the default), the full test sets' zero-shot and final scores are two single values: drawn
    on one line they would look like a trajectory. The subsets' trajectory keeps one name at every point."""
    recs = [{"dataset": "D", "metric": "top1", "value": 0.25},
            {"dataset": "D", "metric": "top1", "value": 0.5, "eval_set": "full"}]
    summary, full = {"GM": 0.25}, {"GM": 0.5}
    assert eval_metrics(recs, summary, full, point=0) == {
        "Summary/GM": 25.0, "Summary_full/GM_zero_shot": 50.0, "datasets/D/top1": 25.0,
        "datasets_full/D/top1_zero_shot": 50.0}
    assert eval_metrics(recs, summary, full, point=8) == {
        "Summary/GM": 25.0, "Summary_full/GM": 50.0, "datasets/D/top1": 25.0, "datasets_full/D/top1": 50.0}


def test_joint_training_stands_at_the_end_of_the_stream_axis():
    """``joint`` trains the stream as one task: its point 1 is logged at step T beside the others' after-task-T
    points, not as a spike at step 1; every other method's points are their task indices."""
    from fomo_ray.core.assembly import stream_step
    from fomo_ray.config import load_config

    joint = load_config(None, {"method.name": "joint", "stream.num_tasks": 8})
    assert [stream_step(joint, p) for p in (0, 1)] == [0, 8]
    ft = joint.replace({"method.name": "finetune"})
    assert [stream_step(ft, p) for p in range(9)] == list(range(9))


def test_run_page_sections_sort_summary_and_training_before_the_datasets():
    """MLflow 3 sorts chart sections (the name before the last '/') by code point and puts unprefixed names last;
    the summary and the training signal must come before every per-dataset section (seen in the browser test)."""
    keys = [summary_key("GM"), writer.TRAIN_KEYS[0], metric_key("AIRCRAFT", "top1"), metric_key("aircraft", "x")]
    sections = sorted({k.rsplit("/", 1)[0] for k in keys})
    assert sections[:2] == ["Summary", "Training"] and all(s.startswith("datasets/") for s in sections[2:])


def test_sweep_metrics_best_median_and_counts():
    got = sweep_metrics({"A_KA": [0.1, 0.3, 0.2], "GM": [0.5], "A_ZS": []}, {"finished": 3, "failed": 1})
    assert got == pytest.approx({"Best/A_KA": 30.0, "Median/A_KA": 20.0, "Best/GM": 50.0,
                                 "Median/GM": 50.0, "Trials/finished": 3.0, "Trials/failed": 1.0})


def test_provenance_is_this_checkout_and_version():
    import fomo_ray

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    tags = writer.provenance_tags()
    assert tags[writer.VERSION_TAG] == fomo_ray.__version__ and len(head) == 40
    if dirty:  # uncommitted changes: the commit alone would claim code that did not run
        assert tags[writer.COMMIT_TAG] == head + "+changes" and writer.MLFLOW_COMMIT_TAG not in tags
    else:
        assert tags[writer.COMMIT_TAG] == tags[writer.MLFLOW_COMMIT_TAG] == head


def test_the_platform_names_the_cpu_its_kernel_path_and_torch():
    import torch

    from fomo_ray.provenance import platform

    p = platform()
    assert p["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and p["torch"] == torch.__version__
    assert p["cpu"] and (p["gpu"] != "none") == torch.cuda.is_available()
    cpu = {**p, "gpu": "none"}
    assert platform_label(cpu) == f"{p['cpu']}, {p['cpu_kernels']} kernels, torch {p['torch']}"
    on_gpu = platform_label({**p, "gpu": "NVIDIA H200"})
    assert on_gpu == f"NVIDIA H200 ({p['cpu']}, {p['cpu_kernels']} kernels), torch {p['torch']}"


def test_provenance_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    """An installed copy (no .git above the package) says "unknown" and sets no MLflow commit tag."""
    import fomo_ray

    monkeypatch.setattr(fomo_ray, "__file__", str(tmp_path / "site-packages" / "fomo_ray" / "__init__.py"))
    (tmp_path / "site-packages" / "fomo_ray").mkdir(parents=True)
    from fomo_ray.provenance import code_version

    code_version.cache_clear()
    try:
        tags = writer.provenance_tags()
    finally:
        code_version.cache_clear()
    assert tags[writer.COMMIT_TAG] == "unknown" and writer.MLFLOW_COMMIT_TAG not in tags


def test_parent_child_layout_params_metrics_artifacts_and_failure(store, tmp_path):
    cfg = load_config(None, {"output_dir": str(store), "tracking.experiment": "layout"})
    tr = tracker_for(cfg)
    assert tr.uri == default_uri(store)
    parent = tr.start_parent("sweep-a", description="**Sweep `sweep-a`**: what it studies")
    assert tr.start_parent("sweep-a") == parent  # a resumed sweep reuses its parent run
    assert tr.client.get_run(parent).data.tags[writer.NOTE_TAG] == "**Sweep `sweep-a`**: what it studies"
    flat = cfg.flat()
    child = tr.start_child(parent, "abc_00000", flat, run_name="000-finetune", config={"nested": {"a": 1}})
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
    assert len(run.data.params) == len(flat)  # params = what the caller passes (a trial: applicable_params)
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.data.params["optimizer.betas"] == "0.9,0.98"
    assert tr.metric_history(child, "GM") == [(0, 0.42), (1, 1.42), (2, 2.42)]
    assert len(run.data.metrics) == len(metrics)
    assert run.data.tags[writer.COMMIT_TAG] == writer.provenance_tags()[writer.COMMIT_TAG]
    assert run.data.tags[writer.VERSION_TAG] == writer.provenance_tags()[writer.VERSION_TAG]
    # the platform the run computed on: its numbers are bitwise reproducible there, not on another CPU
    assert run.data.tags[writer.PLATFORM_TAG] == platform_label() and "kernels, torch " in platform_label()
    assert json.loads(Path(tr.client.download_artifacts(child, "config.json", str(tmp_path))).read_text()) == \
        {"nested": {"a": 1}}
    assert [f.path for f in tr.client.list_artifacts(child, "checkpoints/final")] == \
        ["checkpoints/final/loop_state.pt"]
    # artifacts live beside the database, not in whatever directory the process ran in
    assert (store / writer.ARTIFACT_DIR).is_dir()
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
    assert tr.client.get_experiment(tr.experiment_id).artifact_location == (store / writer.ARTIFACT_DIR).as_uri()
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


# -------------------------------------------------------------------------------------------------- the training signal
class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_step_logger_sends_every_n_steps_in_one_call(store):
    """Loss, lr, grad norm and samples/s of every step reach MLflow in one log_batch call per N steps; samples/s is
    left out at a task's first step (the time before it holds an evaluation), the tail goes out on flush."""
    tr = Tracker(default_uri(store), "steps")
    run = tr.start_child(None, "t", {})
    calls = []
    real = tr.client.log_batch
    tr.client.log_batch = lambda *a, **k: (calls.append(len(k.get("metrics", []))), real(*a, **k))[1]
    clock = _Clock()
    steps = StepLogger(tr, run, every=3, global_batch=64, clock=clock)
    g = 0
    for task in range(2):
        clock.now += 30.0  # an evaluation between tasks
        for step in range(4):
            clock.now += 0.5
            steps.step(task, step, loss=1.0 / (g + 1), lr=1e-3, grad_norm=2.0 + g, global_step=g)
            g += 1
    steps.wait()  # the batches are written by a background thread (off the training thread)
    # steps 0-2 and 3-5, 4 metrics each, less the rate of each task's first step (0 and 4)
    assert calls == [3 * 4 - 1, 3 * 4 - 1]
    steps.flush()  # the tail: steps 6-7
    steps.flush()  # nothing left: no call
    assert calls == [11, 11, 8]
    loss_key, lr_key, norm_key, rate_key = writer.TRAIN_KEYS
    assert [s for s, _ in tr.metric_history(run, loss_key)] == list(range(8))
    assert tr.metric_history(run, norm_key)[5] == (5, 7.0)
    assert tr.metric_history(run, rate_key) == [(s, 128.0) for s in (1, 2, 3, 5, 6, 7)]  # 64 samples / 0.5 s


# --------------------------------------------------------------------------------------------------- the UI's views
def test_study_views_are_saved_views_of_the_experiment(store):
    """Each view is an experiment tag holding MLflow 3's saved-view envelope; writing them again changes nothing."""
    tr = Tracker(default_uri(store), "views")
    ui.ensure_views(tr.client, tr.experiment_id)
    tags = tr.client.get_experiment(tr.experiment_id).tags
    views = ui.study_views()
    for view_id, (name, state) in views.items():
        envelope = json.loads(tags[ui.VIEW_TAG_PREFIX + view_id])
        assert envelope["name"] == name and json.loads(envelope["state"]) == state
        assert isinstance(envelope["createdAt"], int) and isinstance(envelope["state"], str)
    trials = views[ui.TRIALS_VIEW][1]
    assert trials["selectedColumns"][:3] == ["metrics.`Summary/A_KA`", "metrics.`Summary/A_ZS`", "metrics.`Summary/GM`"]
    ui.ensure_views(tr.client, tr.experiment_id)
    assert tr.client.get_experiment(tr.experiment_id).tags == tags
    assert runs_path(tr.experiment_id) == (f"/#/experiments/{tr.experiment_id}/runs?workflowType="
                                                    f"machine_learning&viewStateShareKey={ui.TRIALS_VIEW}")


# --------------------------------------------------------------------------------------------------- `fomo-ray run`
def test_fomo_ray_run_logs_one_mlflow_run_and_resume_continues_it(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """A tracked `fomo-ray run`: one run (kind run) with the settings that apply to its method, per-point metrics in
    percent that match the printed table, the training signal at every step; --resume reopens the same run, and
    what it repeats after its checkpoint (here: the whole second task, as if the run died before its end state was
    saved) is not logged twice."""
    from _data_util import small_fifmini, tiny_run

    from fomo_ray.core import checkpoint
    from fomo_ray.core.assembly import run_name
    from fomo_ray.cli.run import main as run_main
    from fomo_ray.models.metrics import load_results, summarize

    bench = small_fifmini(tmp_path_factory)
    overrides = tiny_run(bench.root, tmp_path, **{"budget.total_ft_steps": 6, "method.name": "ema_merge",
                                                  "method.merge.weight": 0.3, "tracking.enabled": True,
                                                  "tracking.log_every_n_steps": 2})
    argv = [f"{k}={v}" for k, v in overrides.items()]
    first = checkpoint.save_state_in_background
    saved: list[int] = []
    monkeypatch.setattr(checkpoint, "save_state_in_background",  # only the state after task 0 reaches the disk
                        lambda state, d: saved.append(1) or (first(state, d) if len(saved) == 1 else None))
    assert run_main(argv) == 0
    progress = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\[\d\d:\d\d\] point ", ln)]
    assert [ln.split()[2] for ln in progress] == ["0/2", "1/2", "2/2"]  # a line per point as it is evaluated
    assert all("A_KA" in ln and "GM" in ln for ln in progress)
    monkeypatch.setattr(checkpoint, "save_state_in_background", first)
    cfg = load_config(None, overrides)
    out = tmp_path / "runs" / run_name(cfg)
    tr = tracker_for(cfg)
    (run,) = tr.client.search_runs([tr.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_name(cfg)
    assert run.data.tags[writer.KIND_TAG] == "run" and run.data.params["method.merge.weight"] == "0.3"
    assert "method.peft.rank" not in run.data.params and "method.merge.init" not in run.data.params
    expected = summarize(load_results(out / "results.parquet")).set_index("point")["GM"]
    got = dict(tr.metric_history(run.info.run_id, summary_key("GM")))
    assert got == {t: round(100 * v, 2) for t, v in expected.items()}  # percent, rounded to 0.01 at logging
    assert [s for s, _ in tr.metric_history(run.info.run_id, writer.TRAIN_KEYS[0])] == list(range(6))
    assert len(tr.metric_history(run.info.run_id, writer.TRAIN_KEYS[2])) == 6  # the pre-clip grad norm
    # resumed with the flag every command spells alike (--output-dir), the same run
    assert run_main([a for a in argv if not a.startswith("output_dir=")]
                    + ["--output-dir", str(tmp_path / "runs"), "--resume"]) == 0
    assert [r.info.run_id for r in tr.client.search_runs([tr.experiment_id])] == [run.info.run_id]
    assert tr.metric_history(run.info.run_id, summary_key("GM")) == sorted(got.items())  # nothing logged twice
    assert [s for s, _ in tr.metric_history(run.info.run_id, writer.TRAIN_KEYS[0])] == list(range(6))


# --------------------------------------------------------------------------------------------------- `fomo-ray ui`
def _start_ui(output_dir, port, *extra):
    """`fomo-ray ui` in its own session (a stray server is then easy to find), with its output read on a thread."""
    proc = subprocess.Popen([sys.executable, "-m", "fomo_ray.cli", "ui", "--output-dir", str(output_dir), "--port",
                             str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    url = threading.Event()
    found: dict[str, object] = {}

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"MLflow UI for \S+ at (http://\S+)", line)
            if m and not url.is_set():
                try:  # right when the URL is printed, the server must answer
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        found["health"] = r.status
                except OSError as e:
                    found["health"] = repr(e)
                found["url"] = m.group(1)
            home = re.search(r"^  home: (http://\S+)", line)
            if home:  # the last page it prints
                found["home"] = home.group(1)
                url.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, url, found, lines


def _serving(port):
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_ui_prints_the_runs_url_once_serving_and_sigterm_stops_the_whole_server(store):
    tr = Tracker(default_uri(store), "fomo_ray")
    port = free_port()
    proc, url, found, lines = _start_ui(store, port)
    try:
        assert url.wait(timeout=180), "no URL within 180 s:\n" + "".join(lines)
        assert found["health"] == 200
        assert found["url"] == f"http://127.0.0.1:{port}" + runs_path(tr.experiment_id)
        # every page it prints opens the training workflow (a new browser opens MLflow 3 on its GenAI pages)
        sweeps = f"  sweeps: http://127.0.0.1:{port}" + runs_path(tr.experiment_id, ui.SWEEPS_VIEW) + "\n"
        assert sweeps in lines and found["home"] == f"http://127.0.0.1:{port}/#/?workflowType=machine_learning"
        server = [p for p in _children(proc.pid)]
        assert server, "fomo-ray ui started no server process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _serving(port), "a process still serves the port after SIGTERM"
        assert not [p for p in server if _alive(p)], "the server or its worker outlived `fomo-ray ui`"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _children(pid):
    """Every descendant of ``pid`` (from /proc)."""
    kids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            kids.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ui_on_a_busy_port_fails_at_once(store):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "fomo_ray.cli", "ui", "--output-dir", str(store), "--port",
                              str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"port {port}" in out.stderr and "in use" in out.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.slow
def test_ui_fails_when_the_server_dies_before_answering(store):
    """The port is taken after the check (a race): the server dies, and `fomo-ray ui` says so with exit code 1."""
    from fomo_ray.cli import ui

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        info = ui.prepare("", str(store), "fomo_ray", port, write=False)
        assert ui.serve(info["command"], port, info["path"], info["uri"], startup_timeout_s=120) == 1
