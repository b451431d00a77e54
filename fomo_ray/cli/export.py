"""``fomo-ray export RUN --out DIR [--tracking-uri URI] [--config PATH]``: a run's deployed model in open_clip's format."""
from __future__ import annotations

import sys

from fomo_ray.cli.text import Parser


def main(argv: list[str] | None = None) -> int:
    """Write the deployed model of RUN (what the run serves after its last task: merged for merge methods, adapters
    merged for peft methods) to DIR in open_clip's own format, loadable by open_clip without fomo_ray. RUN is a
    `fomo-ray run` output directory, a sweep's trial directory (its newest checkpoint), a directory holding
    loop_state.pt (or that file), an earlier export, or an MLflow run id / runs:/<id> (with --tracking-uri or
    MLFLOW_TRACKING_URI; without either, the store of the sweeps under --output-dir that holds it)."""
    from fomo_ray.api import recorded_store
    from fomo_ray.results.export import INFO_FILE, ExportError, export, load_lines

    p = Parser(prog="fomo-ray export", description=main.__doc__)
    p.add_argument("run", help="run directory, loop_state.pt (or its directory), export directory or MLflow run id")
    p.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier export)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI, for an MLflow run id")
    p.add_argument("--output-dir", default="runs",
                   help="where sweeps recorded their MLflow stores, for a bare run id (default: runs)")
    p.add_argument("--config", default=None,
                   help="the run's config (config.json or YAML) when none lies beside its loop_state.pt")
    args = p.parse_args(argv)
    try:
        uri = args.tracking_uri or recorded_store(args.run, args.output_dir)
        out = export(args.run, args.out, tracking_uri=uri or None, config=args.config)
    except ValueError as e:  # ExportError, and ConfigError / BackboneError from the run's config: bad input
        print(f"fomo-ray export: {e if isinstance(e, ExportError) else f'{type(e).__name__}: {e}'}", file=sys.stderr)
        return 2
    files = sorted(f.name for f in out.iterdir() if f.is_file())
    print(f"wrote {out.resolve()}: {', '.join(files)}")
    print(f"(provenance in {INFO_FILE}) load it with open_clip:")
    for line in load_lines(out):
        print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
