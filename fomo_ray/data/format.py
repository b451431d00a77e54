"""The on-disk benchmark format: FFCV ``.beton`` files plus row-aligned metadata, captions and a manifest.

A benchmark root holds (docs/ARCHITECTURE.md, "Data: the on-disk format")::

    manifest.json             written LAST (temp name + rename): its presence means the build completed
    pool.beton                pretraining pool P
    train.beton               train splits of all adaptation datasets, concatenated
    test.beton                test splits of every dataset (adapt, eval, retrieval), concatenated
    <split>.meta.npz          row-aligned int32 arrays ``dataset`` and ``label`` (index sets without decoding)
    <split>.captions.jsonl    line r = JSON list of the caption strings of row r
    streams/<ordering>.json   FiF stream files: JSON list of "DATASET+++classname"

Every beton has the fields ``image`` (RGBImageField), ``dataset``, ``label`` and ``row`` (IntFields; ``row`` is
the row's own index so a loader's output indexes captions and metadata).

Why captions live *beside* the beton and not in it: one beton must serve every tokenizer (open_clip's BPE,
SigLIP's sentencepiece, ...), so it cannot hold token ids; and FFCV's only variable-length text carrier,
``BytesField``, pads every row to the longest item of the dataset, so a handful of long web captions would
multiply the file size, while a ``JSONField`` is decoded in Python per sample and cannot run in FFCV's compiled
pipeline. Captions are only needed as strings on the host, next to the tokenizer, so a row-aligned JSONL file
(one line per row, several captions per row) is both smaller and tokenizer-agnostic. The integer fields stay in
the beton, so FFCV batches carry the row ids that index the captions.

Writing (:mod:`fomo_ray.data.writer`) never leaves anything that looks complete: every file is written under ``.staging-*`` and renamed into
place by :meth:`BenchmarkWriter.finish`, the manifest last; a rebuild deletes the old manifest *first*. FFCV's
``DatasetWriter`` hangs forever if a worker raises, so every sample is validated and converted to plain types
(contiguous ``uint8`` HxWx3, Python ints) inside a guard that records failures instead of raising; the failures
are raised as one :class:`DataError` naming split, row and culprit after the writer has returned.

FFCV is imported only where a beton is written; reading metadata and raw images (:func:`read_images`) is plain
numpy, so the "memory" loader backend runs on machines without FFCV.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "fomo_ray/v1"
SPLITS = ("pool", "train", "test")
ROLES = ("pool", "adapt", "eval")
TASKS = ("classification", "retrieval")
FIELDS = ("image", "dataset", "label", "row")
SEP = "+++"  # FiF stream entries are "DATASET+++classname"
MANIFEST = "manifest.json"

# which dataset roles may have rows in which split

# FFCV 1.0.2 file layout (ffcv/types.py), replicated so metadata and raw images are readable without FFCV.
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                    ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_ROW_META = np.dtype([("image", _IMAGE_META), ("dataset", "<i8"), ("label", "<i8"), ("row", "<i8")], align=True)
_BETON_VERSION = 2
_TYPE_IDS = (2, 1, 1, 1)  # RGBImageField, IntField, IntField, IntField
_MODE_JPG, _MODE_RAW = 0, 1


class DataError(ValueError):
    """A benchmark directory, file, sample, stream or mixture is invalid; the message names the culprit."""


# --------------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetInfo:
    """One dataset of a benchmark: its role, task, classes, primer template and contiguous row range per split."""

    name: str
    role: str          # "pool" | "adapt" | "eval"
    task: str          # "classification" | "retrieval"
    classnames: tuple[str, ...] = ()
    template: str = ""
    rows: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # split -> [start, end)

    def prompts(self) -> list[str]:
        """The zero-shot class prompts ``template.format(classname)`` (docs/BENCHMARK.md §Evaluation)."""
        return [self.template.format(c) for c in self.classnames]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "task": self.task, "classnames": list(self.classnames),
                "template": self.template, "rows": {k: list(v) for k, v in self.rows.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "manifest") -> "DatasetInfo":
        try:
            info = cls(name=d["name"], role=d["role"], task=d["task"], classnames=tuple(d.get("classnames", ())),
                       template=d.get("template", ""),
                       rows={k: (int(v[0]), int(v[1])) for k, v in d.get("rows", {}).items()})
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise DataError(f"{where}: malformed dataset entry {str(d)[:200]}: {e!r}") from e
        check_dataset_info(info, where)
        return info


def check_dataset_info(info: DatasetInfo, where: str = "dataset") -> None:
    """Raise :class:`DataError` naming the dataset if its fields are inconsistent."""
    n = info.name
    if not isinstance(n, str) or not n or SEP in n or n != n.strip():
        raise DataError(f"{where}: invalid dataset name {n!r} (non-empty, no '{SEP}', no surrounding spaces)")
    if info.role not in ROLES:
        raise DataError(f"{where}: dataset '{n}' has role {info.role!r}; valid roles: {list(ROLES)}")
    if info.task not in TASKS:
        raise DataError(f"{where}: dataset '{n}' has task {info.task!r}; valid tasks: {list(TASKS)}")
    names = list(info.classnames)
    if info.task == "classification":
        if not names:
            raise DataError(f"{where}: classification dataset '{n}' has no classnames")
        if "{}" not in info.template:
            raise DataError(f"{where}: dataset '{n}' template {info.template!r} has no '{{}}' placeholder")
    bad = [c for c in names if not isinstance(c, str) or not c.strip() or SEP in c]
    if bad:
        raise DataError(f"{where}: dataset '{n}' has invalid classnames {bad[:5]}")
    dups = sorted({c for c in names if names.count(c) > 1})
    if dups:
        raise DataError(f"{where}: dataset '{n}' has duplicate classnames {dups[:5]}")


# --------------------------------------------------------------------------------------------------- reading
class Benchmark:
    """A completed benchmark directory (see module docstring); open it with :func:`open_benchmark`."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        infos = [DatasetInfo.from_json(d, str(self.root / MANIFEST)) for d in manifest["datasets"]]
        self.datasets: dict[str, DatasetInfo] = {d.name: d for d in infos}
        if len(self.datasets) != len(infos):
            raise DataError(f"{self.root / MANIFEST}: duplicate dataset names")
        self.dataset_names: list[str] = [d.name for d in infos]
        self._meta: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._captions: dict[str, list[list[str]]] = {}

    # ------------------------------------------------------------------------------------------- manifest views
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise DataError(f"benchmark {self.root}: no split '{split}'; it has {list(self.manifest['splits'])}")
        return self.manifest["splits"][split]

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def split_path(self, split: str) -> Path:
        return self.root / self._split(split)["file"]

    def stream_path(self, ordering: str) -> Path:
        streams = self.manifest.get("streams", {})
        if ordering not in streams:
            raise DataError(f"benchmark {self.root}: no stream ordering '{ordering}'; it has {sorted(streams)}")
        return self.root / streams[ordering]

    def dataset_index(self, name: str) -> int:
        if name not in self.datasets:
            raise DataError(f"benchmark {self.root}: unknown dataset '{name}'; it has {self.dataset_names}")
        return self.dataset_names.index(name)

    def rows(self, dataset: str, split: str) -> np.ndarray:
        """Row ids (int64, sorted) of ``dataset`` in ``split``; empty if the dataset has no rows there."""
        self._split(split)
        info = self.datasets.get(dataset)
        if info is None:
            raise DataError(f"benchmark {self.root}: unknown dataset '{dataset}'; it has {self.dataset_names}")
        start, end = info.rows.get(split, (0, 0))
        return np.arange(start, end, dtype=np.int64)

    # ------------------------------------------------------------------------------------------- row-aligned files
    def meta(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_ids, labels)``: read-only int32 arrays, one entry per row of ``split``."""
        if split not in self._meta:
            path = self.root / self._split(split)["meta"]
            try:
                with np.load(path) as z:
                    ds, lab = z["dataset"].astype(np.int32), z["label"].astype(np.int32)
            except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
                raise DataError(f"corrupt metadata file {path}: {e!r}") from e
            n = self.num_rows(split)
            if ds.shape != (n,) or lab.shape != (n,):
                raise DataError(f"corrupt metadata file {path}: {ds.shape[0]} rows, manifest says {n}")
            ds.setflags(write=False)
            lab.setflags(write=False)
            self._meta[split] = (ds, lab)
        return self._meta[split]

    def captions(self, split: str) -> list[list[str]]:
        """Row-aligned captions of ``split`` (line r of the JSONL file = the caption list of row r)."""
        if split not in self._captions:
            path = self.root / self._split(split)["captions"]
            try:
                with open(path, encoding="utf-8") as f:
                    caps = [json.loads(line) for line in f]
            except Exception as e:  # noqa: BLE001
                raise DataError(f"corrupt captions file {path}: {e!r}") from e
            if len(caps) != self.num_rows(split):
                raise DataError(f"corrupt captions file {path}: {len(caps)} lines, manifest says "
                                f"{self.num_rows(split)} rows")
            self._captions[split] = caps
        return self._captions[split]

    def verify(self) -> None:
        """Recompute the sha256 of every file and compare with the manifest (raises naming the first mismatch)."""
        for rel, entry in self.manifest["files"].items():
            if sha256_file(self.root / rel) != entry["sha256"]:
                raise DataError(f"corrupt benchmark file {self.root / rel}: sha256 differs from {self.root / MANIFEST}")

    def __repr__(self) -> str:
        return f"Benchmark({str(self.root)!r}, name={self.name!r}, datasets={len(self.datasets)})"


def open_benchmark(root: str | os.PathLike, verify: bool = False) -> Benchmark:
    """Open a completed benchmark directory; raises :class:`DataError` naming the missing/partial/corrupt file.

    Cheap checks always run (manifest parses, every listed file exists with the recorded size, every beton
    header matches its row count); ``verify=True`` also recomputes all sha256 sums.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"benchmark directory {root} does not exist (build FiF-mini: fomo-ray prepare fifmini --root "
                        f"{root}; convert real FiF data: fomo-ray prepare fif --out {root} ...)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{mpath} is missing: {root} is a partial or interrupted build "
                        f"(rebuild it: fomo-ray prepare fifmini --root {root} --force, or rerun fomo-ray prepare fif "
                        f"--out {root}, which resumes)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt manifest {mpath}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{mpath}: format {got!r} is not {FORMAT!r}")
    for key in ("name", "image_size", "content_hash", "splits", "datasets", "files"):
        if key not in manifest:
            raise DataError(f"corrupt manifest {mpath}: key '{key}' missing")
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"benchmark file {path} is missing (listed in {mpath})")
        if path.stat().st_size != entry["bytes"]:
            raise DataError(f"corrupt benchmark file {path}: {path.stat().st_size} bytes, manifest says "
                            f"{entry['bytes']}")
    bench = Benchmark(root, manifest)
    for split in bench.splits:
        n = beton_num_rows(bench.split_path(split))
        if n != bench.num_rows(split):
            raise DataError(f"corrupt beton {bench.split_path(split)}: header says {n} rows, manifest "
                            f"{bench.num_rows(split)}")
    if verify:
        bench.verify()
    return bench


