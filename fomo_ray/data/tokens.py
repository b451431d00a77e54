"""Captions as token ids, tokenised once per tokenizer and stored beside the captions (no tokenizer in the step).

Layout inside a benchmark root (listed in the manifest under ``"tokens"`` and in ``"files"`` with their hashes)::

    tokens/<key>/<split>.ids.npy       uint16 (vocab <= 65536) or int32 [C, L]: every caption of every row
    tokens/<key>/<split>.offsets.npy   int64 [N + 1]: row r's captions are ids[offsets[r]:offsets[r + 1]]

``<key>`` names the tokenizer (:func:`tokenizer_key`): its class, context length and a hash of its ids for a fixed
probe text, so two tokenizers that split text differently never share a directory. The captions JSONL stays the
source of truth (retrieval evaluation and the converters read it); token files are derived and can always be
rebuilt from it, which is why the manifest's ``content_hash`` does not cover them: it names the data (images,
metadata, captions, streams), so adding a tokenizer never invalidates what is keyed on it (cached base checkpoints).

One function writes one tokenizer's files (:func:`stage_tokens`): :meth:`BenchmarkWriter.finish` calls it for a new
benchmark, :func:`add_tokens` / :func:`ensure_tokens` for an existing one (an older build without tokens, or a new
tokenizer). Adding tokens is safe against interruption and concurrency: files are staged, read back and checked,
moved into ``tokens/<key>/`` (new names: nothing listed is touched), and only then a manifest listing them replaces
the old one by rename, under the root's lock (:func:`root_lock`), so readers see the old or the new manifest, both
valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fomo_ray.atomic import file_lock
from fomo_ray.data.format import MANIFEST, Benchmark, DataError, open_benchmark, sha256_file

TOKENS_DIR = "tokens"
_PROBE = ["a photo of a Zebra-crossing, 42 times!", "naïve café: ümlaut ß", ""]
_ENCODE_BATCH = 4096

Tokenizer = Callable[..., Any]  # open_clip style: list[str] -> int array-like [n, context_length]


class TokensMissing(DataError):
    """A benchmark has no token ids for the run's tokenizer (an old-format root, or another tokenizer)."""


def tokenizer_key(tokenizer: Tokenizer, context_length: int) -> str:
    """A directory-safe name for what ``tokenizer`` produces at ``context_length``, e.g.
    ``simpletokenizer-ctx32-1a2b3c4d``."""
    ids = np.asarray(tokenizer(list(_PROBE)), dtype=np.int64)
    h = hashlib.sha256(type(tokenizer).__name__.encode() + ids.tobytes()).hexdigest()[:8]
    name = re.sub(r"[^a-z0-9]+", "", type(tokenizer).__name__.lower()) or "tokenizer"
    return f"{name}-ctx{int(context_length)}-{h}"


def upgrade_command(root: str | os.PathLike, model: str = "<model>") -> str:
    """The command that adds the token ids of ``model``'s tokenizer to the benchmark at ``root``."""
    return f"fomo-ray prepare tokens --root {root} --model {model}"


@dataclass(frozen=True)
class CaptionTokens:
    """Token ids of every caption of one split: ``ids [C, L]`` and row offsets ``[N + 1]``."""

    ids: np.ndarray
    offsets: np.ndarray

    def counts(self, rows: np.ndarray) -> np.ndarray:
        """Number of captions of each row."""
        return self.offsets[rows + 1] - self.offsets[rows]

    def pick(self, rows: np.ndarray, choice: np.ndarray) -> np.ndarray:
        """``int64 [len(rows), L]``: caption ``choice[i]`` of row ``rows[i]``."""
        return self.ids[self.offsets[rows] + choice].astype(np.int64)


