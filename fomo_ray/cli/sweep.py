"""``fomo-ray sweep SWEEP.yaml [key=value ...]`` and the ``experiments/*.py`` scripts: flags -> sweep spec -> run ->
summary.

Each experiment script is three lines: it names its sweep YAML and calls :func:`experiment_main`. Flags map onto
dotted config overrides (``--backbone ViT-B-16`` is ``backbone.name=ViT-B-16``), and any ``key=value`` argument is
passed through, so everything in ``fomo_ray.config`` can be set from the command line. ``--dry-run`` validates every
trial's config and lists the trials without importing Ray (``fomo_ray.planning.sweep_spec``); only a real run loads it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from fomo_ray.cli.text import Parser
from fomo_ray.config import FLAG_KEYS, ConfigError, parse_override
from fomo_ray.planning.sweep_budget import SweepBudgetError, parse_sweep_budget
from fomo_ray.planning.sweep_spec import SweepError, SweepSpec, load_sweep
from fomo_ray.trial_report import TrialStatus


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted config overrides for every trial, e.g. optimizer.lr=1e-4 stream.num_tasks=8")
    g = ap.add_argument_group("data and model")
    g.add_argument("--preset", help="run the study at a preset's scale: 'paper' = the paper's setting "
                                    "(experiments/configs/presets/paper.yaml: ViT-B-16, batch 512, T 20, lr 1e-5, "
                                    "28,400 fine-tuning steps, bf16), or a preset YAML file; flags still win")
    g.add_argument("--keep-sizing", action="store_true",
                   help="run a sweep sized for the tiny CPU models on a real backbone as it is (refused otherwise)")
    g.add_argument("--data-root", help="converted benchmark directory (data.root)")
    g.add_argument("--benchmark", choices=["fifmini", "fif"], help="embedded FiF-mini or converted real FiF data")
    g.add_argument("--backbone", help="open_clip architecture, e.g. fomo-tiny-s (CPU) or ViT-B-16")
    g.add_argument("--pretrained", help="open_clip tag or checkpoint file ('auto': cached tiny base)")
    g.add_argument("--num-tasks", type=int, help="T, tasks the stream is cut into")
    g = ap.add_argument_group("Ray")
    g.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    g.add_argument("--gpus-per-trial", type=float, help="GPUs per trial worker; 0.5 packs two trials per GPU")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs per trial worker")
    g.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (>1: DDP TorchTrainer)")
    g.add_argument("--max-concurrent", type=int, help="cap on concurrent trials (default: as resources allow)")
    g.add_argument("--storage-path", help="shared storage for checkpoints (required on multi-node clusters)")
    g.add_argument("--trainer", choices=["auto", "train", "function"], help="how a trial hosts its run")
    g = ap.add_argument_group("sweep")
    g.add_argument("--name", help="sweep name (its directory under OUTPUT_DIR/sweeps)")
    g.add_argument("--output-dir", help="where sweeps, the MLflow database and reports go (default: runs)")
    g.add_argument("--search", choices=["grid", "random", "optuna"], help="search algorithm")
    g.add_argument("--num-samples", type=int, help="samples per grid point / trials for random and optuna")
    g.add_argument("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or OUTPUT_DIR/mlflow.db)")
    g.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument("--fresh", action="store_true", help="start a new directory even if an interrupted one exists")
    ex.add_argument("--resume", action="store_true", help="require an interrupted sweep to resume")
    g.add_argument("--dry-run", action="store_true",
                   help="validate the configs and inputs as a real sweep does before launch, list the trials and "
                        "print their cost estimate; start nothing, write nothing")
    g.add_argument("--no-input-check", action="store_true",
                   help="with --dry-run: skip the input check (the cost estimate before the data is downloaded)")
    g.add_argument("--order", choices=["cost", "fifo"],
                   help="start order: longest trial first by estimated cost (default), or the grid's order")
    g.add_argument("--seeds", type=int, metavar="N",
                   help="run every variant over N seeds (seed, seed+1, ...); the report adds means and 95%% "
                        "confidence intervals per variant and paired differences to fine-tuning")
    g.add_argument("--max-gpu-hours", type=float, metavar="H",
                   help="sweep budget: start trials only while they fit H GPU-hours (CPU workers count as devices)")
    g.add_argument("--max-pflops", type=float, metavar="F", help="sweep budget in PFLOPs of the budget's count")
    g = ap.add_argument_group("cost estimate (default: timed on this machine's device)")
    g.add_argument("--device-tflops", type=float,
                   help="estimate for a declared device of this peak TFLOP/s at the run's precision instead, "
                        "e.g. 989 for an H100 in bf16 (with --mfu)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation the declared device reaches, e.g. 0.4")
    g = ap.add_argument_group("output")
    g.add_argument("--show-worker-logs", action="store_true", help="forward every Ray worker's log lines")
    g.add_argument("--no-cache", action="store_true",
                   help="run every trial, also one that an identical finished trial in OUTPUT_DIR/trial_cache "
                        "(same config and seed, same clean commit) would replay")


def spec_from_args(sweep_file: str | Path, args: argparse.Namespace) -> SweepSpec:
    """The sweep spec with the flags applied (as base overrides)."""
    extra: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            extra[key] = value
    if args.no_mlflow:
        extra["tracking.enabled"] = False
    spec = load_sweep(sweep_file, extra, preset=getattr(args, "preset", None) or "")
    changes = {k: getattr(args, k) for k in ("name", "search", "num_samples", "trainer", "order", "seeds")
               if getattr(args, k, None) is not None}
    if getattr(args, "keep_sizing", False):
        changes["keep_sizing"] = True
    limits = {u: getattr(args, f"max_{u}", None) for u in ("gpu_hours", "pflops")}
    given = {u: v for u, v in limits.items() if v is not None}
    if given:
        if len(given) > 1:
            raise SweepError("--max-gpu-hours and --max-pflops: give one sweep budget, not both")
        try:
            changes["sweep_budget"] = parse_sweep_budget(given, "--max-" + next(iter(given)).replace("_", "-"))
        except SweepBudgetError as e:
            raise SweepError(str(e)) from e
    return replace(spec, **changes) if changes else spec


def declared_device(args: argparse.Namespace) -> Any:
    """The device ``--device-tflops``/``--mfu`` declare (both or neither), or None: time this machine's device."""
    from fomo_ray.planning.cost_estimate import DeclaredDevice

    tflops, mfu = getattr(args, "device_tflops", None), getattr(args, "mfu", None)
    if (tflops is None) != (mfu is None):
        raise SweepError("--device-tflops and --mfu go together: the estimate needs the device's peak and the "
                         "share of it a run reaches (e.g. --device-tflops 989 --mfu 0.4 for an H100 in bf16)")
    return None if tflops is None else DeclaredDevice(tflops, mfu)


