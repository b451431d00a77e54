"""Convert the FoMo-in-Flux download (Roth, Udandarao et al., arXiv 2408.14471) into the project's FFCV format.

Input: a FiF data root as the authors' ``download_and_process_all_datasets.sh`` unpacks it (one folder ``<NAME>/`` per
dataset; a plain ``<NAME>.tar`` from ``download_dataset_tars.sh`` works too) plus the authors' ``data_lib/00_info``
folder (per-split info JSON ``<NAME>_<split>[_224].json``: image key -> classname, captions, target; class lists
``<NAME>_classnames.json``). Layout facts: ``../shared/FIF_LAYOUT.md``; dataset table: ``fif_catalogue``.

Pipeline (resumable; nothing half-written ever looks complete):

1. *Pre-flight* (nothing is written): every requested dataset folder, info file and class list exists; every
   classname is in its class list. All problems are listed at once. Missing folders stop here unless
   ``--allow-missing``.
2. *Per-dataset parts* (parallel over datasets, one progress bar over images): each image is decoded once, made RGB,
   resized (shorter side = ``--image-size``, bicubic) and centre-cropped to a square, then stored re-encoded under
   ``<out>/.parts/<NAME>/`` with labels, captions and info keys. A part is built in a temp folder and renamed when
   complete; its ``part.json`` holds a fingerprint of the inputs/settings and the sha256 of every file. A rerun
   skips every part whose fingerprint and hashes still match. Missing/corrupt images are reported by path (in the
   summary and in ``<out>/.parts/<NAME>.bad.txt``) and counted; more than ``--max-bad-fraction`` fails the dataset.
3. *Assembly*: the train betons of the adaptation datasets and the test betons of all datasets, the manifest and the
   default stream files (random, dataset-incremental, time-incremental) via ``format.BenchmarkWriter``; with
   ``--pool`` also the pool split of a pool converted by ``convert_webdataset`` (a self-contained benchmark root),
   and the token ids of every caption for the tokenizer of each ``--model`` (default: the default model). A rerun
   with another ``--model`` only adds its token ids (:mod:`fomo_ray.prep.tokenize`).

``--dry-run`` runs the pre-flight and validates every info file, then prints the table without writing anything.
``_224`` trees are only used when ``--image-size`` <= 224 (never upscale the authors' resized copies).

Training text per image (as FiF's loader): ``default_caption`` when not null, else ``synthetic_merged_caption``; a
list keeps all its entries (retrieval sets: all captions per image). When both are null (e.g. base info files of
AI2DIAGRAMS) the primer caption is used and counted in the summary.

Images and info files are read by :mod:`fomo_ray.prep.fif_sources`; parts are written and read back through
:mod:`fomo_ray.prep.staging`, which ``convert_webdataset`` shares. The command is ``fomo-ray prepare fif``
(:mod:`fomo_ray.cli.prepare`).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue as queue_mod
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from fomo_ray.atomic import write_json, write_text
from fomo_ray.data import fif_catalogue, orderings
from fomo_ray.data.fif_catalogue import FifDataset
from fomo_ray.data.format import DataError, sha256_file
from fomo_ray.data.writer import BenchmarkWriter
from fomo_ray.prep.fif_sources import Record, build_records, load_classnames, locate, open_source
from fomo_ray.prep.staging import (
    PARTS_DIR, POOL_DATASET, ConversionError, PartWriter, StagedRows, add_model_tokens, decode_fit, encode_image,
    model_tokenizers, part_problem, read_json, read_part_meta, staged_pool,
)
from fomo_ray.prep.workers import manager, worker_pool
from fomo_ray.tables import format_table

CONVERTER_VERSION = 1  # bump when the part layout or the image pipeline changes: old parts are then rebuilt


# =================================================================================================== planning
@dataclass(frozen=True)
class Options:
    """Conversion settings (CLI flags)."""

    root: Path
    out: Path
    info_dir: Path
    image_size: int = 224
    prefer_224: bool = True
    max_bad_fraction: float = 0.01
    jpeg_quality: int = 95
    workers: int = 1
    allow_missing: bool = False
    name: str = "fif"
    seed: int = 0
    progress: bool = True
    write_mode: str = "jpg"  # beton image storage: jpg (~15 KB per 224-px image) or raw (exact, ~150 KB)
    pool: Path | None = None  # a pool converted by convert_webdataset, embedded as this benchmark's pool split
    writer_workers: int = 1  # FFCV writer processes; 1 keeps the betons byte-identical across reruns
    models: tuple[str, ...] = ()  # caption token ids are written for these models' tokenizers (empty: the default)


@dataclass
class SplitPlan:
    split: str  # ours: train / test
    info_split: str  # the authors': train / test / train_mini / val
    variant: str  # "224" or "base"
    info_path: Path
    records: list[Record] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetPlan:
    spec: FifDataset
    source_kind: str
    source_path: Path
    classnames: list[str]
    splits: list[SplitPlan]
    fingerprint: str = ""

    @property
    def num_images(self) -> int:
        return sum(len(s.records) for s in self.splits)




def choose_variant(spec: FifDataset, info_split: str, info_dir: Path, source, opts: Options) -> tuple[str, Path]:
    """``_224`` when the module allows it, both its info file and its image tree exist, and we do not upscale."""
    resized = info_dir / f"{spec.name}_{info_split}_224.json"
    if (opts.prefer_224 and spec.resized and opts.image_size <= 224 and resized.is_file()
            and source.has_dir(f"{spec.name}_{info_split}_224")):
        return "224", resized
    return "base", info_dir / f"{spec.name}_{info_split}.json"


def plan_dataset(spec: FifDataset, opts: Options, with_records: bool = True) -> DatasetPlan:
    """Locate a dataset's images and info files and (optionally) validate all its records. Writes nothing."""
    where = locate(opts.root, spec.name)
    if where is None:
        raise FileNotFoundError(spec.name)
    kind, path = where
    source = open_source(kind, path, spec.name)
    classnames, cls_path = load_classnames(opts.info_dir, spec)
    splits = []
    for ours, theirs in spec.converted_splits().items():
        variant, info_path = choose_variant(spec, theirs, opts.info_dir, source, opts)
        if not info_path.is_file():
            raise ConversionError(f"{spec.name}: info file for split '{theirs}' not found: {info_path}")
        splits.append(SplitPlan(ours, theirs, variant, info_path))
    plan = DatasetPlan(spec, kind, path, classnames, splits)
    plan.fingerprint = _fingerprint(plan, cls_path, opts)
    if with_records:
        load_records(plan)
    return plan


