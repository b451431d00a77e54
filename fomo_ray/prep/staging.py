"""Staging of the converters: what ``convert_fif`` (FiF datasets) and ``convert_webdataset`` (a web pool P) share.

Both converters decode every source image once, fit it to a square (``fit_image``) and stage it re-encoded in a
*part*: one folder per dataset (FiF) or shard (pool) under ``<out>/.parts/``, holding per split
``<split>.images.bin`` (concatenated encoded images), ``<split>.index.npz`` (byte offsets, labels) and
``<split>.rows.jsonl`` (key, captions and extras per row), plus ``part.json`` written last with the sha256 of every
file. A part without ``part.json``, or whose fingerprint or hashes no longer match, is rebuilt on the next run
(``part_problem``), so conversions resume and nothing half-written ever looks complete.

Assembly reads parts lazily through :class:`StagedRows`; a finished pool conversion keeps its row selection in
``SELECTION`` so ``prepare fif --pool`` can embed exactly that pool (``staged_pool``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from fomo_ray.data.format import sha256_file

PARTS_DIR = ".parts"
POOL_DATASET = "POOL"  # the one dataset of a converted pool, and of a benchmark that embeds one
SELECTION = "selection.json"  # rows kept per pool shard, written next to the parts at assembly
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
        return {n: sha256_file(self.directory / n) for n in names}


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
    """A part's ``part.json`` (fingerprint, file hashes, counters), or None when the part is unfinished."""
    return read_json(Path(directory) / "part.json")


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
        if sha256_file(p) != sha:
            return f"{name} changed (sha256 mismatch)"
    return None


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


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable (a stamp or selection not written yet)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# =================================================================================================== pool
def pool_rows(parts: Path, keep: dict[str, list[int]]) -> StagedRows:
    """The selected staged rows of a pool, as (image, POOL, -1, [caption]) samples."""
    return StagedRows([(parts / stem, "pool", POOL_DATASET, r) for stem, r in keep.items() if r])


def staged_pool(root: Path) -> tuple[StagedRows, str]:
    """The staged rows of a pool converted by ``convert_webdataset`` (for ``prepare fif --pool``) and a hash of its
    selection."""
    parts = Path(root) / PARTS_DIR
    selection = read_json(parts / SELECTION)
    if not (Path(root) / "manifest.json").is_file() or selection is None:
        raise ConversionError(f"{root} is not a finished pool conversion (run `fomo-ray prepare pool --out {root}` "
                              "first; its .parts folder must still exist)")
    keep = selection["keep"]
    stamp = {s: sha256_file(parts / s / "part.json") for s in keep if keep[s]}
    return pool_rows(parts, keep), hashlib.sha256(json.dumps([keep, stamp], sort_keys=True).encode()).hexdigest()


# =================================================================================================== tokens
def model_tokenizers(models: Sequence[str]) -> list:
    """``(tokenizer, context_length)`` of ``models`` (empty: the default model) for ``BenchmarkWriter.finish``; a
    ConversionError names an unknown model (checked before converting, not after hours of it)."""
    from fomo_ray.prep.tokenize import tokenizers_for

    try:
        return tokenizers_for(models)
    except ValueError as e:  # backbones.BackboneError: unknown architecture
        raise ConversionError(f"--model: {e}") from e


def add_model_tokens(out: Path, models: Sequence[str]) -> None:
    """Add the caption token ids an assembled output lacks for ``models`` (a rerun with another ``--model`` needs no
    re-assembly), printing a line per tokenizer added."""
    from fomo_ray.prep.tokenize import upgrade

    try:
        upgrade(out, models)
    except ValueError as e:  # DataError / BackboneError
        raise ConversionError(f"adding caption token ids to {out} failed: {e}") from e
