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

Writing never leaves anything that looks complete: every file is written under ``.staging-*`` and renamed into
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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FORMAT = "fomo_ray/v1"
SPLITS = ("pool", "train", "test")
ROLES = ("pool", "adapt", "eval")
TASKS = ("classification", "retrieval")
FIELDS = ("image", "dataset", "label", "row")
WRITE_MODES = ("raw", "jpg")
SEP = "+++"  # FiF stream entries are "DATASET+++classname"
MANIFEST = "manifest.json"

# which dataset roles may have rows in which split
_SPLIT_ROLES = {"pool": ("pool",), "train": ("adapt",), "test": ("adapt", "eval")}

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
_MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB)


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
        """The zero-shot class prompts ``template.format(classname)`` (DESIGN §3)."""
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


# --------------------------------------------------------------------------------------------------- writing
def _page_size(max_side: int) -> int:
    """Smallest power-of-two FFCV page (>= 2 MiB) holding 8 raw images of side ``max_side``: small pages keep
    32-px files small, FFCV needs every sample to fit in one page."""
    need = 8 * max_side * max_side * 3
    page = _MIN_PAGE
    while page < need:
        page *= 2
    return page


def as_plain_image(image: Any) -> np.ndarray:
    """Validate and convert an image to a contiguous ``uint8`` HxWx3 array (what FFCV's RGBImageField needs)."""
    if not isinstance(image, np.ndarray):
        if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
            image = np.asarray(image.convert("RGB"))
        else:
            raise TypeError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image dtype must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise TypeError(f"image must be HxWx3, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


class _GuardedSamples:
    """What FFCV's writer workers index: validates one sample, logs its metadata, never raises.

    Each worker process appends one JSON line per row to its own log (``<pid>.jsonl``, line-buffered so nothing is
    lost when the worker exits); an invalid sample is logged as an error and replaced by a 1x1 black image, so
    the writer finishes instead of hanging, and the parent raises after reading the logs.
    """

    def __init__(self, samples: Sequence, datasets: dict[str, int], infos: list[DatasetInfo], split: str,
                 log_dir: Path, max_side: int, max_resolution: int | None):
        self.samples, self.datasets, self.infos, self.split = samples, datasets, infos, split
        self.log_dir, self.max_side, self.max_resolution = log_dir, max_side, max_resolution
        self._log = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def _write(self, record: dict[str, Any]) -> None:
        if self._pid != os.getpid():  # first use in this (forked) worker
            self._pid = os.getpid()
            self._log = open(self.log_dir / f"{self._pid}.jsonl", "a", buffering=1, encoding="utf-8")
        self._log.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int, int]:
        i = int(i)
        try:
            image, ds, label, caps = self._check(self.samples[i])
        except Exception as e:  # noqa: BLE001 - must never propagate into an FFCV worker (it would hang)
            self._write({"i": i, "error": f"{type(e).__name__}: {e}"})
            return np.zeros((1, 1, 3), np.uint8), 0, -1, i
        self._write({"i": i, "d": ds, "l": label, "c": caps})
        return image, ds, label, i

    def _check(self, sample: Any) -> tuple[np.ndarray, int, int, list[str]]:
        if not isinstance(sample, (tuple, list)) or len(sample) != 4:
            raise TypeError("a sample must be (image, dataset_name, label, captions)")
        image, name, label, caps = sample
        image = as_plain_image(image)
        h, w = image.shape[:2]
        side = max(h, w) if self.max_resolution is None else min(max(h, w), self.max_resolution)
        if side > self.max_side:
            raise ValueError(f"image {h}x{w} exceeds the writer's page budget (max side {self.max_side}); "
                             f"pass max_resolution= to the writer")
        if name not in self.datasets:
            raise KeyError(f"unknown dataset {name!r} (add_dataset it first; known: {list(self.datasets)})")
        info = self.infos[self.datasets[name]]
        if info.role not in _SPLIT_ROLES[self.split]:
            raise ValueError(f"dataset '{name}' has role '{info.role}', which has no rows in split '{self.split}'")
        label = _as_int(label, "label")
        if info.task == "classification" and not 0 <= label < len(info.classnames):
            raise ValueError(f"label {label} out of range for dataset '{name}' ({len(info.classnames)} classes)")
        if info.task == "retrieval" and not info.classnames and label != -1:
            raise ValueError(f"retrieval/pool dataset '{name}' has no class list, so its rows must have label -1, "
                             f"got {label}")
        if info.task == "retrieval" and info.classnames and not -1 <= label < len(info.classnames):
            raise ValueError(f"label {label} out of range for dataset '{name}' ({len(info.classnames)} classes)")
        if isinstance(caps, str) or not isinstance(caps, (list, tuple)):
            raise TypeError(f"captions must be a list of strings, got {type(caps).__name__}")
        if not all(isinstance(c, str) and c.strip() for c in caps):
            raise TypeError(f"captions must be non-empty strings, got {list(caps)[:3]!r}")
        caps = [str(c) for c in caps]
        if not caps and (self.split in ("pool", "train") or info.task == "retrieval"):
            raise ValueError(f"row of dataset '{name}' in split '{self.split}' needs at least one caption")
        return image, self.datasets[name], label, caps


