"""Sweeps: space parsing and fail-fast validation (no Ray), the directory policy, every shipped sweep config, and
(marked ``ray``) an end-to-end sweep with MLflow, a failing trial, Tuner.restore and a two-node cluster."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fomo_ray.planning import sweep_spec
from fomo_ray.engine import tune_sweep as sweep
from fomo_ray.cli import sweep as sweep_cli
from fomo_ray.config import ConfigError, load_config
from fomo_ray.planning.sweep_spec import Dim, SweepError, parse_dim, parse_space, spec_from_dict
from fomo_ray.results.export import WEIGHTS_FILE
from fomo_ray.results.retention import checkpoint_dirs

from _edges_util import REPO, StandIn, register_by_value, trial_in_worker

CONFIGS = sorted((REPO / "experiments" / "configs").glob("sweep_*.yaml"))


# --------------------------------------------------------------------------------------------------- the space
def test_parse_dims():
    assert parse_dim("k", {"grid": [1, 2]}) == Dim("grid", (1, 2))
    assert parse_dim("k", {"loguniform": [1e-5, 1e-3]}).candidates() == [1e-5, 1e-3]
    assert parse_dim("k", {"randint": [2, 6]}).candidates() == [2, 5]  # hi exclusive, as Tune
    pts = parse_dim("variant", {"points": {"ft": {"method.name": "finetune"}}})
    assert pts.values == (("ft", {"method.name": "finetune"}),)


@pytest.mark.parametrize("raw, match", [
    ({"grid": []}, "non-empty list"),
    ({"gird": [1]}, "unknown kind 'gird'"),
    ({"loguniform": [0, 1]}, "invalid loguniform"),
    ({"uniform": [2, 1]}, "invalid uniform"),
    ({"randint": [1.5, 3]}, "invalid randint"),
    ({"grid": [1], "choice": [2]}, "expected one of"),
    ({"points": {"a": 3}}, "point 'a'"),
])
def test_bad_dims_are_named(raw, match):
    with pytest.raises(SweepError, match=match) as e:
        parse_dim("optimizer.lr", raw)
    assert "optimizer.lr" in str(e.value)


def test_overrides_labels_and_grid():
    space = parse_space({"variant": {"points": {"ft": {"method.name": "finetune"},
                                                "ema": {"method.name": "ema_merge", "method.merge.weight": 0.3}}},
                         "optimizer.lr": {"grid": [1e-4, 3e-4]}})
    combos = sweep_spec.grid_points(space)
    assert len(combos) == 4
    assert sweep_spec.trial_overrides({"variant": "ema", "optimizer.lr": 1e-4}, space) == {
        "method.name": "ema_merge", "method.merge.weight": 0.3, "optimizer.lr": 1e-4}
    assert sweep_spec.trial_label({"variant": "ema", "optimizer.lr": 1e-4}, space) == "ema,lr=0.0001"
    assert sweep_spec.short_key("backbone.name") == "backbone"
    assert sweep_spec.short_key("method.merge.weight") == "weight"


def test_validation_fails_fast_naming_key_value_or_point():
    base = load_config()
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learning_rate'.*did you mean"):
        sweep_spec.validate_space(base, parse_space({"optimizer.learning_rate": {"grid": [1e-4]}}))
    with pytest.raises(ConfigError, match=r"'method.merge.weight' value 1.5.*out of range"):
        sweep_spec.validate_space(base, parse_space({"method.merge.weight": {"grid": [0.5, 1.5]}}))
    with pytest.raises(ConfigError, match=r"'optimizer.lr' value -1"):
        sweep_spec.validate_space(base, parse_space({"optimizer.lr": {"uniform": [-1, 1]}}))
    with pytest.raises(ConfigError, match=r"point 'variant=bad'.*schedule.nmae"):
        sweep_spec.validate_space(base, parse_space({"variant": {"points": {"bad": {"schedule.nmae": "cosine"}}}}))
    with pytest.raises(ConfigError, match=r"trial method=ema_merg.*unknown method 'ema_merg'"):
        sweep_spec.validate_space(base, parse_space({"method.name": {"grid": ["finetune", "ema_merg"]}}))
    with pytest.raises(ConfigError, match=r"'backbone.name'.*fomo-tiny-x"):
        sweep_spec.validate_space(base, parse_space({"backbone.name": {"choice": ["fomo-tiny-x"]}}))
    # combinations are checked too: each share is valid alone, their sum is not
    with pytest.raises(ConfigError, match="must sum to 1"):
        sweep_spec.validate_space(base, parse_space({"mixture.pool": {"grid": [0.5]}}))


def test_points_need_a_free_name():
    with pytest.raises(SweepError, match="'method.name' is a config key"):
        sweep_spec.validate_space(load_config(), parse_space({"method.name": {"points": {"a": {}}}}))


def test_trial_count():
    space = parse_space({"variant": {"points": {"a": {}, "b": {}}}, "seed": {"grid": [0, 1, 2]},
                         "optimizer.lr": {"loguniform": [1e-5, 1e-3]}, "method.merge.weight": {"choice": [0.1, 0.9]}})
    assert sweep_spec.trial_count(space, "grid", 1) == 6  # sampled dims do not multiply
    assert sweep_spec.trial_count(space, "random", 4) == 24
    assert sweep_spec.trial_count(space, "optuna", 5) == 5


def test_optuna_cannot_enumerate_a_grid():
    with pytest.raises(SweepError, match="write it as"):
        sweep.to_tune(parse_space({"optimizer.lr": {"grid": [1e-4]}}), "optuna")
    assert set(sweep.to_tune(parse_space({"optimizer.lr": {"loguniform": [1e-5, 1e-3]}}), "optuna")) == {"optimizer.lr"}


def test_spec_keys_are_checked(tmp_path):
    with pytest.raises(SweepError, match=r"unknown sweep key\(s\) \['serach'\]"):
        spec_from_dict({"name": "x", "serach": "grid"})
    with pytest.raises(SweepError, match="search 'bayes'"):
        spec_from_dict({"name": "x", "search": "bayes"})
    with pytest.raises(SweepError, match="not found"):
        sweep_spec.load_sweep(tmp_path / "missing.yaml")


def test_run_sweep_fails_before_ray_or_any_directory(tmp_path):
    """An invalid space is rejected by run_sweep itself before Ray starts or anything is written."""
    import ray

    spec = spec_from_dict({"name": "bad", "base": {"output_dir": str(tmp_path)},
                           "space": {"optimizer.lr": {"grid": [1e-4, 0.0]}}})
    with pytest.raises(ConfigError, match="'optimizer.lr' value 0.0"):
        sweep.run_sweep(spec)
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_uri_fails_before_any_trial(tmp_path):
    from fomo_ray.tracking.writer import TrackingError

    from _edges_util import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    spec = spec_from_dict({"name": "s", "base": {"output_dir": str(tmp_path), "tracking.uri": uri},
                           "space": {"optimizer.lr": {"grid": [1e-4]}}})
    with pytest.raises(TrackingError, match=uri):
        sweep.run_sweep(spec)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("mode", ["sweep", "dry run"])
@pytest.mark.parametrize("case", ["stream file", "checkpoint", "data root"])
def test_bad_inputs_are_refused_before_launch_naming_trial_and_culprit(case, mode, tmp_path, tmp_path_factory,
                                                                       capsys):
    """A bad stream file, base checkpoint or data root of any trial stops the sweep before Ray starts or anything
    is written, naming the trial and the file; a dry run makes the same check and refuses in the same line."""
    import ray
    import torch

    from _data_util import SCALE, small_fifmini

    bench = small_fifmini(tmp_path_factory)
    base = {"output_dir": str(tmp_path / "out"), "data.root": str(bench.root), "data.scale": SCALE,
            "backbone.pretrained": "", "stream.num_tasks": 2, "budget.total_ft_steps": 8,
            "budget.cache_dir": str(tmp_path / "budget")}
    space = {"optimizer.lr": {"grid": [1e-4, 1e-3]}}
    if case == "stream file":
        culprit = tmp_path / "stream.json"
        culprit.write_text(json.dumps(["SHAPES+++no such class"]))
        space["stream.file"] = {"grid": ["", str(culprit)]}
        match = [r"trial lr=0\.0001,file=.*stream\.json", "no such class"]
    elif case == "checkpoint":
        culprit = tmp_path / "other_arch.pt"
        torch.save({"visual.proj": torch.zeros(3, 3)}, culprit)
        base["backbone.pretrained"] = str(culprit)
        match = ["BackboneError", str(culprit), "does not match architecture"]
    else:
        culprit = tmp_path / "no_such_fif"
        base.update({"data.benchmark": "fif", "data.root": str(culprit)})
        match = ["DataError", str(culprit)]
    if mode == "dry run":
        spec_file = tmp_path / "s.yaml"
        spec_file.write_text(json.dumps({"name": "s", "base": base, "space": space}))
        assert sweep_cli.main([str(spec_file), "--dry-run", "--no-mlflow"]) == 2
        text = capsys.readouterr().err.strip()
        assert len(text.splitlines()) == 1 and not (tmp_path / "budget").exists()
    else:
        with pytest.raises(SweepError) as err:
            sweep.run_sweep(spec_from_dict({"name": "s", "base": base, "space": space}))
        text = str(err.value)
    assert all(__import__("re").search(m, text) for m in match), text
    assert "no trial started" in text
    assert not ray.is_initialized() and not (tmp_path / "out" / "sweeps").exists()
    assert mode == "sweep" or not (tmp_path / "out").exists()  # a dry run writes nothing at all


# --------------------------------------------------------------------------------------------------- directories
def test_directory_policy(tmp_path):
    d, resume = sweep_spec.sweep_directory(tmp_path, "s", "auto")
    assert (d, resume) == (tmp_path / "s", False)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")  # started, not finished
    assert sweep_spec.sweep_directory(tmp_path, "s", "auto") == (tmp_path / "s", True)
    assert sweep_spec.sweep_directory(tmp_path, "s", "new") == (tmp_path / "s-2", False)
    with pytest.raises(SweepError, match="interrupted"):
        sweep_spec.sweep_directory(tmp_path, "s", "refuse")
    (tmp_path / "s" / sweep_spec.SUMMARY_FILE).write_text("{}")  # finished: never reused
    assert sweep_spec.sweep_directory(tmp_path, "s", "auto") == (tmp_path / "s-2", False)
    with pytest.raises(SweepError, match="already finished"):
        sweep_spec.sweep_directory(tmp_path, "s", "resume")
    with pytest.raises(SweepError, match="nothing to resume"):
        sweep_spec.sweep_directory(tmp_path, "t", "resume")


def test_several_workers_per_run_make_torchtrainer_trials():
    spec = spec_from_dict({"name": "ddp", "base": {"ray.num_workers": 2, "tracking.enabled": False},
                           "space": {"seed": {"grid": [0]}}})
    assert sweep_spec.plan_sweep(spec).use_train  # the loop is data-parallel: N workers -> a TorchTrainer per trial


def test_train_concurrency_from_resources():
    cfg = load_config(None, {"ray.num_workers": 2, "ray.cpus_per_worker": 1.0, "ray.gpus_per_worker": 1.0})
    assert sweep.train_concurrency(cfg, {"CPU": 16.0, "GPU": 4.0}) == 2
    assert sweep.train_concurrency(cfg, {"CPU": 1.0}) == 1  # never 0: one trial waits for its workers
    assert sweep.trial_resources(cfg, use_train=True) == {"cpu": sweep.TRIAL_TRAIN_CPU}
    cfg = load_config(None, {"ray.cpus_per_worker": 0.5, "ray.gpus_per_worker": 0.25})
    assert sweep.trial_resources(cfg, use_train=False) == {"cpu": 0.5, "gpu": 0.25}


# --------------------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_sweep_is_valid(path):
    spec = sweep_spec.load_sweep(path, {"tracking.enabled": False})
    plan = sweep_spec.plan_sweep(spec)
    assert plan.total >= 2 and not plan.use_train
    script = REPO / "experiments" / f"{path.stem}.py"
    assert script.is_file(), f"{path.name} has no experiment script {script.name}"


def test_experiment_scripts_cover_the_papers_studies():
    names = {p.stem for p in CONFIGS}
    assert names == {"sweep_merge_weights", "sweep_methods", "sweep_lr_schedules", "sweep_model_sizes",
                     "sweep_budgets", "sweep_stream_orders"}


def test_experiment_dry_run_cli():
    from _data_util import budget_cache

    out = subprocess.run([sys.executable, str(REPO / "experiments" / "sweep_merge_weights.py"), "--dry-run",
                          "--no-mlflow", "--gpus-per-trial", "0.5", f"budget.cache_dir={budget_cache(REPO / 'data')}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "merge_weights: 8 trial(s)" in out.stdout and "ema_w0.5" in out.stdout
    bad = subprocess.run([sys.executable, str(REPO / "experiments" / "sweep_merge_weights.py"), "--dry-run",
                          "optimizer.lr=-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "optimizer.lr" in bad.stderr


# slow: a dry run of a shipped sweep measures its methods' steps and, where the benchmark is built, times a trial's
# fixed costs (fomo_ray/planning/overhead.py: a fresh interpreter importing Ray, torch and MLflow): 20-40 s in a clone
@pytest.mark.slow
def test_fomo_ray_sweep_cli_takes_overrides_anywhere(capsys):
    path = str(REPO / "experiments" / "configs" / "sweep_budgets.yaml")
    assert sweep_cli.main([path, "--dry-run", "--no-mlflow", "method.merge.weight=0.3"]) == 0
    assert "budgets: 14 trial(s)" in capsys.readouterr().out  # 4 budgets x 3 methods + zero-shot and joint
    assert sweep_cli.main([path, "method.merge.weight=3", "--dry-run", "--no-mlflow"]) == 2
    assert "method.merge.weight" in capsys.readouterr().err


# slow: a dry run of a shipped sweep measures its methods' steps and, where the benchmark is built, times a trial's
# fixed costs (fomo_ray/planning/overhead.py: a fresh interpreter importing Ray, torch and MLflow): 20-40 s in a clone
@pytest.mark.slow
def test_validation_and_dry_run_import_no_ray():
    """Validating a shipped sweep YAML and dry-running it need no Ray: sweep_spec and the CLI's dry run never
    import it (a fresh interpreter, so nothing else in the test session imported it first)."""
    from _data_util import budget_cache

    path = str(REPO / "experiments" / "configs" / "sweep_merge_weights.yaml")
    cache = budget_cache(REPO / "data")  # the session's: a process start timed by an earlier test is read, not redone
    code = (
        "import sys\n"
        "from fomo_ray.planning import sweep_spec\n"
        "from fomo_ray.cli import sweep as sweep_cli\n"
        f"spec = sweep_spec.load_sweep({path!r}, {{'tracking.enabled': False}})\n"
        "assert sweep_spec.plan_sweep(spec).total == 8\n"
        f"assert sweep_cli.main([{path!r}, '--dry-run', '--no-mlflow', 'budget.cache_dir={cache}']) == 0\n"
        "ray = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not ray, ray\n"
        "print('no ray')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "merge_weights: 8 trial(s)" in out.stdout and out.stdout.rstrip().endswith("no ray")


# --------------------------------------------------------------------------------------------------- real Ray
def _stand_in_trials(monkeypatch, runner):
    """Trials run ``runner`` instead of the loop (a worker wrapper shipped to the Ray workers); a stand-in needs no
    benchmark, base checkpoint or budget measurement, so the driver prepares none."""
    register_by_value()
    monkeypatch.setattr(sweep, "run_trial", trial_in_worker(runner))
    monkeypatch.setattr(sweep, "ensure_sweep_inputs", lambda base, space: None)
    monkeypatch.setattr(sweep, "estimate_plan", _unit_costs)


def _unit_costs(plan, device=None, store=True):
    """Every trial costs the same (a stand-in trial has no model to measure): the grid's order is kept."""
    from fomo_ray.planning.cost_estimate import TrialCost
    from fomo_ray.planning.sweep_spec import enumerated_trials

    fixed = {k: d for k, d in plan.space.items() if d.kind in ("grid", "points")}
    return [TrialCost(sweep_spec.trial_label(c, fixed), "stand-in", "stand-in", 1, 1, 1.0, 1.0, 1.0)
            for c in enumerated_trials(plan)]


