"""Reports from a saved tidy results table: the numbers in the table, the Pareto front, the files and the CLI."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from fomo_ray.results import report
from fomo_ray.cli.report import main as report_main
from fomo_ray.models.metrics import save_results

PNG = b"\x89PNG\r\n\x1a\n"


def _tidy() -> pd.DataFrame:
    """Three runs x 3 evaluation points; adapt: CLS (top1) and RET (retrieval, R@5 counts); eval: ZS (top1)."""
    values = {  # run: [(CLS, RET R@5, ZS) per point]
        "a": [(0.2, 0.4, 0.9), (0.5, 0.6, 0.8), (0.7, 0.8, 0.6)],
        "b": [(0.2, 0.4, 0.9), (0.4, 0.5, 0.88), (0.5, 0.6, 0.85)],
        "c": [(0.2, 0.4, 0.9), (0.3, 0.4, 0.7), (0.4, 0.5, 0.5)],  # dominated by b
    }
    rows = []
    for run, pts in values.items():
        for t, (cls, ret, zs) in enumerate(pts):
            rows += [(run, t, "CLS", "adapt", "top1", cls), (run, t, "RET", "adapt", "R@5", ret),
                     (run, t, "RET", "adapt", "R@1", ret / 2), (run, t, "ZS", "eval", "top1", zs)]
    return pd.DataFrame(rows, columns=["run", "point", "dataset", "role", "metric", "value"])


def _trials() -> pd.DataFrame:
    return pd.DataFrame({"run": ["a", "b", "c"], "status": ["finished"] * 3, "reason": ["", "", ""],
                         "method.merge.weight": [float("nan"), 0.5, 0.9], "variant": ["finetune", "w0.5", "w0.9"]})


def test_pareto_mask():
    assert report.pareto_mask([1, 2, 3], [3, 2, 1]) == [True, True, True]
    assert report.pareto_mask([1, 2, 1], [1, 2, 2]) == [False, True, False]
    assert report.pareto_mask([1, 1], [1, 1]) == [True, True]  # equal points do not dominate each other


def test_trial_table_numbers():
    table = report.trial_table(_tidy(), _trials()).set_index("run")
    # final A_KA of a = mean(CLS 0.7, RET R@5 0.8); A_ZS = 0.6; GM = sqrt(0.75 * 0.6)
    assert table.loc["a", "final_A_KA"] == pytest.approx(0.75)
    assert table.loc["a", "final_A_ZS"] == pytest.approx(0.6)
    assert table.loc["a", "final_GM"] == pytest.approx(math.sqrt(0.75 * 0.6))
    # trajectory mean over the 3 points (zero-shot point included)
    assert table.loc["b", "mean_A_KA"] == pytest.approx((0.3 + 0.45 + 0.55) / 3)
    assert table.loc["b", "mean_A_ZS"] == pytest.approx((0.9 + 0.88 + 0.85) / 3)
    assert table["pareto"].to_dict() == {"a": True, "b": True, "c": False}
    assert table.loc["b", "method.merge.weight"] == 0.5 and table.loc["b", "variant"] == "w0.5"
    assert list(report.trial_table(_tidy()).run) == ["b", "a", "c"]  # best final GM first


def test_format_table_in_percent():
    md = report.format_table(report.trial_table(_tidy(), _trials()))
    assert "| run | method.merge.weight | variant | status | final A_KA |" in md
    assert "| a |  | finetune | finished | 75.0 | 60.0 |" in md


def test_build_report_writes_table_and_plots(tmp_path):
    files = report.build_report(_tidy(), _trials(), tmp_path / "rep", x_key="method.merge.weight")
    names = sorted(f.name for f in files)
    assert names == ["pareto.png", "table.csv", "table.md", "trajectories.png", "vs_weight.png"]
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG and f.stat().st_size > 10_000
    saved = pd.read_csv(tmp_path / "rep" / "table.csv")
    assert list(saved["run"]) == ["b", "a", "c"]
    assert not list((tmp_path / "rep").glob(".*"))  # no temp files left behind


def test_unknown_x_key_is_named(tmp_path):
    with pytest.raises(report.ReportError, match="'optimizer.lr'"):
        report.build_report(_tidy(), _trials(), tmp_path, x_key="optimizer.lr")


def test_cli_from_a_saved_table(tmp_path, capsys):
    path = save_results(_tidy(), tmp_path / "results.csv")
    assert report_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| a | finished | 75.0 | 60.0 |" in out and "trajectories.png" in out
    assert (tmp_path / "report" / "pareto.png").is_file()


def test_cli_from_a_sweep_directory(tmp_path, capsys):
    save_results(_tidy(), tmp_path / "tidy.csv")
    _trials().to_csv(tmp_path / "trials.csv", index=False)
    assert report_main([str(tmp_path), "--x", "method.merge.weight"]) == 0
    assert (tmp_path / "report" / "vs_weight.png").is_file()


def test_cli_names_a_missing_table(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_only_finished_trials_have_final_scores_and_enter_the_pareto_front():
    """Issue 14: an interrupted or failed trial's last point is not its final one: no final / mean scores, never on
    the Pareto front, its status in the table."""
    from fomo_ray.results.report import format_table, trial_table

    rows = []
    for run, ka, zs in (("done", 0.3, 0.6), ("cut", 0.9, 0.9), ("bad", 0.95, 0.95)):
        for point in (0, 1):
            rows += [{"run": run, "point": point, "dataset": "A", "role": "adapt", "metric": "top1", "value": ka},
                     {"run": run, "point": point, "dataset": "E", "role": "eval", "metric": "top1", "value": zs}]
    trials = pd.DataFrame({"run": ["done", "cut", "bad"], "status": ["finished", "interrupted", "failed"],
                           "reason": ["", "", "TrainingDiverged"]})
    table = trial_table(pd.DataFrame(rows), trials).set_index("run")
    assert table.loc["done", "pareto"] and not table.loc["cut", "pareto"] and not table.loc["bad", "pareto"]
    assert table.loc[["cut", "bad"], ["final_GM", "mean_GM"]].isna().all().all()
    assert table.loc["done", "final_A_KA"] == pytest.approx(0.3)
    text = format_table(trial_table(pd.DataFrame(rows), trials))
    assert "| interrupted |" in text and "| failed |" in text and "n/a" in text