# --------------------------------------------------------------------------------------------------- encoding
def encode_captions(captions: Sequence[Sequence[str]], tokenizer: Tokenizer, context_length: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [C, L], offsets [N + 1])`` of row-aligned caption lists (the stored form). ``context_length`` gives
    ``L`` when there is no caption at all (and is checked against the tokenizer's output otherwise)."""
    counts = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = [c for caps in captions for c in caps]
    parts = [np.asarray(tokenizer(flat[i:i + _ENCODE_BATCH]), dtype=np.int64)
             for i in range(0, len(flat), _ENCODE_BATCH)]
    ids = np.concatenate(parts) if parts else np.zeros((0, int(context_length or 0)), np.int64)
    if ids.ndim != 2 or (context_length is not None and ids.shape[1] != int(context_length)):
        raise DataError(f"tokenizer {type(tokenizer).__name__} returned ids of shape {ids.shape}, expected "
                        f"[captions, {context_length}]")
    dtype = np.uint16 if ids.size == 0 or (ids.min() >= 0 and ids.max() < 1 << 16) else np.int32
    return ids.astype(dtype), offsets


def split_files(key: str, split: str) -> tuple[str, str]:
    """Relative paths of the ids and offsets files of ``split`` for tokenizer ``key``."""
    return f"{TOKENS_DIR}/{key}/{split}.ids.npy", f"{TOKENS_DIR}/{key}/{split}.offsets.npy"


def stage_tokens(staging: Path, key: str, captions: Callable[[str], Sequence[Sequence[str]]],
                 splits: Sequence[str], tokenizer: Tokenizer, context_length: int
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Write the token files of tokenizer ``key`` for every split under ``staging`` at their final relative paths,
    each read back and compared before it is hashed. Returns the manifest's ``tokens[key]`` entry and the ``files``
    entries; the caller moves the files into the root (:func:`move_staged`) and writes the manifest. The one writer
    of token files, used for new benchmarks and upgrades alike."""
    files: dict[str, dict[str, Any]] = {}
    entry_splits: dict[str, dict[str, str]] = {}
    for split in splits:
        caps = captions(split)
        ids, offsets = encode_captions(caps, tokenizer, context_length)
        rel_ids, rel_off = split_files(key, split)
        for rel, arr in ((rel_ids, ids), (rel_off, offsets)):
            files[rel] = _save_checked(staging / rel, arr, split)
        entry_splits[split] = {"ids": rel_ids, "offsets": rel_off, "captions": int(len(ids))}
    entry = {"tokenizer": type(tokenizer).__name__, "context_length": int(context_length), "splits": entry_splits}
    return entry, files


def _save_checked(path: Path, arr: np.ndarray, split: str) -> dict[str, Any]:
    """Save ``arr`` and read it back: a file is hashed (and so can be listed) only once it holds what was meant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    back = np.load(path)
    if back.dtype != arr.dtype or not np.array_equal(back, arr):
        raise DataError(f"token file {path} (split '{split}') does not read back as written")
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def move_staged(staging: Path, root: Path, rels: Iterable[str]) -> None:
    """Rename staged files (relative paths) into ``root``, creating their folders."""
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, root / rel)


# --------------------------------------------------------------------------------------------------- reading
def has_tokens(bench: Benchmark, key: str) -> bool:
    """Whether the manifest lists token files of tokenizer ``key`` for every split."""
    entry = bench.manifest.get("tokens", {}).get(key)
    return bool(entry) and set(entry.get("splits", {})) >= set(bench.splits)


def load_tokens(bench: Benchmark, split: str, key: str, *, model: str | None = None) -> CaptionTokens:
    """The stored token ids of ``split`` (memory-mapped); :class:`TokensMissing` names the directory and the upgrade
    command (with ``model`` in it when the caller knows the architecture)."""
    entry = bench.manifest.get("tokens", {}).get(key)
    if not entry or split not in entry.get("splits", {}):
        have = sorted(bench.manifest.get("tokens", {}))
        raise TokensMissing(
            f"benchmark {bench.root} has no token ids for tokenizer '{key}' (split '{split}'; it has "
            f"{have or 'none: written by an older fomo_ray'}); add them with: "
            f"{upgrade_command(bench.root, model or '<model>')} (`fomo-ray run` and sweeps do this automatically)")
    files = entry["splits"][split]
    where = bench.root / TOKENS_DIR / key
    try:
        ids = np.load(bench.root / files["ids"], mmap_mode="r")
        offsets = np.load(bench.root / files["offsets"])
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"corrupt token files of split '{split}' in {where}: {e!r}") from e
    n = bench.num_rows(split)
    if offsets.shape != (n + 1,) or int(offsets[-1]) != len(ids) or ids.ndim != 2:
        raise DataError(f"corrupt token files of split '{split}' in {where}: {len(offsets) - 1} rows / {len(ids)} "
                        f"captions, manifest says {n} rows")
    return CaptionTokens(ids, offsets)


