"""``fomo-ray prepare``: build the embedded FiF-mini benchmark, convert real data, write stream files and token ids.

    fomo-ray prepare fifmini [--root data/fifmini] [--seed 0] [--image-size 32] [--scale 1] [--force]
    fomo-ray prepare fif ...      convert the real FoMo-in-Flux data   (fomo_ray.prep.convert_fif)
    fomo-ray prepare pool ...     convert web image-text shards to P  (fomo_ray.prep.convert_webdataset)
    fomo-ray prepare stream ...   write a stream ordering file        (fomo_ray.prep.stream_orderings)
    fomo-ray prepare tokens ...   add caption token ids to a root     (fomo_ray.prep.tokenize)

``fifmini``, ``fif`` and ``pool`` write the token ids of every caption for the default model's tokenizer and for each
``--model``; ``tokens`` adds them to a benchmark written by an older fomo_ray or for another model.

Each target's options and output live here; the work is done by the ``fomo_ray.prep`` module named beside it,
imported only when its target runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fomo_ray.cli.text import Parser

TARGETS: dict[str, tuple[str, str]] = {
    "fifmini": ("fomo_ray.cli.prepare:fifmini_main", "build (or reuse) the embedded FiF-mini benchmark"),
    "fif": ("fomo_ray.cli.prepare:fif_main", "convert the real FoMo-in-Flux datasets to FFCV"),
    "pool": ("fomo_ray.cli.prepare:pool_main", "convert webdataset image-text shards into a pool P"),
    "stream": ("fomo_ray.cli.prepare:stream_main", "write a FiF stream file for an ordering (random, similarity, ...)"),
    "tokens": ("fomo_ray.cli.prepare:tokens_main", "add the caption token ids of a model's tokenizer to a benchmark"),
}
_MODEL_HELP = ("also write caption token ids for this model's tokenizer (repeatable; the default model's are always "
               "written)")


def _summary(module) -> str:
    """A target's ``--help`` description: the first paragraph of the docstring of the module doing its work."""
    return (module.__doc__ or "").split("\n\n")[0]


def _models(given: list[str] | None) -> tuple[str, ...]:
    """The default model first (every run of the default config needs its tokens), then each ``--model``."""
    from fomo_ray.models.backbones import DEFAULT_ARCH

    return tuple(dict.fromkeys([DEFAULT_ARCH, *(given or [])]))


