"""``fomo-ray report PATH``: the results table and plots of a sweep directory or a tidy results table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from fomo_ray.cli.text import Parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray report PATH``: table + plots from a sweep directory or a tidy results table."""
    import pandas as pd

    from fomo_ray.models.metrics import MetricsError
    from fomo_ray.results.report import ReportError, build_report, load_sweep_tables

    ap = Parser(prog="fomo-ray report", description=main.__doc__)
    ap.add_argument("path", help="a sweep directory (tidy.csv, trials.csv), a `fomo-ray run` directory, or a tidy table "
                                 "(.csv / .parquet)")
    ap.add_argument("--trials", default="", help="trials table with swept values per run (default: beside PATH)")
    ap.add_argument("--out", default="", help="output directory (default: PATH/report or beside the table)")
    ap.add_argument("--x", default="", help="numeric swept key to plot final scores against (e.g. method.merge.weight)")
    ap.add_argument("--baseline", default="", help="variant label (or label part, e.g. cosine) that vs_baseline.md "
                                                   "subtracts (default: the sweep's report.baseline, else fine-tuning)")
    ap.add_argument("--mlflow", action="store_true", help="attach the files to the sweep's MLflow parent run")
    args = ap.parse_args(argv)
    path = Path(args.path)
    try:
        tidy, trials, summary = load_sweep_tables(path)
        if args.trials:
            trials = pd.read_csv(args.trials)
        out = Path(args.out) if args.out else (path / "report" if path.is_dir() else path.parent / "report")
        files = build_report(tidy, trials, out, x_key=args.x or summary.get("report_x", ""),
                             baseline=args.baseline or summary.get("report_baseline", ""))
    except (ReportError, MetricsError, OSError) as e:
        print(f"fomo-ray report: {e}", file=sys.stderr)
        return 2
    print((out / "table.md").read_text())
    for f in files:
        print(f"wrote {f}")
    if args.mlflow:
        if not summary.get("parent_run_id"):
            print("fomo-ray report: --mlflow needs a sweep directory with summary.json", file=sys.stderr)
            return 2
        from fomo_ray.tracking.writer import Tracker

        tracker = Tracker(summary["tracking_uri"], summary.get("experiment", "fomo_ray"))
        tracker.log_artifacts(summary["parent_run_id"], out, artifact_path="report")
        print(f"attached to MLflow run {summary['parent_run_id']} at {summary['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
