"""FiF scores (A_KA, A_ZS, GM, trajectories, forgetting, BWT) on a table whose answers are computed by hand."""
import math

import pandas as pd
import pytest

from fomo_ray.models import metrics
from fomo_ray.cli.score import main as score_main
from fomo_ray.models.metrics import MetricsError

# Evaluation points 0, 1, 2 of one run. A1 adapt/classification, A2 adapt/retrieval (R@5 is its headline; R@1 must
# be ignored), E1/E2 eval-only classification.
#   point 0: A_KA = (.2+.4)/2 = .3   A_ZS = (.8+.6)/2 = .7   GM = sqrt(.21)
#   point 1: A_KA = (.6+.6)/2 = .6   A_ZS = (.7+.5)/2 = .6   GM = .6
#   point 2: A_KA = (.4+.8)/2 = .6   A_ZS = (.9+.1)/2 = .5   GM = sqrt(.3)
VALUES = {
    ("A1", "adapt", "top1"): (0.2, 0.6, 0.4),
    ("A2", "adapt", "R@5"): (0.4, 0.6, 0.8),
    ("A2", "adapt", "R@1"): (0.1, 0.3, 0.2),
    ("E1", "eval", "top1"): (0.8, 0.7, 0.9),
    ("E2", "eval", "top1"): (0.6, 0.5, 0.1),
}