# --------------------------------------------------------------------------------------------------- fifmini
def fifmini_main(argv: list[str] | None = None) -> int:
    """``fomo-ray prepare fifmini``: build FiF-mini unless a matching build exists; print its dataset table."""
    from fomo_ray.prep.fifmini import describe, ensure_fifmini
    from fomo_ray.tables import format_table

    p = Parser(prog="fomo-ray prepare fifmini",
                                description="Build the embedded FiF-mini benchmark (deterministic, offline).")
    p.add_argument("--root", default="data/fifmini", help="output directory (default: data/fifmini)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: 32)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every dataset by this factor (default: 1)")
    p.add_argument("--workers", type=int, default=None, help="processes drawing the pool (default: up to 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    p.add_argument("--model", action="append", metavar="ARCH", help=_MODEL_HELP)
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        bench = ensure_fifmini(a.root, a.seed, a.image_size, a.force, a.scale, a.workers, models=_models(a.model))
    except ValueError as e:  # DataError, or BackboneError for an unknown --model
        print(f"fomo-ray prepare fifmini: {e}", file=sys.stderr)
        return 1
    print(format_table(describe(bench)))
    print(f"FiF-mini ready at {bench.root} (content hash {bench.content_hash[:16]}..., {time.time() - t0:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------------- fif
def _fif_parser() -> argparse.ArgumentParser:
    from fomo_ray.prep import convert_fif

    p = Parser(prog="fomo-ray prepare fif", description=_summary(convert_fif))
    p.add_argument("--root", required=True, help="FiF data root (one folder or .tar per dataset)")
    p.add_argument("--out", required=True, help="output benchmark root (betons + manifest)")
    p.add_argument("--info-dir", help="the authors' data_lib/00_info (default: <root>/00_info)")
    p.add_argument("--datasets", default="", help="comma-separated subset (default: all 63)")
    p.add_argument("--allow-missing", action="store_true", help="convert what is present, list what is not")
    p.add_argument("--image-size", type=int, default=224, help="stored square size (shorter side, centre crop)")
    p.add_argument("--no-prefer-224", action="store_true", help="read the original files even where _224 exists")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail a dataset above this fraction bad")
    p.add_argument("--jpeg-quality", type=int, default=95, help="staging JPEG quality (0 = lossless PNG)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="datasets converted in parallel")
    p.add_argument("--name", default="fif", help="benchmark name in the manifest")
    p.add_argument("--seed", type=int, default=0, help="seed of the default random/incremental streams")
    p.add_argument("--write-mode", choices=("jpg", "raw"), default="jpg", help="beton image storage")
    p.add_argument("--writer-workers", type=int, default=1, help="FFCV writer processes (1 = deterministic bytes)")
    p.add_argument("--pool", help="a pool root from `fomo-ray prepare pool`: embedded as this benchmark's pool "
                                  "split, so data.root alone serves a run")
    p.add_argument("--dry-run", action="store_true", help="check folders and info files, print the table, write nothing")
    p.add_argument("--model", action="append", metavar="ARCH", help=_MODEL_HELP)
    p.add_argument("--no-progress", action="store_true")
    return p


def _fif_options(args: argparse.Namespace):
    from fomo_ray.prep.convert_fif import Options
    from fomo_ray.prep.fif_sources import find_info_dir
    from fomo_ray.prep.staging import ConversionError

    root = Path(args.root)
    if not root.is_dir():
        raise ConversionError(f"FiF data root not found: {root}")
    if args.image_size < 8:
        raise ConversionError(f"--image-size must be >= 8, got {args.image_size}")
    return Options(root=root, out=Path(args.out), info_dir=find_info_dir(root, args.info_dir),
                   image_size=args.image_size, prefer_224=not args.no_prefer_224,
                   max_bad_fraction=args.max_bad_fraction, jpeg_quality=args.jpeg_quality, workers=args.workers,
                   allow_missing=args.allow_missing, name=args.name, seed=args.seed, progress=not args.no_progress,
                   write_mode=args.write_mode, writer_workers=args.writer_workers,
                   pool=Path(args.pool) if args.pool else None, models=_models(args.model))


def fif_main(argv: list[str] | None = None) -> int:
    """``fomo-ray prepare fif``: convert (or, with ``--dry-run``, check) FiF datasets; print the summary table."""
    from fomo_ray.data import fif_catalogue
    from fomo_ray.prep.convert_fif import ConversionFailed, convert, dry_run, format_summary
    from fomo_ray.prep.staging import ConversionError

    args = _fif_parser().parse_args(argv)
    t0 = time.time()
    try:
        opts = _fif_options(args)
        names = [fif_catalogue.resolve(n.strip()) for n in args.datasets.split(",") if n.strip()] or None
        rows = (dry_run if args.dry_run else convert)(opts, names)
    except ConversionFailed as e:
        print(format_summary(e.rows), file=sys.stderr)
        print(f"fomo-ray prepare fif: error: {e}\nFinished parts are kept; rerun to retry the failed datasets.",
              file=sys.stderr)
        return 1
    except (ConversionError, fif_catalogue.CatalogueError) as e:
        print(f"fomo-ray prepare fif: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(rows))
    print("dry run: nothing written" if args.dry_run else f"wrote {opts.out} in {time.time() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------------- pool
def _pool_parser() -> argparse.ArgumentParser:
    from fomo_ray.prep import convert_webdataset

    p = Parser(prog="fomo-ray prepare pool", description=_summary(convert_webdataset))
    p.add_argument("--shards", required=True, help="folder of webdataset .tar shards (img2dataset output)")
    p.add_argument("--out", required=True, help="output pool root (pool.beton + manifest); use as data.pool")
    p.add_argument("--max-samples", type=int, default=0, help="sample cap after de-duplication (0 = all)")
    p.add_argument("--image-size", type=int, default=224, help="stored square size (shorter side, centre crop)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="staging JPEG quality (0 = lossless PNG)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards converted in parallel")
    p.add_argument("--allow-gaps", action="store_true", help="accept non-contiguous shard names")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="fail a shard above this fraction corrupt")
    p.add_argument("--name", default="pool")
    p.add_argument("--write-mode", choices=("jpg", "raw"), default="jpg", help="beton image storage")
    p.add_argument("--writer-workers", type=int, default=1, help="FFCV writer processes (1 = deterministic bytes)")
    p.add_argument("--model", action="append", metavar="ARCH", help=_MODEL_HELP)
    p.add_argument("--no-progress", action="store_true")
    return p


def pool_main(argv: list[str] | None = None) -> int:
    """``fomo-ray prepare pool``: convert webdataset shards into a pool root; print what was kept and skipped."""
    from fomo_ray.prep.convert_webdataset import PoolOptions, convert_pool, format_report
    from fomo_ray.prep.staging import ConversionError

    args = _pool_parser().parse_args(argv)
    t0 = time.time()
    if args.image_size < 8 or args.max_samples < 0:
        print("fomo-ray prepare pool: error: --image-size must be >= 8 and --max-samples >= 0", file=sys.stderr)
        return 2
    opts = PoolOptions(shards=Path(args.shards), out=Path(args.out), max_samples=args.max_samples,
                       image_size=args.image_size, jpeg_quality=args.jpeg_quality, workers=args.workers,
                       allow_gaps=args.allow_gaps, max_bad_fraction=args.max_bad_fraction, name=args.name,
                       progress=not args.no_progress, write_mode=args.write_mode, writer_workers=args.writer_workers,
                       models=_models(args.model))
    try:
        report = convert_pool(opts)
    except ConversionError as e:
        print(f"fomo-ray prepare pool: error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {opts.out} in {time.time() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------------- stream
def _stream_parser() -> argparse.ArgumentParser:
    from fomo_ray.data import orderings
    from fomo_ray.prep.stream_orderings import BUILDERS

    p = Parser(prog="fomo-ray prepare stream", description=_summary(orderings))
    p.add_argument("--ordering", choices=[*BUILDERS, "reverse"], help="which ordering to build")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bench", help="converted benchmark root (its adaptation datasets give the concepts)")
    src.add_argument("--info-dir", help="the authors' data_lib/00_info folder (concepts without converting)")
    p.add_argument("--datasets", default="", help="comma-separated subset of adaptation datasets")
    p.add_argument("--out", help="stream file to write (JSON list of DATASET+++classname)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reverse", action="store_true", help="write the reverse of the ordering")
    p.add_argument("--input", help="reverse: the stream file to reverse; with --check: the file to validate")
    p.add_argument("--check", action="store_true", help="validate --input against --bench/--info-dir and exit")
    p.add_argument("--release-order", help="time_incremental: JSON list of dataset names, oldest first "
                                           "(default: release years in fif_catalogue)")
    p.add_argument("--dataset-order", help="dataset_incremental: JSON list of dataset names (default: seeded)")
    p.add_argument("--frequency-table", help="frequency: JSON/CSV concept -> count")
    p.add_argument("--pool", help="frequency: converted pool root; counts classname mentions in its captions")
    p.add_argument("--accuracy-table", help="difficulty: JSON/CSV concept -> zero-shot accuracy")
    p.add_argument("--backbone", default="", help="similarity/difficulty: open_clip architecture")
    p.add_argument("--pretrained", default="", help="similarity/difficulty: pretrained tag or checkpoint file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--split", default="train", help="difficulty: split whose images are scored")
    p.add_argument("--max-per-class", type=int, default=20, help="difficulty: images scored per class")
    p.add_argument("--loader", choices=("ffcv", "memory"), default="ffcv", help="difficulty: image loader backend")
    return p


def stream_main(argv: list[str] | None = None) -> int:
    """``fomo-ray prepare stream``: write a stream file for an ordering, or ``--check`` one (``--out`` then writes it
    with handle/alias tokens mapped to download names, as runs read names exactly)."""
    import dataclasses

    from fomo_ray.data import fif_catalogue
    from fomo_ray.data.orderings import StreamError, to_entries, write_stream
    from fomo_ray.prep.stream_orderings import StreamRequest, build_stream, check_stream

    args = _stream_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(StreamRequest)}
    req = StreamRequest(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    try:
        if args.check:
            entries, mapped = check_stream(req)
            print(f"{req.input}: {len(entries)} entries over {len({d for d, _ in entries})} datasets, all valid"
                  + (f"; {mapped} handle/alias token(s) mapped to download names" if mapped else ""))
            if args.out:
                write_stream(args.out, to_entries(entries))
                print(f"wrote {args.out} (download names, loads unchanged in runs)")
            elif mapped:
                print("note: runs read dataset names exactly; pass --out FILE to write the normalised stream")
            return 0
        if not args.ordering or not args.out:
            raise StreamError("give --ordering and --out (or --check --input FILE --bench ROOT)")
        entries = build_stream(req)
        write_stream(args.out, entries)
        print(f"wrote {args.out}: {len(entries)} entries ({args.ordering}{', reversed' if args.reverse else ''})")
        return 0
    except (StreamError, fif_catalogue.CatalogueError, ValueError) as e:  # DataError is a ValueError
        print(f"fomo-ray prepare stream: error: {e}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------- tokens
def tokens_main(argv: list[str] | None = None) -> int:
    """``fomo-ray prepare tokens``: add the caption token ids of each ``--model``'s tokenizer to a benchmark where
    missing (idempotent, safe to interrupt and to run concurrently); print what was written or that nothing was."""
    from fomo_ray.models.backbones import DEFAULT_ARCH
    from fomo_ray.prep import tokenize

    p = Parser(prog="fomo-ray prepare tokens", description=_summary(tokenize))
    p.add_argument("--root", required=True, help="benchmark root (a manifest.json directory), or a pool root")
    p.add_argument("--model", action="append", metavar="ARCH",
                   help=f"architecture whose tokenizer to store ids for (repeatable; default: {DEFAULT_ARCH})")
    a = p.parse_args(argv)
    try:
        tokenize.upgrade(a.root, tuple(a.model or ()), say_present=True)
    except ValueError as e:  # DataError (names the directory), BackboneError (names the model)
        print(f"fomo-ray prepare tokens: error: {e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------- dispatch
def _usage() -> str:
    lines = ["usage: fomo-ray prepare <target> [args...]", "", "targets:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in TARGETS.items()]
    return "\n".join(lines + ["", "Run 'fomo-ray prepare <target> --help' for a target's options."])


def main(argv: list[str] | None = None) -> int:
    from fomo_ray.cli import dispatch

    return dispatch("fomo-ray prepare", "target", TARGETS, _usage(), argv)


if __name__ == "__main__":
    sys.exit(main())
