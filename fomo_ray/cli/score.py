"""``fomo-ray score PATH``: A_KA / A_ZS / GM per evaluation point, their means, forgetting and BWT."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fomo_ray.cli.text import Parser


def main(argv: list[str] | None = None) -> int:
    """``fomo-ray score PATH``: print A_KA / A_ZS / GM per evaluation point, their means, forgetting and BWT."""
    from fomo_ray.data.format import DataError
    from fomo_ray.models.metrics import MetricsError, format_report, learned_at_points, stream_task_datasets
    from fomo_ray.results.report import ReportError, load_sweep_tables

    p = Parser(prog="fomo-ray score", description=main.__doc__)
    p.add_argument("table", help="a sweep directory, a `fomo-ray run` directory, or a tidy results table "
                                 "(.parquet or .csv: run, point, dataset, role, metric, value)")
    p.add_argument("--run", default="", help="only this run (default: every run in the table)")
    p.add_argument("--stream", default="", help="stream JSON the runs used; enables backward transfer of adapt sets")
    p.add_argument("--num-tasks", type=int, default=0, help="T the stream was cut into (with --stream)")
    args = p.parse_args(argv)
    try:
        df = load_sweep_tables(Path(args.table))[0]
        if args.run:
            if args.run not in set(df["run"]):
                raise MetricsError(f"run {args.run!r} not in {args.table}; runs: {sorted(set(df['run']))}")
            df = df[df["run"] == args.run]
        learned_at = None
        if args.stream:
            if args.num_tasks < 1:
                raise MetricsError("--stream needs --num-tasks (the T the runs used)")
            entries = json.loads(Path(args.stream).read_text())
            learned_at = learned_at_points(stream_task_datasets(entries, args.num_tasks))
        print(format_report(df, learned_at))
    except (MetricsError, ReportError, DataError, OSError, json.JSONDecodeError) as e:
        print(f"fomo-ray score: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