def _read_header(path: Path) -> tuple[np.void, np.ndarray]:
    try:
        header = np.fromfile(path, dtype=_HEADER, count=1)
        if len(header) != 1:
            raise ValueError("file shorter than the header")
        desc = np.fromfile(path, dtype=_FIELD_DESC, count=int(header[0]["num_fields"]), offset=_HEADER.itemsize)
    except (OSError, ValueError) as e:
        raise DataError(f"corrupt beton {path}: {e}") from e
    return header[0], desc


def beton_num_rows(path: str | os.PathLike) -> int:
    """Row count from a beton's header (raises :class:`DataError` if the file is not a fomo_ray beton)."""
    path = Path(path)
    header, desc = _read_header(path)
    if int(header["version"]) != _BETON_VERSION:
        raise DataError(f"corrupt beton {path}: FFCV format version {int(header['version'])}, "
                        f"expected {_BETON_VERSION}")
    names = tuple(bytes(d["name"]).split(b"\0")[0].decode("ascii", "replace") for d in desc)
    types = tuple(int(d["type_id"]) for d in desc)
    if names != FIELDS or types != _TYPE_IDS:
        raise DataError(f"corrupt beton {path}: fields {names} (types {types}), expected {FIELDS}")
    return int(header["num_samples"])


def read_row_meta(path: str | os.PathLike) -> np.ndarray:
    """The per-row FFCV metadata records (image mode/size/pointer, dataset, label, row) of a beton."""
    path = Path(path)
    n = beton_num_rows(path)
    offset = _HEADER.itemsize + len(FIELDS) * _FIELD_DESC.itemsize
    meta = np.fromfile(path, dtype=_ROW_META, count=n, offset=offset)
    if len(meta) != n:
        raise DataError(f"corrupt beton {path}: metadata truncated ({len(meta)} of {n} rows)")
    return meta