@pytest.mark.ray
@pytest.mark.slow
def test_end_to_end_sweep_with_mlflow(ray_local, tiny_finished_sweep):
    """2 trials x 2 tasks of the real loop on the tiniest model, each a TorchTrainer driven by its Tune trial (the
    session's tiny sweep of tests/conftest.py, also read by test_api.py and test_ui_browser.py): parent/child runs,
    per-task metrics and a checkpoint artifact in MLflow, a DataFrame that matches them, report files; a rerun never
    overwrites."""
    from fomo_ray.tracking.writer import NOTE_TAG, PARENT_TAG, TRAIN_KEYS, Tracker, as_percent, summary_key

    spec, out, wall, runs_dir = (tiny_finished_sweep.spec, tiny_finished_sweep.out, tiny_finished_sweep.wall,
                                 tiny_finished_sweep.output_dir)
    sweep_name = spec.name
    assert spec.trainer == "train" and spec.report_x == "method.merge.weight"
    assert list(out.trials["status"]) == ["finished", "finished"]
    res = out.results
    assert sorted(set(res["run"])) == ["000-finetune", "001-ema"]
    assert res.groupby("run")["point"].apply(list).to_dict() == {"000-finetune": [0, 1, 2], "001-ema": [0, 1, 2]}
    assert res.loc[res["run"] == "001-ema", "method.merge.weight"].eq(0.5).all()
    sub = out.tidy[out.tidy["eval_set"] == "subset"]  # every point on the same subsets, the full sets at the ends
    assert sub.groupby(["run", "point"]).size().eq(len(sub.query("run == '000-finetune' and point == 0"))).all()
    assert sorted(out.tidy.loc[out.tidy["eval_set"] == "full", "point"].unique()) == [0, 2]
    # both trials start from the same theta_0: identical zero-shot points
    zs = res[res["point"] == 0].set_index("run")[["A_KA", "A_ZS", "GM"]]
    assert zs.iloc[0].tolist() == zs.iloc[1].tolist()

    tracker = Tracker(out.tracking_uri, "fomo_ray")
    parent = tracker.client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == sweep_name
    note = parent.data.tags[NOTE_TAG]
    assert f"**Sweep `{sweep_name}`**" in note and "`variant`: points" in note
    final = res[res["point"] == 2]
    assert parent.data.metrics["Best/GM"] == as_percent(final["GM"].max())
    assert parent.data.metrics["Median/A_KA"] == pytest.approx(as_percent(final["A_KA"].median()), rel=1e-12)
    assert (parent.data.metrics["Trials/finished"], parent.data.metrics["Trials/failed"]) == (2, 0)
    children = {r.info.run_name: r for r in tracker.children(out.parent_run_id)}
    assert sorted(children) == ["000-finetune", "001-ema"]
    for name, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags[PARENT_TAG] == out.parent_run_id
        assert run.data.params["method.name"] == ("finetune" if name == "000-finetune" else "ema_merge")
        assert run.data.params["variant"] == name.split("-", 1)[1]
        # only what applies to the method: fine-tuning has no merge weight to plot at
        assert ("method.merge.weight" in run.data.params) == (name == "001-ema")
        # MLflow holds percent, the results table fractions: the same numbers
        gm = tracker.metric_history(run.info.run_id, summary_key("GM"))
        assert gm == [(t, as_percent(v)) for t, v in zip(res.loc[res["run"] == name, "point"],
                                                        res.loc[res["run"] == name, "GM"])]
        assert len(tracker.metric_history(run.info.run_id, "datasets/SCENES/R_at_5")) == 3  # per dataset, per task
        assert [s for s, _ in tracker.metric_history(run.info.run_id, TRAIN_KEYS[0])] == list(range(8))
        # an ended trial keeps one checkpoint, trimmed to its export (ray.keep_after_run: deployed), whose weights
        # file is MLflow's model/ one (a hard link: stored once); MLflow points at it instead of a second copy
        assert not tracker.client.list_artifacts(run.info.run_id, "checkpoints/final")
        final_dir = Path(run.data.tags["fomo_ray.final_checkpoint"])
        assert checkpoint_dirs(final_dir.parent) == [final_dir]
        assert not (final_dir / "loop_state.pt").exists() and (final_dir / "config.json").is_file()
        mlflow_model = Path(run.info.artifact_uri.removeprefix("file://")) / "model"
        assert (final_dir / "model" / WEIGHTS_FILE).samefile(mlflow_model / WEIGHTS_FILE)
    report_arts = {f.path for f in tracker.client.list_artifacts(out.parent_run_id, "report")}
    assert {"report/table.md", "report/trajectories.png", "report/pareto.png"} <= report_arts
    assert (out.directory / "results.csv").is_file() and (out.directory / sweep_spec.SUMMARY_FILE).is_file()
    pd.testing.assert_frame_equal(pd.read_csv(out.directory / "results.csv")[["run", "point", "GM"]],
                                  res[["run", "point", "GM"]], check_exact=False, rtol=1e-12)

    # a finished sweep is never overwritten
    before = (out.directory / "results.csv").stat().st_mtime_ns
    with pytest.raises(SweepError, match="already exists.*finished"):
        sweep.run_sweep(spec, if_exists="refuse")
    assert (out.directory / "results.csv").stat().st_mtime_ns == before
    again = sweep_spec.sweep_directory(runs_dir / "sweeps", sweep_name, "auto")
    assert again == (runs_dir / "sweeps" / f"{sweep_name}-2", False)
    print(f"end-to-end sweep (2 trials x 2 tasks, real loop): {wall:.1f} s")


