"""Progress lines: what a sweep prints for its trials and `fomo-ray run` for its own points."""
from __future__ import annotations


def test_a_sweep_and_a_run_print_an_evaluation_point_alike():
    """The sweep's progress line and `fomo-ray run`'s share one formatter (trial_report.point_line)."""
    import io

    from fomo_ray import trial_report
    from fomo_ray.engine.tune_callbacks import Progress

    out = io.StringIO()
    result = {**trial_report.eval_report(3, [], {"A_KA": 0.139, "A_ZS": 0.801, "GM": 0.333}), "node_id": ""}
    Progress(total=2, points=8, out=out).on_trial_result(0, [], "000-ema", result)
    assert out.getvalue().split("] ", 1)[1] == "eval   000-ema  point 3/8  A_KA  13.9  A_ZS  80.1  GM  33.3\n"
    assert trial_report.point_line(3, 8, {"A_KA": 0.139, "A_ZS": 0.801, "GM": 0.333}) == \
        "point 3/8  A_KA  13.9  A_ZS  80.1  GM  33.3"
