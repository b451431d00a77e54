"""The Python API (`import fomo_ray`): docs/PYTHON_API.md's notebook executed against a tiny finished sweep, the
README's report / score / load_results examples on the same sweep, `fomo_ray.run`, and the seed aggregation."""
from __future__ import annotations

import math
import re
import shlex

import pandas as pd
import pytest

import fomo_ray
from fomo_ray.api import Results, dotted, variant_summary

from _edges_util import REPO

DOC = REPO / "docs" / "PYTHON_API.md"
NOT_EXECUTED = "<!-- not executed by the doc test"


@pytest.fixture
def finished_sweep(tiny_finished_sweep):
    """The session's finished 2-trial sweep (tests/conftest.py), named like the main job, made through
    ``fomo_ray.sweep``, under ``<tmp>/runs``: (tmp, its Results)."""
    return tiny_finished_sweep.root, tiny_finished_sweep.api


def python_blocks(text: str) -> list[str]:
    executed = text.split(NOT_EXECUTED)[0]
    return re.findall(r"```python\n(.*?)```", executed, re.S)


@pytest.mark.ray
@pytest.mark.slow
def test_the_python_api_doc_runs_on_a_finished_sweep(finished_sweep, monkeypatch, capsys):
    tmp, res = finished_sweep
    assert list(res.trials["status"]) == ["finished", "finished"] and not res.interrupted
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/PYTHON_API.md block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    out = capsys.readouterr().out
    loaded = namespace["res"]
    assert isinstance(loaded, Results) and loaded.directory == tmp / "runs" / "sweeps" / "merge_weights"
    pd.testing.assert_frame_equal(loaded.tidy.reset_index(drop=True), res.tidy.reset_index(drop=True),
                                  check_dtype=False)
    assert namespace["best"]["run"] in out and (tmp / "trajectories.png").is_file()
    assert tuple(namespace["text"].shape) == (2, namespace["model"].text_projection.shape[1])


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_report_score_and_load_results_examples_work(finished_sweep, monkeypatch, capsys):
    """Issue 13: every result file name and command of the README's "Commands" block that reads results."""
    from fomo_ray.cli import main as fomo_ray_cli

    tmp, res = finished_sweep
    monkeypatch.chdir(tmp)
    readme = (REPO / "README.md").read_text()
    commands = [line.split("#")[0].strip() for line in readme.splitlines()
                if line.startswith(("fomo-ray report ", "fomo-ray score "))]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command.replace("<name>", "merge_weights"))[1:]
        assert fomo_ray_cli(argv) == 0, command
        out = capsys.readouterr().out
        assert "A_KA" in out or "final A_KA" in out
    assert (tmp / "runs" / "sweeps" / "merge_weights" / "report" / "trajectories.png").is_file()
    for name in ("results.csv", "tidy.csv", "trials.csv"):  # the files the README names
        assert f"`{name}`" in readme and (res.directory / name).is_file()
    table = fomo_ray.load_results("merge_weights").table
    assert set(table["run"]) == set(res.trials["run"])
    # the sweep's per-point summary is not a tidy table: the error says what to give instead
    assert fomo_ray_cli(["score", str(res.directory / "results.csv")]) == 2
    assert "give the sweep directory" in capsys.readouterr().err


def test_run_writes_its_directory_and_returns_its_results(tmp_path, tmp_path_factory):
    from _data_util import small_fifmini, tiny_sweep

    from fomo_ray.models.metrics import load_results

    base = tiny_sweep(small_fifmini(tmp_path_factory).root, tmp_path, output_dir=str(tmp_path / "runs"))
    res = fomo_ray.run(overrides={**base, "stream.num_tasks": 1}, method__name="ema_merge")
    assert res.directory.parent == tmp_path / "runs" and (res.directory / "config.json").is_file()
    saved = load_results(next(res.directory.glob("results.*")))
    pd.testing.assert_frame_equal(saved, res.tidy, check_dtype=False)
    assert list(res.points["point"]) == [0, 1] and res.table.loc[0, "status"] == "finished"
    # the unit is named where the scores are: fractions here, percent in the printed table
    assert set(res.points["unit"]) == set(res.table["unit"]) == set(res.variants["unit"]) == {"fraction"}
    gm = res.table.loc[0, "final_GM"]
    assert 0 <= gm <= 1 and f"{100 * gm:.1f}" in res.format()
    again = fomo_ray.load_results(res.directory)
    assert again.points.equals(res.points)