@pytest.mark.ray
@pytest.mark.slow
def test_restore_finishes_only_the_rest_and_a_failed_trial_does_not_stop_the_sweep(ray_local, tmp_path, monkeypatch,
                                                                                     capfd):
    """Interrupted after its first trial, the sweep is restored with Tuner.restore; the finished trial is not run
    again, the diverging trial is FAILED in Tune and MLflow with its reason (and not retried), the last one runs."""
    from fomo_ray.tracking.writer import REASON_TAG, Tracker

    _stand_in_trials(monkeypatch, StandIn)
    spec = spec_from_dict({
        "name": "restore",
        "base": {"output_dir": str(tmp_path), "stream.num_tasks": 2, "ray.max_concurrent_trials": 1,
                 "ray.max_failures": 1},
        "space": {"variant": {"points": {"a": {"seed": 1}, "diverges": {"optimizer.lr": 1.0e308},
                                         "b": {"seed": 2}, "bad": {"seed": 13}}}}})
    t0 = time.time()
    first = sweep.run_sweep(spec, stop_after_trials=1, resume_hint=lambda name: f"resume {name} like this")
    printed = "".join(capfd.readouterr())
    assert "interrupted: 1 finished" in printed and "Resume it with: resume restore like this" in printed
    assert "Failed to fetch metrics" not in printed  # the 3 pending trials never started: the counts say so
    assert not (first.directory / sweep_spec.SUMMARY_FILE).exists()  # interrupted: not marked finished
    assert list(first.trials["run"]) == ["000-a"] and first.interrupted
    assert sweep.status_counts(first.trials, first.total) == {"finished": 1, "failed": 0, "stopped": 0,
                                                                "interrupted": 0, "pending": 3}
    from fomo_ray.tracking.writer import Tracker as _T

    assert _T(first.tracking_uri, "fomo_ray").client.get_run(first.parent_run_id).info.status == "KILLED"
    # item 1: resuming with other settings is refused before anything runs, naming every differing key
    changed = dataclasses.replace(spec, base={**spec.base, "stream.num_tasks": 3, "optimizer.lr": 5e-4})
    with pytest.raises(SweepError, match=r"optimizer.lr: 0.0001 -> 0.0005; stream.num_tasks: 2 -> 3.*--fresh"):
        sweep.run_sweep(changed)
    second = sweep.run_sweep(spec)
    assert "Failed to fetch metrics" not in "".join(capfd.readouterr())  # nor on restore
    wall = time.time() - t0
    assert second.directory == first.directory  # resumed in place
    calls = sorted(p.name.split("-")[0] for p in (tmp_path / "calls").iterdir())
    assert calls.count("seed1") == 1  # the finished trial was not redone
    assert calls.count("seed2") == 1
    assert calls.count("seed13") == 1  # a deterministic error is not retried (ray.max_failures=1)
    assert calls.count("seed0") == 1  # nor is a divergence
    status = second.trials.set_index("run")["status"].to_dict()
    assert status == {"000-a": "finished", "001-diverges": "failed", "002-b": "finished", "003-bad": "failed"}
    reasons = second.trials.set_index("run")["reason"]
    assert "diverged" in reasons["001-diverges"] and "DataError: stream file" in reasons["003-bad"]
    assert sorted(set(second.results["run"])) == ["000-a", "001-diverges", "002-b"]  # "bad" never evaluated
    assert second.results.set_index("run").loc["001-diverges", "status"] == "failed"
    assert (second.directory / sweep_spec.SUMMARY_FILE).is_file()
    tracker = Tracker(second.tracking_uri, "fomo_ray")
    runs = {r.info.run_name: r for r in tracker.children(second.parent_run_id)}
    assert sorted(runs) == ["000-a", "001-diverges", "002-b", "003-bad"]  # one per trial, also across the restore
    assert runs["001-diverges"].info.status == runs["003-bad"].info.status == "FAILED"
    assert runs["001-diverges"].data.tags["fomo_ray.status"] == "failed"
    assert "TrainingDiverged" in runs["001-diverges"].data.tags[REASON_TAG]
    assert runs["000-a"].info.status == runs["002-b"].info.status == "FINISHED"
    assert tracker.client.get_run(second.parent_run_id).data.tags.get(REASON_TAG) == "2 trial(s) failed"
    print(f"interrupt + Tuner.restore of 3 trials: {wall:.1f} s")


