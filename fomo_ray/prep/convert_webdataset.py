"""Convert a web image-caption pool in webdataset tar shards into the project's FFCV format (the pool P).

The pool of FoMo-in-Flux (Roth, Udandarao et al., arXiv 2408.14471) is a DataComp / (Re-)LAION subset fetched with
img2dataset (``output_format="webdataset"``): shards ``<shards>/<NNNNN>.tar`` with, per sample, ``<key>.jpg|png|jpeg|
webp`` + ``<key>.txt`` (caption) and an optional ``<key>.json`` (metadata, ignored as FiF ignores it). See
``../shared/FIF_LAYOUT.md`` §6.

Pipeline (resumable, like ``convert_fif``):

1. *Shard check*: shard names must be contiguous zero-padded integers (FiF reads them with a ``{first..last}``
   brace pattern, so a hole means a lost shard): holes are listed and stop the run unless ``--allow-gaps``.
2. *Per-shard parts* under ``<out>/.parts/<shard>/`` (parallel over shards, in waves so a sample cap stops early):
   images decoded once and stored at ``--image-size`` (shorter side, centre crop); every sample's sha256 of the
   original image bytes is kept. Samples without caption, without image, or with a corrupt image are counted and
   reported; a shard holding images but no caption at all is an error naming it.
3. *Selection + assembly*: shards in name order, samples in tar order, the first occurrence of each image hash kept
   (exact-duplicate removal across the whole pool) until ``--max-samples``; then ``pool.beton``, the caption token
   ids for each ``--model``'s tokenizer (default: the default model) and the manifest.

Parts are written and read back through :mod:`fomo_ray.prep.staging` (shared with ``convert_fif``, which embeds a
finished pool with ``--pool``). The command is ``fomo-ray prepare pool`` (:mod:`fomo_ray.cli.prepare`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from fomo_ray.atomic import write_json
from fomo_ray.data.format import DataError, sha256_file
from fomo_ray.data.writer import BenchmarkWriter
from fomo_ray.prep.staging import (
    PARTS_DIR, POOL_DATASET, SELECTION, ConversionError, PartWriter, add_model_tokens, decode_fit, encode_image,
    iter_rows, model_tokenizers, part_problem, pool_rows, read_json, read_part_meta,
)
from fomo_ray.prep.workers import worker_pool

CONVERTER_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image extensions FiF's pool loader accepts


@dataclass(frozen=True)
class PoolOptions:
    shards: Path
    out: Path
    max_samples: int = 0  # 0 = keep every unique sample
    image_size: int = 224
    jpeg_quality: int = 95
    workers: int = 1
    allow_gaps: bool = False
    max_bad_fraction: float = 0.05  # web images that img2dataset already decoded rarely fail; more means damage
    name: str = "pool"
    progress: bool = True
    write_mode: str = "jpg"  # beton image storage: jpg (small) or raw (exact)
    writer_workers: int = 1  # FFCV writer processes; 1 keeps the beton byte-identical across reruns
    models: tuple[str, ...] = ()  # caption token ids are written for these models' tokenizers (empty: the default)


# =================================================================================================== shard names
def list_shards(directory: Path) -> list[Path]:
    """``*.tar`` files of a shard folder in name order (sidecar .parquet/_stats.json files are ignored)."""
    if not directory.is_dir():
        raise ConversionError(f"shard folder not found: {directory}")
    shards = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(".tar"))
    if not shards:
        raise ConversionError(f"no .tar shards in {directory} (expected img2dataset webdataset output)")
    return shards


def shard_gaps(names: Sequence[str]) -> tuple[list[str], list[int]]:
    """(names that are not zero-padded integers of one width, missing ids between the first and the last)."""
    stems = [n[:-len(".tar")] for n in names]
    width = len(stems[0]) if stems else 0
    odd = [n for n, s in zip(names, stems) if not (s.isdigit() and len(s) == width)]
    ids = sorted(int(s) for s in stems if s.isdigit() and len(s) == width)
    missing = sorted(set(range(ids[0], ids[-1] + 1)) - set(ids)) if ids else []
    return odd, missing


def check_shard_names(shards: Sequence[Path], allow_gaps: bool) -> None:
    odd, missing = shard_gaps([p.name for p in shards])
    if (odd or missing) and not allow_gaps:
        problems = []
        if odd:
            problems.append(f"shard names that are not zero-padded integers of one width: {', '.join(odd[:10])}"
                            + (" ..." if len(odd) > 10 else ""))
        if missing:
            width = len(shards[0].name) - len(".tar")
            problems.append(f"{len(missing)} shard(s) missing between {shards[0].name} and {shards[-1].name}: "
                            + ", ".join(f"{i:0{width}d}.tar" for i in missing[:10]) + (" ..." if len(missing) > 10
                                                                                       else ""))
        raise ConversionError("shard names are not contiguous (FiF reads shards as {first..last}.tar): "
                              + "; ".join(problems) + ". Re-download the missing shards or pass --allow-gaps.")


# =================================================================================================== one shard
def iter_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard, streamed: consecutive members with the same key (basename up to the first dot) form one
    sample, extensions lower-cased. Like webdataset itself, this relies on a sample's files being adjacent (as
    img2dataset writes them), so a whole shard (GBs of un-resized images) is never held in memory."""
    key, files = None, {}
    with tarfile.open(tar_path, mode="r|*") as tar:  # streaming mode: no member index is built
        for member in tar:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            k = os.path.join(directory, stem)
            if k != key and key is not None:
                yield key, files
                files = {}
            key = k
            f = tar.extractfile(member)
            files[ext.lower()] = f.read() if f else b""
    if key is not None:
        yield key, files


