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
   ``--pool`` also the pool split of a pool converted by ``convert_webdataset`` (a self-contained benchmark root).

``--dry-run`` runs the pre-flight and validates every info file, then prints the table without writing anything.
``_224`` trees are only used when ``--image-size`` <= 224 (never upscale the authors' resized copies).

Training text per image (as FiF's loader): ``default_caption`` when not null, else ``synthetic_merged_caption``; a
list keeps all its entries (retrieval sets: all captions per image). When both are null (e.g. base info files of
AI2DIAGRAMS) the primer caption is used and counted in the summary.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from fomo_ray.data import fif_catalogue
from fomo_ray.data.fif_catalogue import FifDataset

CONVERTER_VERSION = 1  # bump when the part layout or the image pipeline changes: old parts are then rebuilt
PARTS_DIR = ".parts"
Image.MAX_IMAGE_PIXELS = 400_000_000  # some FiF sources are large scans; still refuse absurd decompression bombs


class ConversionError(ValueError):
    """Bad input or a failed conversion; the message names the dataset, file, key or class."""


# =================================================================================================== images
def fit_image(img: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 ``size x size``: shorter side resized to ``size`` (bicubic, as FiF's ``_224`` files), centre crop.

    Square crops mean loaders never decode full-size files and every row has the same shape. ``draft`` lets JPEG
    decode directly at a reduced scale that is still >= ``size`` on both sides (large speed-up on full-res photos).
    """
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_fit(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes (any format PIL reads: JPEG, PNG, PPM, WebP, ...) and ``fit_image`` them."""
    with Image.open(io.BytesIO(data)) as img:
        return fit_image(img, size)


def encode_image(arr: np.ndarray, quality: int) -> bytes:
    """Staging encoding of a fitted image: JPEG at ``quality`` (0 = lossless PNG)."""
    buf = io.BytesIO()
    if quality <= 0:
        Image.fromarray(arr).save(buf, format="PNG")
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """A staged image back to a uint8 HxWx3 array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


# =================================================================================================== sources
class DirSource:
    """Images of one dataset under ``<root>/<NAME>/`` (the unpacked download)."""

    def __init__(self, base: Path):
        self.base = Path(base)

    def where(self, key: str) -> str:
        return str(self.base / key)

    def has_dir(self, prefix: str) -> bool:
        return (self.base / prefix).is_dir()

    def read(self, key: str) -> bytes | None:
        try:
            return (self.base / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None


class TarSource:
    """Images of one dataset inside ``<root>/<NAME>.tar`` (members ``<NAME>/<key>``, as the authors' tar mode)."""

    def __init__(self, tar_path: Path, top: str):
        self.tar_path, self.top = Path(tar_path), top
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] | None = None

    def _index(self) -> dict[str, tarfile.TarInfo]:
        if self._members is None:
            self._tar = tarfile.open(self.tar_path)
            prefix = self.top + "/"
            self._members = {m.name[len(prefix):]: m for m in self._tar.getmembers()
                             if m.isfile() and m.name.startswith(prefix)}
        return self._members

    def where(self, key: str) -> str:
        return f"{self.tar_path}:{self.top}/{key}"

    def has_dir(self, prefix: str) -> bool:
        p = prefix.rstrip("/") + "/"
        return any(k.startswith(p) for k in self._index())

    def read(self, key: str) -> bytes | None:
        member = self._index().get(key)
        if member is None:
            return None
        f = self._tar.extractfile(member)  # type: ignore[union-attr]
        return f.read() if f is not None else None


def locate(root: Path, name: str) -> tuple[str, Path] | None:
    """Where a dataset's images are: ``("dir", <root>/<NAME>)`` preferred, else ``("tar", <root>/<NAME>.tar)``."""
    if (root / name).is_dir():
        return "dir", root / name
    if (root / f"{name}.tar").is_file():
        return "tar", root / f"{name}.tar"
    return None


def open_source(kind: str, path: Path, name: str) -> DirSource | TarSource:
    return DirSource(path) if kind == "dir" else TarSource(path, name)


# =================================================================================================== info files
def training_captions(entry: Mapping) -> list[str]:
    """FiF's training text: ``default_caption`` if not null, else ``synthetic_merged_caption``; lists keep all."""
    for field_name in ("default_caption", "synthetic_merged_caption"):
        value = entry.get(field_name)
        if value is None:
            continue
        caps = [value] if isinstance(value, str) else [c for c in value if isinstance(c, str)]
        caps = [c.strip() for c in caps if c.strip()]
        if caps:
            return caps
    return []


@dataclass(frozen=True)
class Record:
    """One image of an info file: its key (path below ``<NAME>/``), class index (-1: none) and captions."""

    key: str
    label: int
    captions: tuple[str, ...]


def build_records(spec: FifDataset, info: Mapping, classnames: Sequence[str], info_path: Path
                  ) -> tuple[list[Record], dict[str, int]]:
    """Info-file entries -> records, validating every classname. Returns (records, counters).

    The label is the classname's index in the class list (the authors' ``target`` agrees with it in every shipped
    file; a disagreement is counted, the classname wins since streams address classes by name).
    """
    if not isinstance(info, Mapping) or not info:
        raise ConversionError(f"{spec.name}: info file {info_path} is empty or not a JSON object")
    index = {c: i for i, c in reversed(list(enumerate(classnames)))}  # first occurrence wins on duplicates
    records, fallback, mismatch = [], 0, 0
    for key, entry in info.items():
        if not isinstance(entry, Mapping) or "classname" not in entry:
            raise ConversionError(f"{spec.name}: info file {info_path}: entry '{key}' has no 'classname' field")
        cname = entry.get("classname")
        if spec.num_classes == 0:
            label = -1
        else:
            label = _label_of(spec, key, cname, entry.get("target"), classnames, index, info_path)
            mismatch += int(entry.get("target") != label)
        caps = training_captions(entry)
        if not caps:
            if label < 0:
                raise ConversionError(f"{spec.name}: info file {info_path}: retrieval image '{key}' has no caption")
            primer = entry.get("primer_caption")
            caps = [primer if isinstance(primer, str) and primer else spec.template.format(cname)]
            fallback += 1
        records.append(Record(key=str(key), label=label, captions=tuple(caps)))
    return records, {"primer_fallback": fallback, "target_mismatch": mismatch}


def _label_of(spec, key, cname, target, classnames, index, info_path) -> int:
    if not isinstance(cname, str) or cname not in index:
        close = difflib.get_close_matches(str(cname), list(classnames), n=2)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise ConversionError(
            f"{spec.name}: info file {info_path}: key '{key}' has classname {cname!r}, which is not in the class "
            f"list ({len(classnames)} classes{hint})")
    if isinstance(target, int) and 0 <= target < len(classnames) and classnames[target] == cname:
        return target  # duplicate classnames: keep the authors' index
    return index[cname]


def find_info_dir(root: Path, info_dir: str | None) -> Path:
    """The authors' ``00_info`` folder: explicit, or ``<root>/00_info``, or ``<root>/data_lib/00_info``."""
    candidates = [Path(info_dir)] if info_dir else [root / "00_info", root / "data_lib" / "00_info"]
    for c in candidates:
        if c.is_dir():
            return c
    raise ConversionError(
        f"info folder not found (looked at {', '.join(map(str, candidates))}). The per-image info files ship with "
        "the authors' code repository (data_lib/00_info), not with the data: pass --info-dir <repo>/data_lib/00_info")


def load_classnames(info_dir: Path, spec: FifDataset) -> tuple[list[str], Path | None]:
    """The class list of a dataset (``[]`` for FLICKR30K/MSCOCO); IMAGENET_V2 uses IMAGENET's, sorted lower-case."""
    if spec.num_classes == 0:
        return [], None
    source = spec.classnames_from or spec.name
    path = info_dir / f"{source}_classnames.json"
    if not path.is_file():
        raise ConversionError(f"{spec.name}: class list not found: {path}")
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConversionError(f"{spec.name}: class list {path} must be a JSON list of strings")
    if spec.classnames_from:
        names = sorted(names, key=str.lower)  # authors' imagenet_v2.py
    return names, path


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


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        "source": plan.source_kind, "classnames": _sha256_file(cls_path) if cls_path else "",
        "splits": [(s.split, s.info_split, s.variant, _sha256_file(s.info_path)) for s in plan.splits],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# =================================================================================================== parts
class PartWriter:
    """One split of a staging part: ``<split>.images.bin`` (concatenated encoded images), ``<split>.index.npz``
    (offsets, labels) and ``<split>.rows.jsonl`` (key and captions per row)."""

    def __init__(self, directory: Path, split: str):
        self.directory, self.split = Path(directory), split
        self._bin = open(self.directory / f"{split}.images.bin", "wb")
        self._rows = open(self.directory / f"{split}.rows.jsonl", "w", encoding="utf-8")
        self._offsets, self._labels = [0], []

    def add(self, encoded: bytes, label: int, captions: Sequence[str], key: str, **extra) -> None:
        """Append one row; ``extra`` (plain JSON values, e.g. a content hash) is kept in its rows.jsonl line."""
        self._bin.write(encoded)
        self._offsets.append(self._offsets[-1] + len(encoded))
        self._labels.append(label)
        row = {"key": key, "captions": list(captions), **extra}
        self._rows.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self._labels)

    def close(self) -> dict[str, str]:
        """Flush and return ``{file name: sha256}`` of this split's files."""
        self._bin.close()
        self._rows.close()
        np.savez(self.directory / f"{self.split}.index.npz", offsets=np.asarray(self._offsets, np.int64),
                 labels=np.asarray(self._labels, np.int32))
        names = [f"{self.split}.images.bin", f"{self.split}.rows.jsonl", f"{self.split}.index.npz"]
        return {n: _sha256_file(self.directory / n) for n in names}


def iter_part(directory: Path, split: str, rows: Sequence[int] | None = None
              ) -> Iterator[tuple[bytes, int, list[str], str]]:
    """``(encoded image, label, captions, key)`` per row of one split of a part, in order (all rows or ``rows``)."""
    directory = Path(directory)
    idx = np.load(directory / f"{split}.index.npz")
    offsets, labels = idx["offsets"], idx["labels"]
    data = np.memmap(directory / f"{split}.images.bin", dtype=np.uint8, mode="r") if offsets[-1] else None
    records = list(iter_rows(directory, split))
    for i in range(len(records)) if rows is None else rows:
        yield bytes(data[offsets[i]:offsets[i + 1]]), int(labels[i]), records[i]["captions"], records[i]["key"]


def iter_rows(directory: Path, split: str) -> Iterator[dict]:
    """The JSON row records (key, captions, extras) of one split of a part, without touching the images."""
    with open(Path(directory) / f"{split}.rows.jsonl", encoding="utf-8") as rows:
        for line in rows:
            yield json.loads(line)


def read_part_meta(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / "part.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def part_problem(directory: Path, fingerprint: str) -> str | None:
    """Why a finished part cannot be reused (None = valid: same fingerprint, every file hash matches)."""
    meta = read_part_meta(directory)
    if meta is None:
        return "no part.json"
    if meta.get("fingerprint") != fingerprint:
        return "inputs or settings changed"
    for name, sha in meta.get("files", {}).items():
        p = Path(directory) / name
        if not p.is_file():
            return f"{name} missing"
        if _sha256_file(p) != sha:
            return f"{name} changed (sha256 mismatch)"
    return None


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


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
        write_json_atomic(tmp / "part.json", meta)  # last file: a part without it is never reused
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
        path.write_text("".join(f"{b['path']}\t{b['reason']}\n" for b in bad))
    elif path.exists():
        path.unlink()


def _check_bad(plan: DatasetPlan, bad: list[dict], split_meta: dict, opts: Options, parts: Path) -> None:
    total = plan.num_images
    if total and len(bad) / total > opts.max_bad_fraction:
        examples = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:3])
        raise ConversionError(
            f"{plan.spec.name}: {len(bad)} of {total} images missing or corrupt "
            f"({len(bad) / total:.1%} > --max-bad-fraction {opts.max_bad_fraction:.1%}); e.g. {examples}. "
            f"Full list: {parts / (plan.spec.name + '.bad.txt')}")
    empty = [s for s, m in split_meta.items() if m["rows"] == 0]
    if empty:
        raise ConversionError(f"{plan.spec.name}: no readable image in split(s) {', '.join(empty)}")


def _summary_row(plan: DatasetPlan, meta: dict, status: str) -> dict:
    splits = meta.get("splits", {})
    return {"dataset": plan.spec.name, "role": plan.spec.role, "task": plan.spec.task,
            "variant": "/".join(sorted({m["variant"] for m in splits.values()})) or "-",
            "classes": len(plan.classnames), "train": splits.get("train", {}).get("rows", 0),
            "test": splits.get("test", {}).get("rows", 0), "skipped": len(meta.get("bad", [])),
            "primer": sum(m.get("primer_fallback", 0) for m in splits.values()), "status": status,
            "bad_examples": [b["path"] for b in meta.get("bad", [])[:3]]}


def _safe_convert(plan: DatasetPlan, opts: Options, progress: Callable[[int], None]) -> dict:
    """Never raises: a failure becomes a 'failed' row so the other datasets still finish."""
    try:
        return convert_dataset(plan, opts, progress)
    except ConversionError as e:
        row = _summary_row(plan, {}, "failed")
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
        with mp.Manager() as manager, mp.get_context().Pool(min(opts.workers, len(plans))) as pool:
            q = manager.Queue()
            pending = [pool.apply_async(_worker, (p, opts, q)) for p in plans]
            while not all(a.ready() for a in pending):
                _drain(q, bar, timeout=0.2)
            _drain(q, bar, timeout=0)
            return [a.get() for a in pending]
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
class StagedRows:
    """Indexable view (``len`` + ``[i]``) over rows of staged parts, decoded on demand.

    ``BenchmarkWriter.write_split`` materialises plain iterables into a list; for FiF (millions of 224-px images)
    that would not fit in memory, so the writer's FFCV workers read this view lazily instead. Files are opened per
    process on first use, so the view survives the fork into FFCV's workers.
    """

    def __init__(self, segments: Sequence[tuple[Path, str, str, Sequence[int] | None]]):
        # segment: (part directory, split, dataset name, row indices or None for all rows)
        self.segments = []
        for directory, split, dataset, rows in segments:
            idx = np.load(Path(directory) / f"{split}.index.npz")
            n = len(idx["labels"])
            sel = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
            self.segments.append((Path(directory), split, dataset, sel, idx["offsets"], idx["labels"],
                                  _line_offsets(Path(directory) / f"{split}.rows.jsonl")))
        self._ends = np.cumsum([len(seg[3]) for seg in self.segments]).astype(np.int64)
        self._pid, self._open = -1, {}

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _files(self, k: int):
        if self._pid != os.getpid():  # first access in this process (e.g. a forked FFCV worker)
            self._pid, self._open = os.getpid(), {}
        if k not in self._open:
            directory, split = self.segments[k][:2]
            size = (directory / f"{split}.images.bin").stat().st_size
            data = np.memmap(directory / f"{split}.images.bin", dtype=np.uint8, mode="r") if size else None
            self._open[k] = (data, open(directory / f"{split}.rows.jsonl", "rb"))
        return self._open[k]

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, int, list[str]]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        _, _, dataset, sel, offsets, labels, lines = self.segments[k]
        j = int(sel[i - (int(self._ends[k - 1]) if k else 0)])
        data, rows_file = self._files(k)
        rows_file.seek(int(lines[j]))
        captions = json.loads(rows_file.readline())["captions"]
        return decode_array(bytes(data[offsets[j]:offsets[j + 1]])), dataset, int(labels[j]), captions


def _line_offsets(path: Path) -> np.ndarray:
    """Byte offset of every line of a text file (random access into rows.jsonl without loading it)."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


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
    from fomo_ray.data import orderings
    from fomo_ray.data.format import BenchmarkWriter, DataError

    parts = opts.out / PARTS_DIR
    order = list(fif_catalogue.CATALOGUE)
    plans = sorted(plans, key=lambda p: order.index(p.spec.name))
    pool_rows, pool_hash = _pool(opts)
    stamp = {"parts": {p.spec.name: _sha256_file(parts / p.spec.name / "part.json") for p in plans},
             "name": opts.name, "seed": opts.seed, "image_size": opts.image_size, "write_mode": opts.write_mode,
             "pool": pool_hash}
    if (opts.out / "manifest.json").is_file() and _read_json(parts / "assembled.json") == stamp:
        return
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
            from fomo_ray.data.convert_webdataset import POOL_DATASET

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
        writer.finish()
    except DataError as e:
        writer.abort()
        raise ConversionError(f"assembling {opts.out} failed: {e}") from e
    write_json_atomic(parts / "assembled.json", stamp)


def _pool(opts: Options):
    """(staged pool rows, selection hash) of ``--pool``, or (None, "") without one."""
    if opts.pool is None:
        return None, ""
    from fomo_ray.data.convert_webdataset import staged_pool

    rows, digest = staged_pool(opts.pool)
    size = _read_json(opts.pool / "manifest.json").get("image_size")
    if size != opts.image_size:
        raise ConversionError(f"--pool {opts.pool} was converted with --image-size {size}, this benchmark uses "
                              f"{opts.image_size}: convert both at the same size")
    return rows, digest


def default_streams(concepts, seed: int) -> dict[str, list]:
    """The orderings that need no model or pool: written into every converted benchmark."""
    from fomo_ray.data import orderings

    present = list(dict.fromkeys(d for d, _ in concepts))
    return {"random": orderings.random_order(concepts, seed),
            "dataset_incremental": orderings.dataset_incremental(concepts, seed),
            "time_incremental": orderings.time_incremental(concepts, fif_catalogue.release_order(present), seed)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# =================================================================================================== report + CLI
COLUMNS = ("dataset", "role", "task", "variant", "classes", "train", "test", "skipped", "primer", "status")


def format_table(rows: Sequence[Mapping]) -> str:
    """Fixed-width summary table (dataset, role, classes, images, skipped, ...) plus a totals line."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS} if rows else {}
    line = lambda r: "  ".join(str(r.get(c, "")).ljust(widths[c]) for c in COLUMNS)  # noqa: E731
    out = [line({c: c for c in COLUMNS}), "  ".join("-" * widths[c] for c in COLUMNS)] if rows else []
    out += [line(r) for r in rows]
    totals = {k: sum(r.get(k, 0) for r in rows) for k in ("train", "test", "skipped")}
    out.append(f"total: {len(rows)} datasets, {totals['train']} train + {totals['test']} test images, "
               f"{totals['skipped']} skipped (missing/corrupt)")
    for r in rows:
        if r.get("bad_examples"):
            out.append(f"  {r['dataset']}: skipped e.g. {', '.join(r['bad_examples'])}")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fomo-ray prepare fif", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--no-progress", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
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
                   pool=Path(args.pool) if args.pool else None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.time()
    try:
        opts = options_from_args(args)
        names = [fif_catalogue.resolve(n.strip()) for n in args.datasets.split(",") if n.strip()] or None
        rows = (dry_run if args.dry_run else convert)(opts, names)
    except ConversionFailed as e:
        print(format_table(e.rows), file=sys.stderr)
        print(f"fomo-ray prepare fif: error: {e}\nFinished parts are kept; rerun to retry the failed datasets.",
              file=sys.stderr)
        return 1
    except (ConversionError, fif_catalogue.CatalogueError) as e:
        print(f"fomo-ray prepare fif: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print("dry run: nothing written" if args.dry_run else f"wrote {opts.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