def load_records(plan: DatasetPlan) -> None:
    for sp in plan.splits:
        try:
            info = json.loads(sp.info_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{plan.spec.name}: info file {sp.info_path} is not valid JSON: {e}") from e
        sp.records, sp.counters = build_records(plan.spec, info, plan.classnames, sp.info_path)


def _fingerprint(plan: DatasetPlan, cls_path: Path | None, opts: Options) -> str:
    """Everything a part depends on, except image bytes (hashing 65 GB of sources on every rerun is too slow)."""
    blob = {
        "version": CONVERTER_VERSION, "image_size": opts.image_size, "quality": opts.jpeg_quality,
        "source": plan.source_kind, "classnames": sha256_file(cls_path) if cls_path else "",
        "splits": [(s.split, s.info_split, s.variant, sha256_file(s.info_path)) for s in plan.splits],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()



# =================================================================================================== one dataset
def convert_dataset(plan: DatasetPlan, opts: Options, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Build ``<out>/.parts/<NAME>`` for one dataset; returns its summary row. Raises ConversionError on failure."""
    spec, parts = plan.spec, opts.out / PARTS_DIR
    tmp = parts / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = open_source(plan.source_kind, plan.source_path, spec.name)
    files: dict[str, str] = {}
    bad: list[dict] = []
    split_meta: dict[str, dict] = {}
    try:
        for sp in plan.splits:
            writer, pending = PartWriter(tmp, sp.split), 0
            for rec in sp.records:
                problem = _stage_one(source, rec, writer, opts)
                if problem:
                    bad.append({"split": sp.split, "key": rec.key, "path": source.where(rec.key), "reason": problem})
                pending += 1
                if pending == 64:
                    progress(pending)
                    pending = 0
            progress(pending)
            files.update(writer.close())
            split_meta[sp.split] = {"rows": len(writer), "info_split": sp.info_split, "variant": sp.variant,
                                    "info_file": str(sp.info_path), **sp.counters}
        _write_bad_list(parts / f"{spec.name}.bad.txt", bad)
        _check_bad(plan, bad, split_meta, opts, parts)
        meta = {"dataset": spec.name, "fingerprint": plan.fingerprint, "classnames": plan.classnames,
                "splits": split_meta, "files": files, "bad": bad}
        write_json(tmp / "part.json", meta)  # last file: a part without it is never reused
        final = parts / spec.name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _summary_row(plan, meta, "converted")


def _stage_one(source, rec: Record, writer: PartWriter, opts: Options) -> str | None:
    """Decode, fit and stage one image; returns a problem description instead of raising."""
    data = source.read(rec.key)
    if data is None:
        return "missing file (key in the info file, no image on disk)"
    try:
        arr = decode_fit(data, opts.image_size)
    except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt file; it is reported, not hidden
        return f"corrupt image ({type(e).__name__}: {e})"
    writer.add(encode_image(arr, opts.jpeg_quality), rec.label, rec.captions, rec.key)
    return None


def _write_bad_list(path: Path, bad: list[dict]) -> None:
    if bad:
        write_text(path, "".join(f"{b['path']}\t{b['reason']}\n" for b in bad))
    elif path.exists():
        path.unlink()


def _check_bad(plan: DatasetPlan, bad: list[dict], split_meta: dict, opts: Options, parts: Path) -> None:
    total = plan.num_images
    if total and len(bad) / total > opts.max_bad_fraction:
        examples = "; ".join(f"{_bad_name(b)} ({b['reason']})" for b in bad[:3])
        raise BadImages(bad,
            f"{plan.spec.name}: {len(bad)} of {total} images missing or corrupt "
            f"({len(bad) / total:.1%} > --max-bad-fraction {opts.max_bad_fraction:.1%}); e.g. {examples}. "
            f"Full list: {parts / (plan.spec.name + '.bad.txt')}")
    empty = [s for s, m in split_meta.items() if m["rows"] == 0]
    if empty:
        raise BadImages(bad, f"{plan.spec.name}: no readable image in split(s) {', '.join(empty)}")


class BadImages(ConversionError):
    """A dataset failed for its missing or corrupt images; carries them, so its summary row counts them."""

    def __init__(self, bad: list[dict], message: str) -> None:
        super().__init__(message)
        self.bad = bad


def _bad_name(b: Mapping) -> str:
    return f"{b['split']}:{b['path']}"


def _summary_row(plan: DatasetPlan, meta: dict, status: str) -> dict:
    splits = meta.get("splits", {})
    return {"dataset": plan.spec.name, "role": plan.spec.role, "task": plan.spec.task,
            "variant": "/".join(sorted({m["variant"] for m in splits.values()})) or "-",
            "classes": len(plan.classnames), "train": splits.get("train", {}).get("rows", 0),
            "test": splits.get("test", {}).get("rows", 0), "skipped": len(meta.get("bad", [])),
            "primer": sum(m.get("primer_fallback", 0) for m in splits.values()), "status": status,
            "bad_examples": [_bad_name(b) for b in meta.get("bad", [])[:3]]}


def _safe_convert(plan: DatasetPlan, opts: Options, progress: Callable[[int], None]) -> dict:
    """Never raises: a failure becomes a 'failed' row so the other datasets still finish."""
    try:
        return convert_dataset(plan, opts, progress)
    except ConversionError as e:
        row = _summary_row(plan, {"bad": getattr(e, "bad", [])}, "failed")
        row["error"] = str(e)
    except Exception:  # noqa: BLE001 - unexpected bugs are reported with their traceback
        row = _summary_row(plan, {}, "failed")
        row["error"] = f"{plan.spec.name}: unexpected error\n{traceback.format_exc()}"
    return row


def _worker(plan: DatasetPlan, opts: Options, q) -> dict:
    return _safe_convert(plan, opts, lambda n: q.put(n) if n else None)


# =================================================================================================== driver
def run_parts(plans: list[DatasetPlan], opts: Options) -> list[dict]:
    """Convert datasets in parallel (largest first for load balance) with one progress bar over all images."""
    from tqdm import tqdm

    plans = sorted(plans, key=lambda p: -p.num_images)
    bar = tqdm(total=sum(p.num_images for p in plans), unit="img", desc="convert", disable=not opts.progress)
    try:
        if opts.workers <= 1 or len(plans) <= 1:
            return [_safe_convert(p, opts, bar.update) for p in plans]
        with manager() as shared, worker_pool(min(opts.workers, len(plans)), "convert", ConversionError) as pool:
            q = shared.Queue()
            pending = [pool.submit(_worker, p, opts, q) for p in plans]
            while not all(f.done() for f in pending):
                _drain(q, bar, timeout=0.2)
            _drain(q, bar, timeout=0)
            return [f.result() for f in pending]
    finally:
        bar.close()


def _drain(q, bar, timeout: float) -> None:
    try:
        bar.update(q.get(timeout=timeout) if timeout else q.get_nowait())
        while True:
            bar.update(q.get_nowait())
    except queue_mod.Empty:
        pass


def preflight(names: Sequence[str], opts: Options) -> tuple[list[DatasetPlan], list[str]]:
    """Plans for every present dataset and the list of missing ones; raises listing *all* other problems."""
    plans, missing, problems = [], [], []
    for name in names:
        spec = fif_catalogue.CATALOGUE[name]
        try:
            plans.append(plan_dataset(spec, opts, with_records=False))
        except FileNotFoundError:
            missing.append(name)
        except ConversionError as e:
            problems.append(str(e))
    if missing and not opts.allow_missing:
        problems.insert(0, f"{len(missing)} dataset folder(s) missing under {opts.root}: {', '.join(missing)} "
                           "(download them, or pass --allow-missing to convert the others)")
    if problems:
        raise ConversionError("pre-flight check failed (nothing was written):\n  - " + "\n  - ".join(problems))
    return plans, missing


def dry_run(opts: Options, names: Sequence[str] | None = None) -> list[dict]:
    """Pre-flight plus validation of every info file; returns the summary rows, writes nothing."""
    plans, missing = preflight(list(names) if names else list(fif_catalogue.CATALOGUE), opts)
    problems = []
    for plan in plans:
        try:
            load_records(plan)
        except ConversionError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError("info files do not match the class lists:\n  - " + "\n  - ".join(problems))
    rows = [_summary_row(plan, {"splits": {sp.split: {"rows": len(sp.records), "variant": sp.variant,
                                                       **sp.counters} for sp in plan.splits}}, "ok")
            for plan in plans]
    return _sorted(rows + _missing_rows(missing))


def _missing_rows(missing: Sequence[str]) -> list[dict]:
    return [{"dataset": m, "role": fif_catalogue.CATALOGUE[m].role, "task": fif_catalogue.CATALOGUE[m].task,
             "variant": "-", "classes": 0, "train": 0, "test": 0, "skipped": 0, "primer": 0, "status": "missing"}
            for m in missing]


def _sorted(rows: list[dict]) -> list[dict]:
    order = list(fif_catalogue.CATALOGUE)
    return sorted(rows, key=lambda r: order.index(r["dataset"]))


def convert(opts: Options, names: Sequence[str] | None = None) -> list[dict]:
    """The whole pipeline (see module docstring). Returns summary rows; raises ConversionError on any failure."""
    names = list(names) if names else list(fif_catalogue.CATALOGUE)
    plans, missing = preflight(names, opts)
    _pool(opts)  # a bad --pool fails now, not after hours of conversion
    model_tokenizers(opts.models)  # so does a bad --model
    parts = opts.out / PARTS_DIR
    todo, rows = [], []
    for plan in plans:
        problem = part_problem(parts / plan.spec.name, plan.fingerprint)
        if problem is None:
            rows.append(_summary_row(plan, read_part_meta(parts / plan.spec.name), "cached"))
        else:
            todo.append(plan)
    problems = []
    for plan in todo:  # validate every record before converting anything
        try:
            load_records(plan)
        except ConversionError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError("info files do not match the class lists (nothing was written):\n  - "
                              + "\n  - ".join(problems))
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp-*"):  # left by a killed run; never looks complete, but takes space
        shutil.rmtree(stale, ignore_errors=True)
    rows = _sorted(rows + run_parts(todo, opts) + _missing_rows(missing))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise ConversionFailed(rows, "\n".join(r["error"] for r in failed))
    assemble(plans, opts, rows)
    return rows


class ConversionFailed(ConversionError):
    """Some datasets failed; ``rows`` is the summary table (finished parts are kept for the rerun)."""

    def __init__(self, rows: list[dict], message: str):
        super().__init__(message)
        self.rows = rows




# =================================================================================================== assembly
def disambiguate(classnames: Sequence[str]) -> list[str]:
    """Repeated class names get their index appended (``crane`` ... ``crane (134)``).

    The manifest needs unique names; the first occurrence keeps the plain name, which is the class the authors'
    stream loader resolves a plain name to, so their stream files keep pointing at the same class.
    """
    seen: set[str] = set()
    out = []
    for i, c in enumerate(classnames):
        out.append(c if c not in seen else f"{c} ({i})")
        seen.add(c)
    return out


def assemble(plans: Sequence[DatasetPlan], opts: Options, rows: Sequence[Mapping] = ()) -> None:
    """Write train/test betons, manifest and default streams from the finished parts (skipped if unchanged)."""
    parts = opts.out / PARTS_DIR
    order = list(fif_catalogue.CATALOGUE)
    plans = sorted(plans, key=lambda p: order.index(p.spec.name))
    pool_rows, pool_hash = _pool(opts)
    stamp = {"parts": {p.spec.name: sha256_file(parts / p.spec.name / "part.json") for p in plans},
             "name": opts.name, "seed": opts.seed, "image_size": opts.image_size, "write_mode": opts.write_mode,
             "pool": pool_hash}
    if (opts.out / "manifest.json").is_file() and read_json(parts / "assembled.json") == stamp:
        add_model_tokens(opts.out, opts.models)  # another --model needs no re-assembly, only its token ids
        return
    tokenizers = model_tokenizers(opts.models)
    report = [{k: r[k] for k in COLUMNS if k in r} for r in rows if r.get("status") in ("converted", "cached")]
    writer = BenchmarkWriter(opts.out, opts.name, opts.image_size, write_mode=opts.write_mode,
                             num_workers=opts.writer_workers,
                             extra={"source": "FoMo-in-Flux (convert_fif)", "conversion": report})
    try:
        names = {p.spec.name: disambiguate(p.classnames) for p in plans}
        for p in plans:
            writer.add_dataset({"name": p.spec.name, "role": p.spec.role, "task": p.spec.task,
                                "classnames": names[p.spec.name], "template": p.spec.template})
        if pool_rows is not None:
            writer.add_dataset({"name": POOL_DATASET, "role": "pool", "task": "retrieval", "template": "{}"})
            writer.write_split("pool", pool_rows)
        adapt = [p for p in plans if p.spec.role == fif_catalogue.ADAPT]
        if adapt:
            writer.write_split("train", StagedRows([(parts / p.spec.name, "train", p.spec.name, None) for p in adapt]))
        writer.write_split("test", StagedRows([(parts / p.spec.name, "test", p.spec.name, None) for p in plans]))
        concepts = [(p.spec.name, c) for p in adapt for c in names[p.spec.name]]
        if concepts:
            for stream, entries in default_streams(concepts, opts.seed).items():
                writer.add_stream(stream, orderings.to_entries(entries))
        writer.finish(tokenizers)
    except DataError as e:
        writer.abort()
        raise ConversionError(f"assembling {opts.out} failed: {e}") from e
    write_json(parts / "assembled.json", stamp)


def _pool(opts: Options):
    """(staged pool rows, selection hash) of ``--pool``, or (None, "") without one."""
    if opts.pool is None:
        return None, ""
    rows, digest = staged_pool(opts.pool)
    size = read_json(opts.pool / "manifest.json").get("image_size")
    if size != opts.image_size:
        raise ConversionError(f"--pool {opts.pool} was converted with --image-size {size}, this benchmark uses "
                              f"{opts.image_size}: convert both at the same size")
    return rows, digest


def default_streams(concepts, seed: int) -> dict[str, list]:
    """The orderings that need no model or pool: written into every converted benchmark."""
    present = list(dict.fromkeys(d for d, _ in concepts))
    return {"random": orderings.random_order(concepts, seed),
            "dataset_incremental": orderings.dataset_incremental(concepts, seed),
            "time_incremental": orderings.time_incremental(concepts, fif_catalogue.release_order(present), seed)}


# =================================================================================================== report
COLUMNS = ("dataset", "role", "task", "variant", "classes", "train", "test", "skipped", "primer", "status")


def format_summary(rows: Sequence[Mapping]) -> str:
    """The summary table (dataset, role, classes, images, skipped, ...; ``tables.format_table``) plus a totals line
    and a few skipped files per dataset."""
    out = [format_table(rows, COLUMNS)] if rows else []
    totals = {k: sum(r.get(k, 0) for r in rows) for k in ("train", "test", "skipped")}
    failed = sum(r.get("status") == "failed" for r in rows)
    out.append(f"total: {len(rows)} datasets, {totals['train']} train + {totals['test']} test images, "
               f"{totals['skipped']} skipped (missing/corrupt)" + (f", {failed} dataset(s) FAILED" if failed else ""))
    for r in rows:
        if r.get("bad_examples") and r.get("status") != "failed":  # a failed one's error names its own examples
            out.append(f"  {r['dataset']}: skipped e.g. {', '.join(r['bad_examples'])}")
    return "\n".join(out)