@pytest.mark.ray
def test_a_crashing_trial_prints_one_line_per_attempt_not_a_traceback(ray_local, tmp_path, monkeypatch, capfd):
    """Issue 14, item 4: an error that is not bad input is retried (max_failures), and each attempt prints one line
    with its reason and the path of the full log, which is kept in the sweep's directory."""
    _stand_in_trials(monkeypatch, StandIn)
    spec = spec_from_dict({"name": "crash", "base": {"output_dir": str(tmp_path), "stream.num_tasks": 1,
                                                     "ray.max_failures": 1, "tracking.enabled": False},
                           "space": {"variant": {"points": {"crash": {"seed": StandIn.crash_seed}}}}})
    out = sweep.run_sweep(spec)
    printed = capfd.readouterr()
    text = printed.out + printed.err
    log = out.directory / "tune" / "000-crash" / "error.txt"
    reason = f"RuntimeError: simulated crash in the trial (seed {StandIn.crash_seed})"
    lines = [line for line in text.splitlines() if "000-crash" in line and reason in line]
    assert [line.split()[1] for line in lines] == ["retry", "FAILED"], text
    assert "attempt 2 of 2" in lines[0] and all(f"full log: {log}" in line for line in lines)
    assert "Traceback" not in text and "Trials did not complete" not in text and "tensorboard" not in text
    assert reason in log.read_text()  # the full traceback is kept where the line says
    assert out.trials.set_index("run").loc["000-crash", ["status", "reason"]].tolist() == ["failed", reason]
    assert len(list((tmp_path / "calls").iterdir())) == 2  # retried once, then failed


