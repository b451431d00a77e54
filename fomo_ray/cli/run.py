"""``fomo-ray run [config.yaml] [dotted.key=value ...]``: one continual run of the loop, plain PyTorch, no Ray."""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("fomo_ray.run")


def input_errors() -> tuple[type[Exception], ...]:
    """The error types that mean bad input (config, data, backbone, budget, merge, evaluation, pretraining), not a
    bug: the command prints them in one line instead of a traceback."""
    from fomo_ray.backbones import BackboneError
    from fomo_ray.budget import BudgetError
    from fomo_ray.config import ConfigError
    from fomo_ray.data.format import DataError
    from fomo_ray.evaluation import EvaluationError
    from fomo_ray.merge_ops import MergeError
    from fomo_ray.prep.pretrain import PretrainError

    return ConfigError, DataError, BackboneError, BudgetError, MergeError, EvaluationError, PretrainError


def main(argv: list[str] | None = None) -> int:
    """``fomo-ray run [config.yaml] [dotted.key=value ...]``: one continual run; prints the A_KA / A_ZS / GM table
    and writes ``<output_dir>/<run name>/results.parquet`` (task-end states go to ``.../state`` for ``--resume``).
    Missing inputs (FiF-mini, the tiny base) are prepared first."""
    from fomo_ray.assembly import run_name
    from fomo_ray.atomic import write_json
    from fomo_ray.checkpoint import LOOP_STATE_FILE, load_state, save_state
    from fomo_ray.config import ConfigError, load_config, to_dict
    from fomo_ray.loop import RunHooks, TrainingDiverged, run_stream
    from fomo_ray.metrics import format_report, save_results
    from fomo_ray.prep import ensure_inputs

    p = argparse.ArgumentParser(prog="fomo-ray run", description=main.__doc__)
    p.add_argument("args", nargs="*", help="an optional experiment YAML, then dotted overrides (optimizer.lr=1e-4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/<run name>/state if present")
    args = p.parse_args(argv)
    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if config else args.args
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"fomo-ray run: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir) / run_name(cfg)
    created = not out.exists()  # a run refused for bad input must not leave a directory that looks like a run
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg), indent=2, sort_keys=True)
    resume = load_state(out / "state") if args.resume and (out / "state" / LOOP_STATE_FILE).is_file() else None
    hooks = RunHooks(on_checkpoint=lambda state: save_state(state, out / "state"),
                     on_eval=lambda point, recs: log.info("evaluation point %d: %d records", point, len(recs)))
    try:
        ensure_inputs(cfg)
        df = run_stream(cfg, hooks=hooks, resume=resume, device=args.device)
    except TrainingDiverged as e:
        write_json(out / "FAILED.json", {"status": "failed", "task": e.task, "step": e.step, "error": str(e)},
                   indent=2, sort_keys=True)
        print(f"fomo-ray run: {e}", file=sys.stderr)
        return 1
    except input_errors() as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        print(f"fomo-ray run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    path = save_results(df, out / "results.parquet")
    print(format_report(df))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
