"""Writing a benchmark directory: FFCV ``.beton`` files, row-aligned metadata and captions, the manifest last.

The format is described in :mod:`fomo_ray.data.format` (which reads it). Writing never leaves anything that looks
complete: every file is written under ``.staging-*`` and renamed into place by :meth:`BenchmarkWriter.finish`, the
manifest last; a rebuild deletes the old manifest *first*. FFCV's ``DatasetWriter`` hangs forever if a worker raises,
so every sample is validated and converted to plain types (contiguous ``uint8`` HxWx3, Python ints) inside a guard
that records failures instead of raising; they are raised as one :class:`DataError` naming split, row and culprit
after the writer has returned. :meth:`BenchmarkWriter.finish` also writes the token ids of every caption for the
tokenizers it is given, through the same function that upgrades an existing benchmark (:mod:`fomo_ray.data.tokens`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fomo_ray.data.ffcv_import import cache_typed_dict
from fomo_ray.data.format import (FORMAT, MANIFEST, SEP, SPLITS, Benchmark, DataError, DatasetInfo, check_dataset_info,
                                  content_hash, open_benchmark, sha256_file)
from fomo_ray.data.tokens import TOKENS_DIR, Tokenizer, move_staged, stage_tokens, tokenizer_key

WRITE_MODES = ("raw", "jpg")
_SPLIT_ROLES = {"pool": ("pool",), "train": ("adapt",), "test": ("adapt", "eval")}
_MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB)


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
        shutil.rmtree(self.root / TOKENS_DIR, ignore_errors=True)  # derived from the old captions, now unlisted
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
        cache_typed_dict()
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
    def finish(self, tokenizers: Sequence[tuple[Tokenizer, int]] = ()) -> Benchmark:
        """Hash every file, move them into place and write the manifest last (atomic rename).

        ``tokenizers`` (``(tokenizer, context_length)`` pairs) get the token ids of every caption written beside the
        captions (:mod:`fomo_ray.data.tokens`), so runs with them never tokenise; the content hash covers the data
        files only, not these derived ones, so it is the same with or without them.
        """
        if not self._splits:
            raise DataError(f"benchmark {self.root}: no split was written")
        rels = [v for s in self._splits.values() for v in (s["file"], s["meta"], s["captions"])]
        rels += list(self._streams.values())
        files = {rel: {"bytes": (self.staging / rel).stat().st_size, "sha256": sha256_file(self.staging / rel)}
                 for rel in rels}
        for split, entry in self._splits.items():
            entry["sha256"] = files[entry["file"]]["sha256"]
        datasets = [DatasetInfo(d.name, d.role, d.task, d.classnames, d.template, self._ranges[d.name]).to_json()
                    for d in self._infos]
        data_hash = content_hash({k: v["sha256"] for k, v in files.items()})  # before the derived token files join
        tokens = self._stage_tokens(tokenizers, files)
        manifest = {"format": FORMAT, "name": self.name, "image_size": self.image_size, "content_hash": data_hash,
                    "write_mode": self.write_mode, "splits": self._splits, "datasets": datasets,
                    "streams": self._streams, "tokens": tokens, "files": files}
        clash = sorted(set(self.extra) & set(manifest))
        if clash:
            raise DataError(f"writer extra keys {clash} clash with manifest keys")
        manifest.update(self.extra)
        (self.root / "streams").mkdir(exist_ok=True)
        move_staged(self.staging, self.root, files)
        tmp = self.staging / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.root / MANIFEST)
        shutil.rmtree(self.staging, ignore_errors=True)
        return open_benchmark(self.root)

    def _stage_tokens(self, tokenizers: Sequence[tuple[Tokenizer, int]], files: dict[str, dict]) -> dict[str, dict]:
        """Stage the token files of each distinct tokenizer from the staged captions; adds them to ``files`` and
        returns the manifest's ``tokens`` entry."""
        tokens: dict[str, dict] = {}
        for tokenizer, context_length in tokenizers:
            key = tokenizer_key(tokenizer, context_length)
            if key in tokens:
                continue  # e.g. fomo-tiny-s and fomo-tiny-m share one tokenizer
            tokens[key], key_files = stage_tokens(self.staging, key, self._staged_captions, list(self._splits),
                                                  tokenizer, context_length)
            files.update(key_files)
        return tokens

    def _staged_captions(self, split: str) -> list[list[str]]:
        """The captions of ``split`` exactly as written to its staged JSONL file (what the token ids must match)."""
        with open(self.staging / self._splits[split]["captions"], encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def abort(self) -> None:
        """Drop the staging area (the directory stays without a manifest, i.e. visibly incomplete)."""
        shutil.rmtree(self.staging, ignore_errors=True)