def print_dry_run(spec: SweepSpec, device: Any = None, check_inputs: bool = True) -> None:
    """Print what ``sweep_inputs.check_sweep`` finds: every trial validated (no Ray), its inputs checked as a real
    sweep checks them before launch (what the real sweep would prepare is listed), the tracking store reachable,
    the trials (the enumerated ones by label, the sampled dimensions by range) and the cost estimate. Nothing is
    written."""
    from fomo_ray.planning.sweep_inputs import check_sweep

    print(check_sweep(spec, device, check_inputs).text())


def run_cli(ap: argparse.ArgumentParser, argv: Sequence[str] | None, default_sweep: str | Path | None) -> int:
    from fomo_ray.planning.cost_estimate import EstimateError
    from fomo_ray.tracking.writer import TrackingError

    add_arguments(ap)
    if default_sweep is not None:
        ap.add_argument("--sweep", default=str(default_sweep), help=f"sweep YAML (default: {default_sweep})")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    prog = ap.prog
    try:
        spec = spec_from_args(args.sweep, args)
        device = declared_device(args)
        if args.dry_run:
            print_dry_run(spec, device, check_inputs=not args.no_input_check)
            return 0
        from fomo_ray.engine.tune_sweep import run_sweep  # Ray: only for a real run

        if_exists = "new" if args.fresh else "resume" if args.resume else "auto"
        out = run_sweep(spec, if_exists=if_exists, show_worker_logs=args.show_worker_logs, device=device,
                        use_cache=not args.no_cache)
    except (ConfigError, SweepError, TrackingError, EstimateError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the sweep's directory existed (inputs being prepared), or while reporting
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print_summary(out)
    if out.interrupted:
        return 3  # partial: resumable, nothing in it is final
    return 0 if out.trials.empty or (out.trials["status"] == TrialStatus.FINISHED).all() else 1


def print_summary(out: Any) -> None:
    """The results table and where everything is (``out``: a ``fomo_ray.results.sweep_results.SweepResult``)."""
    from fomo_ray.results.report import format_table, trial_table
    from fomo_ray.tracking.writer import DB_NAME

    from fomo_ray.results.sweep_results import format_counts, status_counts

    print()
    if not out.tidy.empty:
        table = trial_table(out.tidy, out.trials)
        print(format_table(table))
        print("(percent; final = after the last task, mean = over the trajectory incl. the zero-shot point, both on "
              "the fixed subsets every point shares; full-set = the full test sets after the last task; all only "
              "for finished trials; * = on the A_KA/A_ZS Pareto front of the finished trials)")
        print_variants(table, out.baseline)
    failed = out.trials[out.trials["status"] == TrialStatus.FAILED] if not out.trials.empty else out.trials
    for _, r in failed.iterrows():
        print(f"FAILED {r['run']}: {r['reason']}")
    print(f"\ntrials: {format_counts(status_counts(out.trials, out.total or len(out.trials)))}"
          + ("  (INTERRUPTED: partial results)" if out.interrupted else ""))
    estimated = f" (estimated {out.estimate_s / 60:.1f} min)" if getattr(out, "estimate_s", None) else ""
    print(f"wall time {out.wall_s / 60:.1f} min{estimated}")
    if getattr(out, "budget", ""):
        print(out.budget)
    from fomo_ray.results.sweep_results import compute_saved

    saved = compute_saved(out.trials)
    if saved is not None:
        print(f"early stopping saved {100 * saved:.0f}% of the estimated compute of the trials that ended")
    print(f"sweep directory     {out.directory}")
    for name in ("results.csv", "tidy.csv", "trials.csv"):
        if (out.directory / name).is_file():
            print(f"  {name:<18}{out.directory / name}")
    for f in out.report_files:
        print(f"  {f.name:<18}{f}")
    if out.tracking_uri:
        print(f"MLflow              {out.tracking_uri}  (parent run {out.parent_run_id})")
        if out.tracking_uri.endswith(DB_NAME):
            out_dir = Path(out.tracking_uri[len("sqlite:///"):]).parent
            print(f"  browse with       fomo-ray ui --output-dir {out_dir}")


def print_variants(table: Any, baseline: str = "") -> None:
    """With several seeds per variant: the variants' means ± 95% confidence intervals, and each variant minus
    ``baseline`` (default fine-tuning) paired by seed (``fomo_ray.maths.aggregate``); nothing for a single-seed
    sweep."""
    from fomo_ray.maths.aggregate import compare_to_baseline, seeds_per_variant, variant_table
    from fomo_ray.results.report import format_comparison, format_variants

    if seeds_per_variant(table) < 2:
        return
    print()
    print(format_variants(variant_table(table)))
    print("(percent; mean over the finished seeds ± the half-width of its 95% Student-t confidence interval)")
    print()
    print(format_comparison(*compare_to_baseline(table, baseline)))
    print("(percentage points: variant minus baseline, paired by seed over the seeds both finished, ± 95% CI)")


def main(argv: Sequence[str] | None = None) -> int:
    """``fomo-ray sweep SWEEP.yaml [key=value ...]``: run (or resume) a sweep."""
    ap = Parser(prog="fomo-ray sweep", description=main.__doc__)
    ap.add_argument("sweep", help="sweep YAML (see experiments/configs/)")
    return run_cli(ap, argv, default_sweep=None)


def experiment_main(default_sweep: str | Path, argv: Sequence[str] | None = None, description: str = "") -> int:
    """Entry point of an ``experiments/*.py`` script: the same command with the script's sweep YAML as default."""
    ap = Parser(prog=Path(sys.argv[0]).name, description=description)
    return run_cli(ap, argv, default_sweep)
