"""``fomo-ray run [config.yaml] [dotted.key=value ...]``: one continual run of the loop, plain PyTorch, no Ray."""
from __future__ import annotations

import sys

from fomo_ray.cli.text import Parser


def main(argv: list[str] | None = None) -> int:
    """``fomo-ray run [config.yaml] [dotted.key=value ...]``: one continual run; prints the A_KA / A_ZS / GM table
    and writes ``<output_dir>/<run name>/results.parquet`` (task-end states go to ``.../state`` for ``--resume``) and
    the deployed model in open_clip's format to ``.../model``. Missing inputs (FiF-mini, the tiny base) are prepared
    first; with ``tracking.enabled`` the run is logged to MLflow."""
    from fomo_ray.config import ConfigError, load_config
    from fomo_ray.engine.local_run import execute_run, input_errors, tracking_errors
    from fomo_ray.core.loop import TrainingDiverged
    from fomo_ray.models.metrics import format_report

    p = Parser(prog="fomo-ray run", description=main.__doc__)
    p.add_argument("args", nargs="*", help="an optional experiment YAML, then dotted overrides (optimizer.lr=1e-4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/<run name>/state if present")
    p.add_argument("--output-dir", default=None,
                   help="where the run's directory and the MLflow database go (output_dir=; as for sweep and ui)")
    args = p.parse_args(argv)
    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = (args.args[1:] if config else args.args) + (
        [f"output_dir={args.output_dir}"] if args.output_dir is not None else [])
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"fomo-ray run: {e}", file=sys.stderr)
        return 2
    try:
        run = execute_run(cfg, resume=args.resume, device=args.device, progress=lambda line: print(line, flush=True))
    except TrainingDiverged as e:
        print(f"fomo-ray run: {e}", file=sys.stderr)
        return 1
    except (*input_errors(), *tracking_errors(cfg)) as e:
        print(f"fomo-ray run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(format_report(run.results))
    print(f"results: {run.results_file}")
    if run.model_dir is None:
        print(f"fomo-ray run: the deployed model was not written ({run.export_error}); retry with: fomo-ray export "
              f"{run.directory} --out {run.directory / 'model'}", file=sys.stderr)
    else:
        print(f"model: {run.model_dir} (open_clip: create_model_and_transforms(\"local-dir:{run.model_dir.resolve()}\"))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