def read_images(path: str | os.PathLike, rows: Sequence[int] | np.ndarray | None = None,
                size: int | None = None) -> np.ndarray:
    """Decode rows of a beton into ``uint8 [n, H, W, 3]`` with numpy (no FFCV needed).

    Raw-mode rows are returned bit-exactly. JPEG rows are decoded with PIL (FFCV uses libjpeg-turbo directly, so
    pixels may differ by a little). Rows of differing sizes need ``size``: each image is then centre-cropped to a
    square and resized to ``size`` (bicubic), mirroring FFCV's ``CenterCropRGBImageDecoder`` up to interpolation.
    """
    path = Path(path)
    meta = read_row_meta(path)
    rows = np.arange(len(meta)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(meta)):
        raise DataError(f"{path}: row ids out of range [0, {len(meta)})")
    img = meta["image"][rows]
    hw = set(zip(img["height"].tolist(), img["width"].tolist()))
    if size is None and len(hw) > 1:
        raise DataError(f"{path}: rows have {len(hw)} different image sizes; pass size= to resize them")
    out_hw = (size, size) if size is not None else (next(iter(hw)) if hw else (0, 0))
    out = np.empty((len(rows), out_hw[0], out_hw[1], 3), dtype=np.uint8)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    sizes = _alloc_sizes(path, meta) if (img["mode"] == _MODE_JPG).any() else None
    for i, rec in enumerate(img):
        h, w, ptr = int(rec["height"]), int(rec["width"]), int(rec["data_ptr"])
        if rec["mode"] == _MODE_RAW:
            im = np.asarray(mm[ptr:ptr + h * w * 3]).reshape(h, w, 3)
        else:
            im = _decode_jpeg(bytes(mm[ptr:ptr + sizes[ptr]]))
        out[i] = im if (h, w) == out_hw else center_crop_resize(im, out_hw[0])
    return out


def _alloc_sizes(path: Path, meta: np.ndarray) -> dict[int, int]:
    header, _ = _read_header(path)
    table = np.fromfile(path, dtype=_ALLOC, offset=int(header["alloc_table_ptr"]))
    return dict(zip(table["ptr"].tolist(), table["size"].tolist()))


def _decode_jpeg(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop then bicubic resize to ``size`` x ``size`` (PIL)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + s, left:left + s]))
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(file_hashes: Mapping[str, str]) -> str:
    """sha256 over the sorted ``(relative path, file sha256)`` pairs of a benchmark (the manifest excluded)."""
    blob = json.dumps(sorted(file_hashes.items()), separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