def shard_fingerprint(path: Path, opts: PoolOptions) -> str:
    """Shard identity (size + mtime: hashing ~50 GB on every rerun is too slow) and the settings."""
    st = path.stat()
    blob = [CONVERTER_VERSION, path.name, st.st_size, st.st_mtime_ns, opts.image_size, opts.jpeg_quality]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()


def convert_shard(shard: Path, opts: PoolOptions) -> dict:
    """Stage one shard into ``<out>/.parts/<stem>``; returns its counters. Raises ConversionError."""
    parts = opts.out / PARTS_DIR
    stem = shard.name[:-len(".tar")]
    tmp = parts / f".{stem}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"samples": 0, "staged": 0, "no_caption": 0, "no_image": 0, "corrupt": 0, "duplicate_in_shard": 0}
    bad: list[str] = []
    seen: set[str] = set()
    try:
        writer = PartWriter(tmp, "pool")
        try:
            for key, files in iter_samples(shard):
                problem = _stage_sample(key, files, writer, seen, counts, opts)
                if problem:
                    bad.append(f"{shard}:{key}\t{problem}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ConversionError(f"shard {shard} is not a readable tar ({type(e).__name__}: {e})") from e
        files_sha = writer.close()
        _check_shard(shard, counts, bad, opts)
        meta = {"shard": shard.name, "fingerprint": shard_fingerprint(shard, opts), "counts": counts,
                "files": files_sha, "bad": bad}
        write_json(tmp / "part.json", meta)  # last: a part without it is never reused
        shutil.rmtree(parts / stem, ignore_errors=True)
        os.replace(tmp, parts / stem)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _stage_sample(key: str, files: dict[str, bytes], writer: PartWriter, seen: set[str], counts: dict,
                  opts: PoolOptions) -> str | None:
    counts["samples"] += 1
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        counts["no_image"] += 1
        return f"no image ({'/'.join(IMAGE_EXTS)})"
    caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        counts["no_caption"] += 1
        return "no caption (.txt missing or empty)"
    sha = hashlib.sha256(files[ext]).hexdigest()
    if sha in seen:
        counts["duplicate_in_shard"] += 1
        return None  # not a problem: exact duplicates are expected in web data
    try:
        arr = decode_fit(files[ext], opts.image_size)
    except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt image; reported and counted
        counts["corrupt"] += 1
        return f"corrupt {ext} ({type(e).__name__}: {e})"
    seen.add(sha)
    writer.add(encode_image(arr, opts.jpeg_quality), -1, [caption], key, sha=sha)
    counts["staged"] += 1
    return None


def _check_shard(shard: Path, counts: dict, bad: list[str], opts: PoolOptions) -> None:
    with_image = counts["samples"] - counts["no_image"]
    if with_image and counts["no_caption"] == with_image:
        raise ConversionError(
            f"shard {shard}: {with_image} images but no caption at all (no non-empty <key>.txt). img2dataset writes "
            "captions to .txt only when run with caption_col; re-create the shards with captions")
    if counts["samples"] == 0:
        raise ConversionError(f"shard {shard} holds no samples")
    if with_image and counts["corrupt"] / with_image > opts.max_bad_fraction:
        raise ConversionError(
            f"shard {shard}: {counts['corrupt']} of {with_image} images corrupt (> --max-bad-fraction "
            f"{opts.max_bad_fraction:.1%}); e.g. {'; '.join(b for b in bad if 'corrupt' in b)[:300]}")


def _safe_shard(shard: Path, opts: PoolOptions) -> dict:
    try:
        return convert_shard(shard, opts)
    except ConversionError as e:
        return {"shard": shard.name, "error": str(e)}
    except Exception:  # noqa: BLE001 - unexpected bugs come back with their traceback
        return {"shard": shard.name, "error": f"shard {shard}: unexpected error\n{traceback.format_exc()}"}


# =================================================================================================== selection
def select_rows(parts: Path, stems: Sequence[str], cap: int) -> tuple[dict[str, list[int]], int]:
    """Rows kept per shard: first occurrence of each image hash, shards in order, until ``cap`` (0 = no cap).

    Returns ({stem: row indices}, number of cross-shard duplicates dropped).
    """
    seen: set[str] = set()
    keep: dict[str, list[int]] = {}
    total = dups = 0
    for stem in stems:
        rows = []
        for i, row in enumerate(iter_rows(parts / stem, "pool")):
            if cap and total >= cap:
                break
            if row["sha"] in seen:
                dups += 1
                continue
            seen.add(row["sha"])
            rows.append(i)
            total += 1
        keep[stem] = rows
        if cap and total >= cap:
            break
    return keep, dups


# =================================================================================================== driver
def convert_pool(opts: PoolOptions) -> dict:
    """The whole pipeline (module docstring). Returns a report dict; raises ConversionError on failure."""
    from tqdm import tqdm

    shards = list_shards(opts.shards)
    check_shard_names(shards, opts.allow_gaps)
    model_tokenizers(opts.models)  # a bad --model fails now, not after the conversion
    parts = opts.out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    metas: dict[str, dict] = {}
    failed: list[str] = []
    bar = tqdm(total=len(shards), unit="shard", desc="pool", disable=not opts.progress)
    todo = list(shards)
    wave_size = max(1, opts.workers)
    workers = worker_pool(wave_size, "pool conversion", ConversionError) if wave_size > 1 else nullcontext()
    with workers as pool:
        run = pool.map if pool else map
        while todo and not failed and not _enough(parts, _done(shards, metas), metas, opts.max_samples):
            wave, todo = todo[:wave_size], todo[wave_size:]
            results = list(run(_cached_or_convert, wave, [opts] * len(wave)))
            for shard, meta in zip(wave, results):
                if "error" in meta:
                    failed.append(meta["error"])
                else:
                    metas[_stem(shard)] = meta
                bar.update(1)
    bar.close()
    if failed:
        raise ConversionError("pool conversion failed (finished shards are kept for the rerun):\n  - "
                              + "\n  - ".join(failed))
    stems = _done(shards, metas)
    keep, dups = select_rows(parts, stems, opts.max_samples)
    report = _report(metas, keep, dups, len(shards))
    assemble_pool(parts, keep, opts, report)
    return report


def _stem(shard: Path) -> str:
    return shard.name[:-len(".tar")]


def _done(shards: Sequence[Path], metas: dict) -> list[str]:
    """Stems of the converted shards, in name order."""
    return [_stem(s) for s in shards if _stem(s) in metas]


def _enough(parts: Path, stems: list[str], metas: dict, cap: int) -> bool:
    """True once the shards converted so far (a name-ordered prefix) give ``cap`` unique samples."""
    if not cap or sum(metas[s]["counts"]["staged"] for s in stems) < cap:
        return False
    return sum(len(r) for r in select_rows(parts, stems, cap)[0].values()) >= cap


def _cached_or_convert(shard: Path, opts: PoolOptions) -> dict:
    part = opts.out / PARTS_DIR / _stem(shard)
    if part_problem(part, shard_fingerprint(shard, opts)) is None:
        meta = read_part_meta(part)
        meta["cached"] = True
        return meta
    return _safe_shard(shard, opts)


def _report(metas: dict, keep: dict, dups: int, n_shards: int) -> dict:
    totals: dict[str, int] = {}
    for m in metas.values():
        for k, v in m["counts"].items():
            totals[k] = totals.get(k, 0) + v
    return {"shards": n_shards, "shards_converted": sum(1 for m in metas.values() if not m.get("cached")),
            "shards_cached": sum(1 for m in metas.values() if m.get("cached")), "shards_used": len(keep),
            **totals, "duplicate_across_shards": dups, "kept": sum(len(r) for r in keep.values()),
            "bad_examples": [b for m in metas.values() for b in m["bad"]][:5]}


def assemble_pool(parts: Path, keep: dict[str, list[int]], opts: PoolOptions, report: dict | None = None) -> None:
    """``pool.beton`` + manifest from the selected rows (skipped when selection and parts are unchanged)."""
    stamp = {"parts": {s: sha256_file(parts / s / "part.json") for s in keep},
             "keep": hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest(),
             "name": opts.name, "image_size": opts.image_size, "write_mode": opts.write_mode}
    if (opts.out / "manifest.json").is_file() and read_json(parts / "assembled.json") == stamp:
        add_model_tokens(opts.out, opts.models)  # another --model needs no re-assembly, only its token ids
        return
    tokenizers = model_tokenizers(opts.models)
    rows = pool_rows(parts, keep)
    if len(rows) == 0:
        raise ConversionError(f"no usable sample in {opts.shards}")
    summary = {k: v for k, v in (report or {}).items() if k != "bad_examples"}
    writer = BenchmarkWriter(opts.out, opts.name, opts.image_size, write_mode=opts.write_mode,
                             num_workers=opts.writer_workers,
                             extra={"source": f"webdataset shards {opts.shards}", "conversion": summary})
    try:
        writer.add_dataset({"name": POOL_DATASET, "role": "pool", "task": "retrieval", "classnames": [],
                            "template": "{}"})
        writer.write_split("pool", rows)
        writer.finish(tokenizers)
    except DataError as e:
        writer.abort()
        raise ConversionError(f"assembling {opts.out} failed: {e}") from e
    write_json(parts / SELECTION, {"keep": keep})  # lets `prepare fif --pool` embed this exact selection
    write_json(parts / "assembled.json", stamp)


# =================================================================================================== report
def format_report(r: dict) -> str:
    lines = [f"shards: {r['shards']} ({r['shards_converted']} converted, {r['shards_cached']} reused from a "
             f"previous run, {r['shards_used']} used)",
             f"samples read: {r.get('samples', 0)}; kept: {r['kept']}; skipped: no caption {r.get('no_caption', 0)}, "
             f"no image {r.get('no_image', 0)}, corrupt {r.get('corrupt', 0)}; exact duplicates removed: "
             f"{r.get('duplicate_in_shard', 0)} within shards + {r['duplicate_across_shards']} across shards"]
    lines += [f"  skipped e.g. {b}" for b in r["bad_examples"]]
    return "\n".join(lines)