def test_bad_input_is_named_and_leaves_nothing(tmp_path):
    from fomo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer.lrr"):
        fomo_ray.run(optimizer__lrr=1e-4, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no sweep, run directory or results table at 'nope'"):
        fomo_ray.load_results("nope", output_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_overrides_and_seed_aggregation():
    assert dotted({"a.b": 1}, optimizer__lr=2) == {"a.b": 1, "optimizer.lr": 2}
    rows = []
    for run, variant, seed, final in [("0", "ema", 0, 0.5), ("1", "ema", 1, 0.7), ("2", "ft", 0, 0.4),
                                      ("3", "ft", 1, 0.9)]:
        for point, value in ((0, 0.2), (1, final)):
            rows += [{"run": run, "point": point, "dataset": d, "role": role, "metric": "top1", "value": value}
                     for d, role in (("A", "adapt"), ("E", "eval"))]
    trials = pd.DataFrame({"run": ["0", "1", "2", "3"], "status": ["finished", "finished", "finished", "failed"],
                           "reason": ["", "", "", "diverged"], "variant": ["ema", "ema", "ft", "ft"],
                           "seed": [0, 1, 0, 1]})
    res = Results(tidy=pd.DataFrame(rows), trials=trials)
    v = res.variants.set_index("variant")
    assert v.loc["ema", "n"] == 2 and v.loc["ft", "n"] == 1  # the failed seed is left out
    assert v.loc["ema", "final_GM_mean"] == pytest.approx(0.6) and v.loc["ema", "final_GM_std"] == pytest.approx(
        pd.Series([0.5, 0.7]).std())
    assert math.isnan(v.loc["ft", "final_GM_std"])
    assert list(res.variants["variant"]) == ["ema", "ft"]  # best mean final GM first
    assert variant_summary(res.table[res.table["status"] == "failed"]).empty


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_results_table_is_made_by_a_script(finished_sweep, tmp_path):
    """Issue 13: the main-job table comes from scripts/main_job_table.py (stamped with platform, date and commit), and
    the README holds exactly one such block."""
    import importlib.util

    _, res = finished_sweep
    spec = importlib.util.spec_from_file_location("main_job_table", REPO / "scripts" / "main_job_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.block(res.directory)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(res.trials) and all("| finished |" in r for r in rows)
    from fomo_ray.provenance import platform_label

    # stamped with where it ran (its numbers hold on that platform), when, and at which commit
    assert f"({platform_label()}; " in text and re.search(r"; \d{4}-\d\d-\d\d, commit [0-9a-f]{12}", text)
    readme = (REPO / "README.md").read_text()
    assert readme.count(script.START) == 1 and readme.count(script.END) == 1
    assert "scripts/main_job_table.py" in readme.split(script.START)[1].split(script.END)[0]
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    script.write_readme(text, copy)
    assert text in copy.read_text() and copy.read_text().count(script.START) == 1


def test_every_sweep_flag_works_as_a_keyword_and_dry_run_returns_the_plan(tmp_path, tmp_path_factory):
    """One table (``config.FLAG_KEYS``) drives the command's flags and ``fomo_ray.sweep``'s keywords: each flag name,
    as a keyword, sets its config key; ``dry_run=True`` returns the plan and the cost estimate and writes nothing."""
    import argparse

    from _data_util import small_fifmini, tiny_sweep

    from fomo_ray.cli import sweep as sweep_cli
    from fomo_ray.config import FLAG_KEYS

    bench = small_fifmini(tmp_path_factory)
    values = {"output_dir": str(tmp_path / "out"), "data_root": str(bench.root), "benchmark": "fifmini",
              "backbone": "fomo-tiny-s", "pretrained": "", "num_tasks": 2, "address": "", "gpus_per_trial": 0.0,
              "cpus_per_trial": 1.0, "workers_per_trial": 1, "max_concurrent": 2,
              "storage_path": str(tmp_path / "storage"), "tracking_uri": ""}
    assert set(values) == set(FLAG_KEYS), "a flag without a value here: add it"
    ap = argparse.ArgumentParser()
    sweep_cli.add_arguments(ap)
    flags = {a.dest for a in ap._actions}
    assert set(FLAG_KEYS) <= flags, f"FLAG_KEYS names no flag of the command: {sorted(set(FLAG_KEYS) - flags)}"
    base = {**tiny_sweep(bench.root, tmp_path, output_dir=str(tmp_path / "runs")), "tracking.enabled": False}
    spec = {"name": "flags", "base": base, "space": {"method.name": {"grid": ["finetune"]}}}
    check = fomo_ray.sweep(spec, dry_run=True, **values)
    flat = check.plan.base.flat()
    for flag, key in FLAG_KEYS.items():
        assert flat[key] == values[flag], (flag, key, flat[key])
    assert [c.label for c in check.costs] == ["method=finetune"] and "est. time" in check.estimate
    assert "flags: 1 trial(s)" in check.text()
    assert not (tmp_path / "out").exists() and not (tmp_path / "storage").exists()  # a dry run writes nothing
    # the partial fractions the old API table refused (issue: gpus_per_trial raised "unknown config key")
    half = fomo_ray.sweep(spec, dry_run=True, gpus_per_trial=0.5,
                          **{k: v for k, v in values.items() if k != "gpus_per_trial"})
    assert half.plan.base.ray.gpus_per_worker == 0.5