_INTERRUPTIBLE = """
import sys
sys.path.insert(0, {tests!r})
from fomo_ray.engine import tune_sweep as sweep
from fomo_ray.cli import sweep as cli
from _edges_util import StandIn, register_by_value, trial_in_worker
register_by_value()
sweep.run_trial = trial_in_worker(StandIn)
sweep.ensure_sweep_inputs = lambda base, space: None
sys.argv[0] = "sweep_intr.py"
sys.exit(cli.main([{spec!r}, *sys.argv[1:]]))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_while_ray_starts_stops_the_sweep_cleanly_and_it_resumes(tmp_path):
    """Issue 14, item 4: a Ctrl-C while Ray starts stops the sweep (exit 3, no traceback, parent run KILLED) with the
    command that resumes it; that command then runs every trial."""
    import signal

    import yaml

    from fomo_ray.tracking.writer import Tracker

    spec = tmp_path / "intr.yaml"
    spec.write_text(yaml.safe_dump({"name": "intr", "base": {"output_dir": str(tmp_path / "out"),
                                                             "stream.num_tasks": 1},
                                    "space": {"variant": {"points": {"a": {"seed": 1}, "b": {"seed": 2}}}}}))
    script = tmp_path / "sweep_intr.py"
    script.write_text(_INTERRUPTIBLE.format(tests=str(REPO / "tests"), spec=str(spec)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # the driver prints this line, then starts Ray
        lines.append(line)
        if "starting in" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    out = "".join(lines) + out
    assert proc.returncode == 3, (out, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "interrupted before any trial (re)started" in out and "0 finished, 0 failed, 2 pending" in out
    assert not (tmp_path / "out" / "calls").exists()  # no trial ran
    resume = next(line for line in out.splitlines() if "Resume it with:" in line).split("Resume it with: ")[1]
    assert resume == "python sweep_intr.py --name intr --resume"
    parent = json.loads((tmp_path / "out" / "sweeps" / "intr" / "sweep.json").read_text())["parent_run_id"]
    tracker = Tracker(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "fomo_ray")
    assert tracker.client.get_run(parent).info.status == "KILLED"
    # issue 30, item 4: a sweep interrupted under the old module layout (before the part folders) is refused with
    # one line naming the version and commit that wrote it; its directory is left as it was
    state_file = tmp_path / "out" / "sweeps" / "intr" / "sweep.json"
    state = state_file.read_text()
    old = {k: v for k, v in json.loads(state).items() if k != "layout"}
    state_file.write_text(json.dumps({**old, "fomo_ray_version": "0.1.0", "commit": "a95876c" + "0" * 33}))
    refused = subprocess.run([sys.executable, str(script), "--name", "intr", "--resume"], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stdout + refused.stderr
    error = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and "written by fomo_ray 0.1.0" in error[0] and "git checkout a95876c" in error[0], error
    assert json.loads(state_file.read_text())["fomo_ray_version"] == "0.1.0"  # nothing rewritten
    state_file.write_text(state)
    again = subprocess.run([sys.executable, str(script), "--name", "intr", "--resume"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trials: 2 finished, 0 failed" in again.stdout
    assert tracker.client.get_run(parent).info.status == "FINISHED"


def test_a_relaunched_failed_trial_replays_its_recorded_reports(tmp_path, monkeypatch):
    """Issue 14, item 5: a trial that failed deterministically is relaunched when a sweep is restored before Tune
    recorded its reports (seen under load: the diverged trial's rows were missing). It must send its evaluation
    reports again, then its failed report, and not raise (so Tune neither loses the rows nor retries it)."""
    from fomo_ray import trial_report

    sent = []

    class Context:
        def get_trial_id(self):
            return "t1"

        def get_trial_dir(self):
            return str(tmp_path / "003-bad")

    monkeypatch.setattr(sweep.tune, "get_context", lambda: Context())
    monkeypatch.setattr(sweep.tune, "report", lambda metrics, checkpoint=None: sent.append(metrics))
    recs = [{"dataset": "A", "role": "adapt", "metric": "top1", "value": 0.5}]
    evals = [trial_report.eval_report(0, recs, {"A_KA": 0.5, "A_ZS": 0.25, "GM": 0.35})]
    sweep._record_failure(sweep._failure_marker(str(tmp_path), "t1"), "TrainingDiverged: loss is nan", evals)
    setup = sweep.TrialSetup(base=load_config(None, {"output_dir": str(tmp_path)}), space={}, use_train=False,
                             storage=str(tmp_path), tracking_uri="", parent_run_id="", sweep_name="s")
    sweep.run_trial({}, setup)
    assert sent[:-1] == evals
    assert trial_report.is_kind(sent[-1], trial_report.ReportKind.FAILED) and "nan" in sent[-1]["reason"]
    assert sent[-1]["GM"] == 0.35


@pytest.mark.ray
def test_optuna_samples_within_the_space(ray_local, tmp_path, monkeypatch):
    """The model-based searcher (Optuna TPE, seeded) proposes trials inside the declared ranges and sees GM."""
    _stand_in_trials(monkeypatch, StandIn)
    spec = spec_from_dict({
        "name": "optuna", "search": "optuna", "num_samples": 3, "metric": "GM",
        "base": {"output_dir": str(tmp_path), "stream.num_tasks": 1, "tracking.enabled": False,
                 "ray.max_concurrent_trials": 2, "ray.cpus_per_worker": 0.5},
        "space": {"optimizer.lr": {"loguniform": [1.0e-5, 1.0e-2]},
                  "method.merge.weight": {"choice": [0.25, 0.75]}}})
    out = sweep.run_sweep(spec, progress=False)
    assert len(out.trials) == 3 and (out.trials["status"] == "finished").all()
    assert out.trials["optimizer.lr"].between(1e-5, 1e-2).all()
    assert set(out.trials["method.merge.weight"]) <= {0.25, 0.75}
    assert out.results.groupby("run")["point"].max().eq(1).all()


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, tmp_path_factory):
    """bench/two_node_cluster.py: `ray start --head` + `ray start --address` on this machine form a 2-node
    cluster; a 2-trial sweep of the real loop lands one trial on each node; every process started is stopped."""
    from _data_util import SCALE, budget_cache, small_fifmini

    bench = small_fifmini(tmp_path_factory)
    out = tmp_path / "two_node"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "two_node_cluster.py"), "--data-root",
                           str(bench.root), "--data-scale", str(SCALE), "--keep", str(out), "--json", str(tmp_path / "summary.json"),
                           "--budget-cache", budget_cache(bench.root)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["cluster_nodes"]) == 2
    assert sorted(n for ns in summary["trial_nodes"].values() for n in ns) == summary["cluster_nodes"]
    assert set(summary["trial_status"].values()) == {"finished"}
    assert summary["stopped_cleanly"], "some node processes needed SIGKILL"
    print(f"two-node cluster + 2-trial sweep: {time.time() - t0:.1f} s ({summary})")


@pytest.mark.parametrize("path", sorted((REPO / "cluster").glob("*.yaml")), ids=lambda p: p.stem)
def test_cluster_launcher_configs_validate_against_rays_schema(path):
    """cluster/*.yaml pass Ray 2.60's own cluster-launcher validation (defaults filled as `ray up` does), start the
    authenticated tracking server on the head's own address and disk, and mount shared storage on every node."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))
    head = " ".join(raw["head_start_ray_commands"])
    assert "fomo-ray tracking-server --host $(hostname -I" in head and "ray start --head" in head
    assert "0.0.0.0" not in head and "sqlite:////mnt/shared" not in head  # SQLite on the head's disk, not NFS
    assert any("/mnt/shared" in c for c in raw["setup_commands"])
    assert raw["available_node_types"][raw["head_node_type"]]["resources"] == {"CPU": 0}


def test_rerunning_resumes_the_interrupted_later_run_of_a_sweep(tmp_path):
    """Issue 14, item 3: after 'name' finished and 'name-2' was interrupted, the same command (and --resume) resume
    'name-2' instead of starting 'name-3' or finding nothing to resume."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep_spec.SUMMARY_FILE).write_text("{}")
    (tmp_path / "s-2").mkdir()
    (tmp_path / "s-2" / "sweep_state.json").write_text("{}")
    assert sweep_spec.sweep_directory(tmp_path, "s", "auto") == (tmp_path / "s-2", True)
    assert sweep_spec.sweep_directory(tmp_path, "s", "resume") == (tmp_path / "s-2", True)
    assert sweep_spec.sweep_directory(tmp_path, "s", "new") == (tmp_path / "s-3", False)
    (tmp_path / "s-2" / sweep_spec.SUMMARY_FILE).write_text("{}")
    assert sweep_spec.sweep_directory(tmp_path, "s", "auto") == (tmp_path / "s-3", False)


# slow: a dry run of a shipped sweep measures its methods' steps and, where the benchmark is built, times a trial's
# fixed costs (fomo_ray/planning/overhead.py: a fresh interpreter importing Ray, torch and MLflow): 20-40 s in a clone
@pytest.mark.slow
def test_dry_run_writes_nothing_and_still_checks_the_store(tmp_path, capsys):
    """Issue 14, item 6: a dry run validates the tracking store without creating mlflow.db (or any folder)."""
    path = str(REPO / "experiments" / "configs" / "sweep_budgets.yaml")
    out = tmp_path / "runs"
    assert sweep_cli.main([path, "--dry-run", f"output_dir={out}"]) == 0
    assert not out.exists()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
            return
        assert sweep_cli.main([path, "--dry-run", f"output_dir={locked / 'runs'}"]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


@pytest.mark.ray
@pytest.mark.slow
def test_cost_order_and_cooperative_early_stopping_with_the_real_loop(ray_local, tmp_path, tmp_path_factory):
    """Issue 15: the longest trial starts first (its estimate is printed, saved and beside the actual wall time),
    and the sweep's stopping rule stops trailing trials through the loop's should_stop hook at a task boundary:
    status ``stopped`` (not failed) in the trials table, Tune's last result, MLflow and the report, a partial
    trajectory, and decisions that replay the pure rule exactly."""
    from _data_util import small_fifmini, tiny_sweep

    from fomo_ray.results.report import trial_table
    from fomo_ray.planning.stopping import StoppingRule, decide, history_from_results
    from fomo_ray.tracking.writer import STATUS_TAG, STOP_TAG, Tracker

    bench = small_fifmini(tmp_path_factory)
    rule = {"rule": "trails_best", "min_tasks": 1, "margin": 0.0, "min_trials": 2}
    spec = spec_from_dict({
        "name": "stops", "stopping": rule, "references": ["zero_shot"],
        "base": tiny_sweep(bench.root, tmp_path, **{
            "stream.num_tasks": 3, "budget.total_ft_steps": 9,
            "ray.max_concurrent_trials": 1}),  # one at a time: the start order is the comparison order
        "space": {"variant": {"points": {"lr3": {"method.name": "finetune", "optimizer.lr": 1e-3},
                                         "lr2": {"method.name": "finetune", "optimizer.lr": 1e-2},
                                         "lr1": {"method.name": "finetune", "optimizer.lr": 1e-1}}}}})
    out = sweep.run_sweep(spec)
    trials = out.trials.set_index("run")
    # cost order: trials start longest estimate first (equal ones as enumerated); the run names' prefixes count
    # starts. (Which is longest is a measurement: the zero-shot reference trains nothing, but its evaluation speed is
    # timed apart, so on a busy machine it can come out longer than 9 training steps plus evaluation.)
    est = pd.read_csv(out.directory / sweep.ESTIMATE_FILE).set_index("label")
    started = [run.split("-", 1)[1] for run in sorted(trials.index)]
    assert started == sorted(est.index, key=lambda label: -est.loc[label, "est_s"])
    assert est.loc["zero_shot", "steps"] == 0 and (est.drop("zero_shot")["steps"] == 9).all()
    assert (est.loc["zero_shot", "train_gflops"], est.loc["zero_shot", "est_s"] > 0) == (0, True)
    # a reference trial is never stopped nor compared with: it runs to the end, and the replay leaves it out
    zs = [r for r in trials.index if r.endswith("-zero_shot")]
    assert trials.loc[zs, "status"].tolist() == ["finished"]
    trials = trials.drop(zs)
    assert trials["est_s"].notna().all() and (trials["wall_s"] > 0).all()

    # replay the pure rule over the trajectories in start order: every decision the sweep took, and only those
    history = history_from_results(out.results[~out.results["run"].isin(zs)], "GM")
    board: dict[str, dict[int, float]] = {}
    expected = {}
    for run in sorted(history):
        reason = ""
        for point in sorted(history[run]):
            if point == 3:  # the last point is never a stopping point
                break
            reason = decide(StoppingRule(**rule), run, point, history[run][point], board)
            board.setdefault(run, {})[point] = history[run][point]
            if reason:
                break
        expected[run] = ("stopped", max(history[run])) if reason else ("finished", 3)
    got = {run: (t["status"], int(out.results[out.results["run"] == run]["point"].max()))
           for run, t in trials.iterrows()}
    assert got == expected
    stopped = trials[trials["status"] == "stopped"]
    assert len(stopped) >= 1, "no trial trailed: this sweep no longer exercises stopping; pick other variants"
    assert (stopped["stopped_at"] < 3).all() and stopped["reason"].str.contains("trails the best trial").all()
    assert not (trials["status"] == "failed").any()

    table = trial_table(out.tidy, out.trials).set_index("run")
    assert table.loc[stopped.index, "final_GM"].isna().all()  # partial: no final score
    tracker = Tracker(out.tracking_uri, "fomo_ray")
    children = {r.info.run_name: r for r in tracker.children(out.parent_run_id)}
    for run, t in trials.iterrows():
        tags = children[run].data.tags
        assert children[run].info.status == "FINISHED" and tags[STATUS_TAG] == t["status"]
        assert (tags.get(STOP_TAG) == t["reason"]) if t["status"] == "stopped" else STOP_TAG not in tags
    parent = tracker.client.get_run(out.parent_run_id)
    assert parent.data.metrics["Trials/stopped"] == len(stopped)
    assert 0 < parent.data.metrics["Stopping/compute_saved"] < 100
    assert parent.data.metrics["Estimate/train_gflops"] == pytest.approx(est["train_gflops"].sum(), rel=1e-3)
    assert parent.data.params["sweep.order"] == "cost"


@pytest.mark.ray
@pytest.mark.slow
def test_an_identical_finished_trial_is_replayed_from_the_trial_cache(ray_local, tmp_path, tmp_path_factory,
                                                                      monkeypatch, capsys):
    """Issue 17, item 3: a later sweep replays the finished trials it shares with an earlier one (same config and
    seed, same commit), with the same numbers, says so, and tags their MLflow runs; its new trial runs."""
    from _data_util import small_fifmini, tiny_sweep

    from fomo_ray.results import trial_cache
    from fomo_ray.tracking.writer import Tracker

    from fomo_ray.provenance import platform, platform_label

    # the tree under test may be uncommitted
    monkeypatch.setattr(trial_cache, "cache_origin", lambda: trial_cache.Origin("ab" * 20, platform_label()))
    bench = small_fifmini(tmp_path_factory)
    base = tiny_sweep(bench.root, tmp_path, **{"budget.total_ft_steps": 4})
    first = sweep.run_sweep(spec_from_dict({"name": "c1", "references": ["zero_shot"], "base": base,
                                            "space": {"optimizer.lr": {"grid": [1e-3]}}}))
    assert set(first.trials["status"]) == {"finished"}
    capsys.readouterr()
    second = sweep.run_sweep(spec_from_dict({"name": "c2", "references": ["zero_shot"], "base": base,
                                             "space": {"optimizer.lr": {"grid": [1e-3, 3e-4]}}}))
    out = capsys.readouterr().out
    assert "reusing 2 finished trial(s)" in out and "zero_shot (from c1/" in out and "lr=0.001 (from c1/" in out
    assert set(second.trials["status"]) == {"finished"} and len(second.trials) == 3

    def by_label(res):
        t = res.tidy.merge(res.trials[["run"]], on="run")
        return {run.split("-", 1)[1]: g.drop(columns="run").sort_values(["point", "dataset", "metric", "eval_set"])
                .reset_index(drop=True) for run, g in t.groupby("run")}

    a, b = by_label(first), by_label(second)
    for label in ("zero_shot", "lr=0.001"):
        pd.testing.assert_frame_equal(a[label], b[label])  # replayed: exactly the first sweep's numbers
    tracker = Tracker(second.tracking_uri, "fomo_ray")
    tags = {r.info.run_name.split("-", 1)[1]: r.data.tags for r in tracker.children(second.parent_run_id)}
    assert tags["zero_shot"][trial_cache.SOURCE_TAG].startswith("c1/")
    assert trial_cache.SOURCE_TAG not in tags["lr=0.0003"]
    # where the numbers were computed: the summary names the driver's platform, every entry the platform it is for
    summary = json.loads((first.directory / sweep_spec.SUMMARY_FILE).read_text())
    assert summary["platform"] == platform()
    entries = [json.loads(f.read_text()) for f in (tmp_path / trial_cache.CACHE_DIR).glob("*.json")]
    assert len(entries) == 3 and {e["platform"] for e in entries} == {platform_label()}


@pytest.mark.ray
@pytest.mark.slow
def test_trials_in_a_reused_process_compute_what_fresh_processes_compute(ray_local, tmp_path, tmp_path_factory,
                                                                         monkeypatch):
    """``ray.reuse_trial_processes`` (on by default): one process runs a sweep's trials one after the other (a LoRA
    trial, whose adapters wrap the model, then fine-tuning), and each computes exactly what it computes in a process
    of its own (the option off: one process per trial)."""
    from _data_util import small_fifmini, tiny_sweep
    from _edges_util import register_by_value, trial_noting_pid

    register_by_value()
    bench = small_fifmini(tmp_path_factory)
    tidy = {}
    for reuse in (True, False):
        out = tmp_path / f"reuse_{reuse}"
        monkeypatch.setattr(sweep, "run_trial", trial_noting_pid(str(out / "pids")))
        base = tiny_sweep(bench.root, out, **{"ray.max_concurrent_trials": 1, "ray.reuse_trial_processes": reuse,
                                              "tracking.enabled": False})
        res = sweep.run_sweep(spec_from_dict({"name": "reuse", "base": base, "space": {"variant": {"points": {
            "lora": {"method.name": "lora"}, "ft": {"method.name": "finetune"}}}}}), progress=False)
        assert list(res.trials["status"]) == ["finished", "finished"]
        assert len(list((out / "pids").iterdir())) == (1 if reuse else 2)
        tidy[reuse] = res.tidy.sort_values(["run", "point", "dataset", "metric", "eval_set"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(tidy[True], tidy[False])  # bitwise: every trial, point, dataset and metric


def test_a_sweep_resumed_on_another_platform_says_its_numbers_will_not_compare(tmp_path, capsys):
    """A resumed sweep whose driver now runs on another CPU (or kernel path) goes on, and says that the trials it
    runs now are not bitwise comparable with the ones finished before."""
    from fomo_ray.provenance import platform
    from fomo_ray.planning.sweep_state import STATE_LAYOUT, open_state

    state = {"name": "s", "layout": STATE_LAYOUT, "platform": {**platform(), "cpu_kernels": "OTHER"},
             "parent_run_id": ""}
    (tmp_path / "sweep.json").write_text(json.dumps(state))
    assert open_state(tmp_path, None, resume=True) == state
    assert "resumed on" in capsys.readouterr().out
    (tmp_path / "sweep.json").write_text(json.dumps({**state, "platform": platform()}))
    open_state(tmp_path, None, resume=True)
    assert capsys.readouterr().out == ""


def test_tunes_metrics_warning_keeps_only_trials_that_started(tmp_path):
    """A restored or interrupted sweep makes Tune warn "Failed to fetch metrics" for every pending trial; the lines of
    trials that never started (no directory) are dropped, a started trial with missing results keeps its line."""
    import logging

    from fomo_ray.engine.tune_callbacks import QuietPending

    (tmp_path / "000-a").mkdir()

    def record(*names):
        lines = [f"- {n}: FileNotFoundError('Could not fetch metrics for {n}: both result.json and progress.csv were "
                 f"not found at {tmp_path / n}')" for n in names]
        text = f"Failed to fetch metrics for {len(names)} trial(s):\n" + "\n".join(lines)
        return logging.LogRecord("ray.tune.analysis.experiment_analysis", logging.WARNING, "", 0, text, (), None)

    quiet = QuietPending()
    assert not quiet.filter(record("001-b", "002-c"))
    kept = record("000-a", "001-b")
    assert quiet.filter(kept)
    assert kept.getMessage().splitlines()[0] == "Failed to fetch metrics for 1 started trial(s):"
    assert "000-a" in kept.getMessage() and "001-b" not in kept.getMessage()
    other = logging.LogRecord("x", logging.WARNING, "", 0, "something else", (), None)
    assert quiet.filter(other)


def test_an_interrupted_python_sweep_names_the_call_that_resumes_it():
    from fomo_ray.api import resume_call

    assert resume_call("experiments/configs/sweep_methods.yaml", "findings_methods") == (
        "fomo_ray.sweep('experiments/configs/sweep_methods.yaml', <the same arguments>, name='findings_methods', "
        "resume=True)")
    assert resume_call({"name": "x"}, "x-2").startswith("fomo_ray.sweep(<the same spec mapping>")


def test_a_trials_mlflow_params_start_with_what_its_sweep_varies():
    """MLflow lists a run's params in the order they were logged: the swept keys, ``variant`` and the trial's own
    label as ``name`` come first (not the sweep's name and the whole config in alphabetical order)."""
    from fomo_ray.planning.trial_params import trial_params

    space = parse_space({"optimizer.lr": {"grid": [1e-4]},
                         "variant": {"points": {"ema": {"method.name": "ema_merge", "method.merge.weight": 0.5}}}})
    config = {"optimizer.lr": 1e-4, "variant": "ema"}
    cfg = load_config(None, {"name": "the_sweep", **sweep_spec.trial_overrides(config, space)})
    params = trial_params(config, space, cfg)
    swept = ["optimizer.lr", "method.name", "method.merge.weight"]
    assert list(params)[:8] == [*(f"Swept/{k}" for k in swept), *swept, "variant", "name"]
    # MLflow's compare page plots the first three differing params in sorted order: the swept ones
    assert sorted(params)[:3] == sorted(f"Swept/{k}" for k in swept)
    assert params["name"] == params["variant"] == sweep_spec.trial_label(config, space) != "the_sweep"
    assert params["method.merge.weight"] == 0.5 and "backbone.name" in params