def hand_table(run="r") -> pd.DataFrame:
    rows = [dict(run=run, point=t, dataset=d, role=role, metric=m, value=v)
            for (d, role, m), vals in VALUES.items() for t, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_summary_matches_hand_computation():
    s = metrics.summarize(hand_table()).set_index("point")
    assert s["A_KA"].tolist() == pytest.approx([0.3, 0.6, 0.6])
    assert s["A_ZS"].tolist() == pytest.approx([0.7, 0.6, 0.5])
    assert s["GM"].tolist() == pytest.approx([math.sqrt(0.21), 0.6, math.sqrt(0.3)])


def test_trajectory_means_and_final_point():
    m = metrics.trajectory_means(metrics.summarize(hand_table())).iloc[0]
    assert m["points"] == 3
    assert m["mean_A_KA"] == pytest.approx(0.5)
    assert m["mean_A_ZS"] == pytest.approx(0.6)
    assert m["mean_GM"] == pytest.approx((math.sqrt(0.21) + 0.6 + math.sqrt(0.3)) / 3)
    assert (m["final_A_KA"], m["final_A_ZS"]) == pytest.approx((0.6, 0.5))


def test_forgetting_and_backward_transfer():
    f = metrics.forgetting(hand_table(), learned_at={"A1": 1, "A2": 2}).set_index("dataset")
    assert f.loc["A1", "forgetting"] == pytest.approx(0.6 - 0.4)
    assert f.loc["A2", "forgetting"] == pytest.approx(0.6 - 0.8)      # still improving: negative forgetting
    assert f.loc["E1", "forgetting"] == pytest.approx(0.8 - 0.9)
    assert f.loc["E2", "forgetting"] == pytest.approx(0.6 - 0.1)
    assert f.loc["A1", "backward_transfer"] == pytest.approx(0.4 - 0.6)
    assert math.isnan(f.loc["A2", "backward_transfer"])               # learned in the last task: no BWT (GEM)
    assert f.loc["E2", "backward_transfer"] == pytest.approx(0.1 - 0.6)  # eval-only: against zero-shot
    assert math.isnan(metrics.forgetting(hand_table()).set_index("dataset").loc["A1", "backward_transfer"])


def test_missing_role_gives_nan_not_a_crash():
    df = hand_table()
    s = metrics.summarize(df[df["role"] == "adapt"])
    assert s["A_ZS"].isna().all() and s["GM"].isna().all()
    assert s["A_KA"].tolist() == pytest.approx([0.3, 0.6, 0.6])


def test_stream_cut_and_learned_at():
    entries = ["A+++x", "A+++y", "B+++z", "C+++w", "A+++v"]  # T=2 -> sizes 3, 2
    tasks = metrics.stream_task_datasets(entries, 2)
    assert tasks == [["A", "B"], ["A", "C"]]
    assert metrics.learned_at_points(tasks) == {"A": 2, "B": 1, "C": 2}
    with pytest.raises(MetricsError, match="num_tasks=6"):
        metrics.stream_task_datasets(entries, 6)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_save_load_roundtrip(tmp_path, suffix):
    df = hand_table()
    path = metrics.save_results(df, tmp_path / f"results{suffix}")
    back = metrics.load_results(path)
    pd.testing.assert_frame_equal(metrics.summarize(back), metrics.summarize(df))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_bad_tables_are_named(tmp_path):
    df = hand_table()
    with pytest.raises(MetricsError, match=r"lacks column\(s\) \['role'\]"):
        metrics.summarize(df.drop(columns="role"))
    with pytest.raises(MetricsError, match="'pool'"):
        metrics.summarize(df.assign(role=df["role"].replace("eval", "pool")))
    with pytest.raises(MetricsError, match="duplicate rows .*dataset='A1'"):
        metrics.summarize(pd.concat([df, df[df["dataset"] == "A1"].head(1)]))
    with pytest.raises(MetricsError, match="not found"):
        metrics.load_results(tmp_path / "nope.parquet")


def test_score_command_prints_the_numbers(tmp_path, capsys):
    path = metrics.save_results(pd.concat([hand_table("r1"), hand_table("r2")]), tmp_path / "results.parquet")
    assert score_main([str(path), "--run", "r2"]) == 0
    out = capsys.readouterr().out
    assert "run r2" in out and "run r1" not in out
    assert " 45.83" in out            # GM at point 0 = sqrt(.21)
    assert "mean   50.00   60.00" in out
    assert score_main([str(path), "--run", "zzz"]) == 2
    assert "run 'zzz' not in" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_tidy_table_names_the_prompts_and_older_tables_still_load(tmp_path, suffix):
    from fomo_ray.models.metrics import COLUMNS, tidy_frame

    records = [dict(run="r", point=0, dataset="C", role="eval", metric="top1", value=0.5, prompts="openai_imagenet"),
               dict(run="r", point=0, dataset="S", role="eval", metric="R@5", value=0.3, prompts="captions"),
               dict(run="r", point=0, dataset="D", role="adapt", metric="top1", value=0.4)]  # names no prompts
    df = tidy_frame(records)
    assert list(df.columns) == list(COLUMNS) and "prompts" in COLUMNS
    assert df["prompts"].tolist() == ["openai_imagenet", "captions", "primer"]
    back = metrics.load_results(metrics.save_results(df, tmp_path / f"t{suffix}"))
    assert back["prompts"].tolist() == df["prompts"].tolist()
    # a table written before the column existed: its zero-shot used the primer, its retrieval the captions
    old = df.drop(columns=["prompts", "eval_set"])
    old.to_csv(tmp_path / "old.csv", index=False)
    loaded = metrics.load_results(tmp_path / "old.csv")
    assert loaded["prompts"].tolist() == ["primer", "captions", "primer"]
    assert metrics.summarize(loaded).iloc[0][["A_KA", "A_ZS"]].tolist() == pytest.approx([0.4, 0.4])


# --------------------------------------------------------------------------------------------------- older tables
# Issue 30, item 2: the evaluation point's column is ``point``; tables written before the rename call it ``task``
# (the word that now means only a task index) and must still load, through the public readers, with ``point``.
def _old(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as fomo_ray wrote it before the rename: the evaluation point in a ``task`` column."""
    assert "task" not in df.columns
    return df.rename(columns={"point": "task"})


def test_the_tables_name_the_evaluation_point_point():
    from fomo_ray import trial_report

    assert "point" in metrics.COLUMNS and "task" not in metrics.COLUMNS
    assert list(metrics.summarize(hand_table()).columns) == ["run", "point", "A_KA", "A_ZS", "GM"]
    assert list(metrics.headline(hand_table()).columns) == ["run", "point", "dataset", "role", "value"]
    report = trial_report.eval_report(2, [], {"A_KA": 0.1, "A_ZS": 0.2, "GM": 0.3})
    assert report["point"] == 2 and "task" not in report
    # a checkpoint's cursor stays (task, step): the task index and the step within it
    assert {"task": 1, "step": 4}.items() <= trial_report.checkpoint_report(1, 4, {}).items()


def test_with_point_column_renames_only_a_table_written_before_the_rename():
    old = _old(hand_table())
    new = metrics.with_point_column(old)
    assert "task" not in new.columns and new["point"].tolist() == old["task"].tolist()
    assert list(new.columns) == list(hand_table().columns)  # in place: the column keeps its position
    current = hand_table().assign(task=7)  # a table that has a point column keeps any other column as it is
    assert metrics.with_point_column(current) is current
    assert metrics.with_point_key([{"run": "r", "task": 2, "value": 0.5}]) == [{"run": "r", "point": 2, "value": 0.5}]
    assert metrics.with_point_key([{"point": 1, "task": 0}]) == [{"point": 1, "task": 0}]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_run_table_written_before_the_rename_still_loads(tmp_path, suffix):
    import fomo_ray

    old = _old(hand_table())
    run_dir = tmp_path / "runs" / "old_run"
    run_dir.mkdir(parents=True)
    path = run_dir / f"results{suffix}"  # what `fomo-ray run` wrote
    old.to_parquet(path, index=False) if suffix == ".parquet" else old.to_csv(path, index=False)
    for back in (metrics.load_results(path), fomo_ray.load_results(run_dir).tidy, fomo_ray.load_results(path).tidy):
        assert "task" not in back.columns and back["point"].tolist() == old["task"].tolist()
    pd.testing.assert_frame_equal(metrics.summarize(metrics.load_results(path)), metrics.summarize(hand_table()))
    assert fomo_ray.load_results(run_dir).points["point"].tolist() == [0, 1, 2]
    assert score_main([str(path)]) == 0  # `fomo-ray score` reads it too


def test_a_sweep_written_before_the_rename_still_loads(tmp_path):
    """A sweep directory whose results.csv (trial x point) and tidy.csv have the point under ``task``: the report's
    reader, ``fomo_ray.load_results`` and the stopping rule's history of a resumed sweep all see ``point``."""
    import fomo_ray
    from fomo_ray.planning.stopping import history_from_results
    from fomo_ray.planning.sweep_spec import spec_from_dict
    from fomo_ray.planning.sweep_state import stopping_history
    from fomo_ray.results.report import load_sweep_tables

    directory = tmp_path / "sweeps" / "old_sweep"
    directory.mkdir(parents=True)
    tidy = pd.concat([hand_table("000-a"), hand_table("001-b")], ignore_index=True)
    results = metrics.summarize(tidy).assign(trial_id=lambda d: d["run"].str[:3], status="finished")
    _old(tidy).to_csv(directory / "tidy.csv", index=False)
    _old(results).to_csv(directory / "results.csv", index=False)
    pd.DataFrame({"run": ["000-a", "001-b"], "trial_id": ["000", "001"], "status": "finished",
                  "reason": ""}).to_csv(directory / "trials.csv", index=False)

    loaded, trials, _ = load_sweep_tables(directory)
    assert "task" not in loaded.columns and loaded["point"].tolist() == tidy["point"].tolist()
    assert list(trials["run"]) == ["000-a", "001-b"]
    res = fomo_ray.load_results("old_sweep", output_dir=tmp_path)
    pd.testing.assert_frame_equal(res.points.drop(columns="unit"), metrics.summarize(tidy))
    assert list(res.table["status"]) == ["finished", "finished"]
    spec = spec_from_dict({"name": "old_sweep", "stopping": {"rule": "median", "min_tasks": 1}})
    history = stopping_history(directory, spec)
    assert history == history_from_results(results, "GM") and sorted(history) == ["000-a", "001-b"]
    assert sorted(history["000-a"]) == [0, 1, 2]