class BenchmarkWriter:
    """Writes a benchmark directory; nothing looks complete until :meth:`finish` renames the manifest into place.

    ``write_mode="raw"`` stores pixels (exact, best for small images); ``"jpg"`` stores JPEG (real data), with
    images larger than ``max_resolution`` downscaled by FFCV. ``num_workers=1`` (the default) makes the beton
    bytes - and so the content hash - deterministic; more workers write faster but allocate pages in arrival order.
    ``extra`` is merged into the manifest (e.g. the generator's seed and version).
    """

    def __init__(self, root: str | os.PathLike, name: str, image_size: int, *, write_mode: str = "raw",
                 max_resolution: int | None = None, jpeg_quality: int = 90, num_workers: int = 1,
                 extra: Mapping[str, Any] | None = None):
        if write_mode not in WRITE_MODES:
            raise DataError(f"write_mode {write_mode!r} is not one of {list(WRITE_MODES)}")
        if int(image_size) < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.name, self.image_size = name, int(image_size)
        self.write_mode, self.max_resolution, self.jpeg_quality = write_mode, max_resolution, int(jpeg_quality)
        self.num_workers = max(1, int(num_workers))
        self.extra = dict(extra or {})
        self.root.mkdir(parents=True, exist_ok=True)
        # A rebuild invalidates the old benchmark before touching any of its files.
        (self.root / MANIFEST).unlink(missing_ok=True)
        for stale in self.root.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.staging = self.root / f".staging-{os.getpid()}"
        self.staging.mkdir()
        self._infos: list[DatasetInfo] = []
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}
        self._splits: dict[str, dict[str, Any]] = {}
        self._streams: dict[str, str] = {}
        # every sample must fit in one FFCV page, else its writer worker fails (and hangs the writer)
        self._page = _page_size(max(self.image_size, max_resolution or 0))
        self._max_side = int((self._page // 2 // 3) ** 0.5)

    # ------------------------------------------------------------------------------------------- datasets
    def add_dataset(self, info: DatasetInfo | Mapping[str, Any]) -> DatasetInfo:
        """Register a dataset (its rows are filled in by :meth:`write_split`); order = manifest order."""
        if isinstance(info, Mapping):
            info = DatasetInfo(name=info["name"], role=info["role"], task=info["task"],
                               classnames=tuple(info.get("classnames", ())), template=info.get("template", ""))
        info = DatasetInfo(info.name, info.role, info.task, tuple(info.classnames), info.template, {})
        check_dataset_info(info, f"writer for {self.root}")
        if any(d.name == info.name for d in self._infos):
            raise DataError(f"dataset '{info.name}' added twice")
        self._infos.append(info)
        self._ranges[info.name] = {}
        return info

    # ------------------------------------------------------------------------------------------- splits
    def write_split(self, split: str, samples: Iterable) -> int:
        """Write one split from ``(image_uint8_HWC, dataset_name, label, [captions])`` samples; returns its rows.

        Each dataset's rows must be contiguous. An indexable ``samples`` (``__len__`` + ``__getitem__``, e.g. a
        torch Dataset) is read lazily by the FFCV workers; any other iterable is materialised first.
        """
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; valid: {list(SPLITS)}")
        if split in self._splits:
            raise DataError(f"split '{split}' written twice")
        if not (hasattr(samples, "__len__") and hasattr(samples, "__getitem__")):
            samples = list(samples)
        n = len(samples)
        if n == 0:
            raise DataError(f"split '{split}' has no samples")
        log_dir = self.staging / f"{split}.log"
        log_dir.mkdir()
        guarded = _GuardedSamples(samples, {d.name: i for i, d in enumerate(self._infos)}, self._infos, split,
                                  log_dir, self._max_side, self.max_resolution)
        beton = self.staging / f"{split}.beton"
        try:
            self._run_ffcv_writer(beton, guarded)
            ds, labels, caps = self._collect_logs(split, log_dir, n)
            self._record_ranges(split, ds)
        except BaseException:
            beton.unlink(missing_ok=True)  # the split can be written again after fixing its samples
            shutil.rmtree(log_dir, ignore_errors=True)
            for ranges in self._ranges.values():
                ranges.pop(split, None)
            raise
        meta = self.staging / f"{split}.meta.npz"
        with open(meta, "wb") as f:
            np.savez(f, dataset=ds, label=labels)
        with open(self.staging / f"{split}.captions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in caps)
        shutil.rmtree(log_dir)
        self._splits[split] = {"file": f"{split}.beton", "rows": n, "meta": f"{split}.meta.npz",
                               "captions": f"{split}.captions.jsonl"}
        return n

    def _run_ffcv_writer(self, path: Path, samples: _GuardedSamples) -> None:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

        image = RGBImageField(write_mode=self.write_mode, max_resolution=self.max_resolution,
                              jpeg_quality=self.jpeg_quality)
        fields = {"image": image, "dataset": IntField(), "label": IntField(), "row": IntField()}
        writer = DatasetWriter(str(path), fields, page_size=self._page, num_workers=self.num_workers)
        writer.from_indexed_dataset(samples, chunksize=max(1, min(1000, len(samples) // self.num_workers + 1)))

    def _collect_logs(self, split: str, log_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        ds = np.full(n, -1, np.int32)
        labels = np.full(n, -1, np.int32)
        caps: list[list[str] | None] = [None] * n
        errors: list[tuple[int, str]] = []
        for log in sorted(log_dir.glob("*.jsonl")):
            for line in log.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if "error" in rec:
                    errors.append((rec["i"], rec["error"]))
                else:
                    ds[rec["i"]], labels[rec["i"]], caps[rec["i"]] = rec["d"], rec["l"], rec["c"]
        if errors:
            errors.sort()
            shown = "; ".join(f"row {i}: {msg}" for i, msg in errors[:3])
            raise DataError(f"split '{split}': {len(errors)} invalid sample(s), nothing written. {shown}")
        missing = [i for i, c in enumerate(caps) if c is None]
        if missing:
            raise DataError(f"split '{split}': the FFCV writer did not report rows {missing[:5]} "
                            f"({len(missing)} missing)")
        return ds, labels, caps  # type: ignore[return-value]

    def _record_ranges(self, split: str, ds: np.ndarray) -> None:
        change = np.flatnonzero(np.diff(ds)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(ds)]])
        seen: set[int] = set()
        for s, e in zip(starts.tolist(), ends.tolist()):
            d = int(ds[s])
            if d in seen:
                raise DataError(f"split '{split}': rows of dataset '{self._infos[d].name}' are not contiguous "
                                f"(again at row {s})")
            seen.add(d)
            self._ranges[self._infos[d].name][split] = (s, e)

    # ------------------------------------------------------------------------------------------- streams
    def add_stream(self, name: str, entries: Sequence[str]) -> None:
        """Write ``streams/<name>.json`` after checking every entry names an adaptation class, once."""
        adapt = {d.name: set(d.classnames) for d in self._infos if d.role == "adapt"}
        seen: set[str] = set()
        for i, e in enumerate(entries):
            if not isinstance(e, str) or SEP not in e:
                raise DataError(f"stream '{name}': entry {i} {e!r} is not 'DATASET{SEP}classname'")
            d, c = e.split(SEP, 1)
            if d not in adapt or c not in adapt[d]:
                raise DataError(f"stream '{name}': entry {i} {e!r} is not an adaptation class of this benchmark")
            if e in seen:
                raise DataError(f"stream '{name}': duplicate entry {e!r}")
            seen.add(e)
        (self.staging / "streams").mkdir(exist_ok=True)
        (self.staging / "streams" / f"{name}.json").write_text(json.dumps(list(entries), indent=0) + "\n")
        self._streams[name] = f"streams/{name}.json"

    # ------------------------------------------------------------------------------------------- finish
    def finish(self) -> Benchmark:
        """Hash every file, move them into place and write the manifest last (atomic rename)."""
        if not self._splits:
            raise DataError(f"benchmark {self.root}: no split was written")
        rels = [v for s in self._splits.values() for v in (s["file"], s["meta"], s["captions"])]
        rels += list(self._streams.values())
        files = {}
        for rel in rels:
            path = self.staging / rel
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for split, entry in self._splits.items():
            entry["sha256"] = files[entry["file"]]["sha256"]
        datasets = [DatasetInfo(d.name, d.role, d.task, d.classnames, d.template, self._ranges[d.name]).to_json()
                    for d in self._infos]
        manifest = {"format": FORMAT, "name": self.name, "image_size": self.image_size,
                    "content_hash": content_hash({k: v["sha256"] for k, v in files.items()}),
                    "write_mode": self.write_mode, "splits": self._splits, "datasets": datasets,
                    "streams": self._streams, "files": files}
        clash = sorted(set(self.extra) & set(manifest))
        if clash:
            raise DataError(f"writer extra keys {clash} clash with manifest keys")
        manifest.update(self.extra)
        (self.root / "streams").mkdir(exist_ok=True)
        for rel in rels:
            os.replace(self.staging / rel, self.root / rel)
        tmp = self.staging / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.root / MANIFEST)
        shutil.rmtree(self.staging, ignore_errors=True)
        return open_benchmark(self.root)

    def abort(self) -> None:
        """Drop the staging area (the directory stays without a manifest, i.e. visibly incomplete)."""
        shutil.rmtree(self.staging, ignore_errors=True)