# --------------------------------------------------------------------------------------------------- upgrading
def root_lock(root: str | os.PathLike) -> contextlib.AbstractContextManager:
    """The one lock of a benchmark root (a file beside it, as the root itself may be rebuilt): building FiF-mini and
    adding tokens take it, so concurrent Ray trials on one machine neither build nor upgrade a root twice (resolved:
    a relative and an absolute spelling of one root share the lock)."""
    root = Path(root).resolve()
    return file_lock(root.parent / f".{root.name}.lock")


def add_tokens(root: str | os.PathLike, tokenizer: Tokenizer, context_length: int) -> Benchmark:
    """Tokenise every caption of the benchmark at ``root`` and record the files in its manifest (a no-op when
    present); see :func:`ensure_tokens`."""
    return ensure_tokens(root, [(tokenizer, context_length)])[0]


def ensure_tokens(root: str | os.PathLike, tokenizers: Iterable[tuple[Tokenizer, int]]
                  ) -> tuple[Benchmark, list[str]]:
    """Add the token ids of every ``(tokenizer, context_length)`` the benchmark at ``root`` lacks. Returns the
    (re)opened benchmark and the keys written (empty: nothing was needed). Idempotent; returns without locking when
    nothing is missing, so a read-only root that is up to date works."""
    bench = open_benchmark(root)
    todo: dict[str, tuple[Tokenizer, int]] = {}
    for tok, ctx in tokenizers:
        key = tokenizer_key(tok, ctx)
        if key not in todo and not has_tokens(bench, key):
            todo[key] = (tok, int(ctx))
    written: list[str] = []
    if not todo:
        return bench, written
    try:
        with root_lock(bench.root):
            for key, (tok, ctx) in todo.items():
                bench = open_benchmark(bench.root)  # under the lock: another process may have added it meanwhile
                if not has_tokens(bench, key):
                    bench = _add_key(bench, key, tok, ctx)
                    written.append(key)
    except OSError as e:
        raise DataError(f"could not add token ids to benchmark {bench.root} (left unchanged): {e}; it and its parent "
                        f"folder must be writable, or run `{upgrade_command(bench.root)}` where they are") from e
    return bench, written


def _add_key(bench: Benchmark, key: str, tokenizer: Tokenizer, context_length: int) -> Benchmark:
    """Stage, check and move in the files of ``key``, then swap the manifest (caller holds the root's lock). On any
    failure before the swap the staging area and the moved-in files are removed: the old benchmark is untouched."""
    root = bench.root
    if key in bench.manifest.get("tokens", {}):
        raise DataError(f"{root / MANIFEST} lists tokenizer '{key}' without every split {list(bench.splits)}; the "
                        f"manifest was edited by hand: restore it or rebuild the benchmark")
    staging = root / f".staging-tokens-{key}"
    shutil.rmtree(staging, ignore_errors=True)
    swapped = False
    try:
        entry, files = stage_tokens(staging, key, bench.captions, bench.splits, tokenizer, context_length)
        move_staged(staging, root, files)
        manifest = dict(bench.manifest)
        manifest["tokens"] = {**manifest.get("tokens", {}), key: entry}
        manifest["files"] = {**manifest["files"], **files}
        tmp = staging / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, root / MANIFEST)
        swapped = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not swapped:
            shutil.rmtree(root / TOKENS_DIR / key, ignore_errors=True)
    return open_benchmark(root)


def token_summary(bench: Benchmark, key: str) -> str:
    """What ``bench`` holds for tokenizer ``key``, for logs: ``pool 1000 rows/3000 captions, ...``."""
    entry = bench.manifest.get("tokens", {}).get(key, {})
    return ", ".join(f"{s} {bench.num_rows(s)} rows/{e.get('captions', '?')} captions"
                     for s, e in entry.get("splits", {}).items())
