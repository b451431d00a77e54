"""Bad inputs to the commands (issue 29): each ends with exit code 2 and one short line naming the culprit, and
nothing is left behind (no output directory, no partial report). One row per case: the command, its arguments,
what the line must say. (Sweep inputs are in tests/test_sweep.py: a real sweep and its dry run, side by side.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from fomo_ray.cli import main as fomo_ray_main
from fomo_ray.cli.export import main as export_main
from fomo_ray.cli.report import main as report_main
from fomo_ray.cli.run import main as run_main


def _garbage_state(tmp: Path) -> Path:
    (tmp / "state").mkdir()
    (tmp / "state" / "loop_state.pt").write_bytes(bytes(range(256)) * 4)
    return tmp / "state"


def _results_dir(tmp: Path) -> Path:
    from test_report import _tidy, _trials

    from fomo_ray.models.metrics import save_results

    save_results(_tidy(), tmp / "sweep" / "tidy.csv")
    _trials().to_csv(tmp / "sweep" / "trials.csv", index=False)
    return tmp / "sweep"


CASES = {  # name: (command, argv builder(tmp), expected text in the line, what must not exist afterwards)
    "unknown architecture": (run_main, lambda t: ["backbone.name=NotAModel", f"output_dir={t / 'out'}"],
                             "unknown architecture 'NotAModel'", "out"),
    "architecture typo": (run_main, lambda t: ["backbone.name=ViT-B-61", f"output_dir={t / 'out'}"],
                          "Did you mean ViT-B-16", "out"),
    "missing stream file": (run_main, lambda t: [f"stream.file={t / 'nope.json'}", f"output_dir={t / 'out'}"],
                            "config key 'stream.file': no such file", "out"),
    "missing checkpoint": (run_main, lambda t: [f"backbone.pretrained={t / 'nope.pt'}", f"output_dir={t / 'out'}"],
                           "checkpoint file not found", "out"),
    "garbage loop state": (export_main, lambda t: [str(_garbage_state(t)), "--out", str(t / "model")],
                           "is not a readable fomo_ray.loop_state/v1 file", "model"),
    "command typo": (fomo_ray_main, lambda t: ["swep", "--help"], "unknown command 'swep'. Did you mean sweep?",
                     "out"),
    "report key typo": (report_main, lambda t: [str(_results_dir(t)), "--x", "method.merge.weigth"],
                        "did you mean method.merge.weight", "sweep/report"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_ends_in_one_line_naming_the_culprit_and_leaves_nothing(case, tmp_path, capsys):
    command, argv, expected, absent = CASES[case]
    assert command(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and len(err) < 600, err
    assert not (tmp_path / absent).exists()
