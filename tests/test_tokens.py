"""Caption token ids stored with a benchmark: they round-trip to the captions, an old-format root gets a clear error
and a safe upgrade (CLI, interrupted upgrade, ensure_inputs), and the content hash ignores them."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from _data_util import toy_images
from fomo_ray.models.backbones import DEFAULT_ARCH, create_backbone, tokenizer_for
from fomo_ray.data import tokens as tokens_mod
from fomo_ray.data.format import MANIFEST, DatasetInfo, content_hash, open_benchmark
from fomo_ray.data.tokens import TokensMissing, load_tokens, tokenizer_key
from fomo_ray.data.writer import BenchmarkWriter

pytestmark = pytest.mark.timeout(240)

POOL_CAPTIONS = [
    ["A photo of a RED circle.", "red circle, left of a square"],
    ["Naïve café: ümlaut ß and émoji ✈"],
    ["two blue squares above a green triangle", "a diagram", "the third caption of this row"],
    [" ".join(["a very long caption that the tokenizer must truncate"] * 6)],  # > 32 tokens
    ["numbers 1 2 3 and punctuation!?"],
    ["last row"],
]


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(DEFAULT_ARCH)


def _write(root: Path, tokenizers=(), old_format: bool = False):
    """Pool rows with varied captions, test rows of an eval dataset without captions; ``old_format`` writes the
    manifest exactly as fomo_ray did before token ids existed (no ``tokens`` key)."""
    images = toy_images(len(POOL_CAPTIONS) + 4)
    w = BenchmarkWriter(root, "tok", images.shape[1])
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    w.add_dataset(DatasetInfo("E", "eval", "classification", ("red", "blue"), "something {}."))
    w.write_split("pool", [(images[i], "POOL", -1, caps) for i, caps in enumerate(POOL_CAPTIONS)])
    w.write_split("test", [(images[len(POOL_CAPTIONS) + i], "E", i % 2, []) for i in range(4)])
    bench = w.finish(tokenizers)
    if old_format:
        manifest = dict(bench.manifest)
        del manifest["tokens"]
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        bench = open_benchmark(root)
    return bench


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer):
    return _write(tmp_path_factory.mktemp("tok") / "new", [tokenizer, tokenizer])  # a duplicate is written once


@pytest.fixture(scope="module")
def old_root(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("tok") / "old", old_format=True).root


@pytest.fixture
def old(old_root, tmp_path):
    """A fresh copy of the old-format benchmark per test (tests upgrade it)."""
    return open_benchmark(shutil.copytree(old_root, tmp_path / "old"))


def _sha_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _text(tok, ids: np.ndarray) -> str:
    """The text between start and end of text, spacing removed (BPE decoding spaces out punctuation)."""
    ids = [int(i) for i in ids]
    end = ids.index(tok.eot_token_id)
    return "".join(tok.decode(ids[1:end]).split())


def test_tokenizer_for_matches_the_backbone_without_building_it(tokenizer):
    bb = create_backbone(DEFAULT_ARCH)
    assert tokenizer[1] == bb.context_length == 32
    assert tokenizer_key(*tokenizer) == tokenizer_key(bb.tokenizer, bb.context_length)
    assert tokenizer_key(*tokenizer_for("fomo-tiny-l")) == tokenizer_key(*tokenizer)  # tiny archs share it
    assert tokenizer_key(*tokenizer_for("ViT-B-16")) != tokenizer_key(*tokenizer)    # context 77


def test_token_ids_round_trip_to_the_captions(written, tokenizer):
    import open_clip.tokenizer as octok

    tok, ctx = tokenizer
    key = tokenizer_key(tok, ctx)
    assert list(written.manifest["tokens"]) == [key]
    stored = load_tokens(written, "pool", key)
    assert stored.ids.dtype == np.uint16 and stored.ids.shape[1] == ctx
    caps = written.captions("pool")
    rows = np.repeat(np.arange(len(caps)), [len(c) for c in caps])
    choice = np.concatenate([np.arange(len(c)) for c in caps])
    np.testing.assert_array_equal(stored.counts(np.arange(len(caps))), [len(c) for c in caps])
    picked = stored.pick(rows, choice)
    flat = [c for cs in caps for c in cs]
    np.testing.assert_array_equal(picked, tok(flat).numpy())
    for ids, caption in zip(picked, flat):
        if ids[-1] == 0:  # not truncated: decoding gives the caption back (normalised, lower-cased)
            assert _text(tok, ids) == "".join(octok.whitespace_clean(octok.basic_clean(caption)).lower().split())
    test = load_tokens(written, "test", key)  # rows without captions
    assert test.ids.shape == (0, ctx) and (test.counts(np.arange(4)) == 0).all()
    open_benchmark(written.root, verify=True)  # token files are listed with their sha256


def test_content_hash_covers_the_data_not_the_derived_token_files(written, old_root):
    files = written.manifest["files"]
    assert any(rel.startswith("tokens/") for rel in files)
    data = {rel: e["sha256"] for rel, e in files.items() if not rel.startswith("tokens/")}
    assert written.content_hash == content_hash(data) == open_benchmark(old_root).content_hash


def test_old_format_gets_a_clear_error_then_the_cli_upgrades_it(old, tokenizer, capsys):
    from fomo_ray.cli import main

    key = tokenizer_key(*tokenizer)
    where = re.escape(str(old.root))
    with pytest.raises(TokensMissing, match=rf"{where}.*fomo-ray prepare tokens --root {where}") as e:
        load_tokens(old, "pool", key)
    assert "older fomo_ray" in str(e.value)
    before = _sha_tree(old.root)
    assert main(["prepare", "tokens", "--root", str(old.root)]) == 0
    assert f"upgraded {old.root} for tokenizer {key}" in capsys.readouterr().out
    after = _sha_tree(old.root)
    assert {rel: sha for rel, sha in after.items() if rel in before and rel != MANIFEST} == \
        {rel: sha for rel, sha in before.items() if rel != MANIFEST}  # betons, captions, meta, streams untouched
    assert sorted(set(after) - set(before)) == sorted(tokens_mod.split_files(key, "pool")
                                                      + tokens_mod.split_files(key, "test"))
    upgraded = open_benchmark(old.root, verify=True)
    assert upgraded.content_hash == old.content_hash
    np.testing.assert_array_equal(load_tokens(upgraded, "pool", key).pick(np.array([0]), np.array([0])),
                                  tokenizer[0]([POOL_CAPTIONS[0][0]]).numpy())
    assert main(["prepare", "tokens", "--root", str(old.root)]) == 0  # idempotent
    assert "nothing to do" in capsys.readouterr().out and _sha_tree(old.root) == after


@pytest.mark.parametrize("where", ["manifest rename", "tokenizer"])
def test_an_interrupted_upgrade_leaves_the_old_benchmark_and_a_rerun_succeeds(old, tokenizer, monkeypatch, where):
    before = _sha_tree(old.root)
    if where == "manifest rename":
        real = os.replace

        def replace(src, dst):
            if Path(dst).name == MANIFEST:
                raise KeyboardInterrupt
            return real(src, dst)
        monkeypatch.setattr(tokens_mod.os, "replace", replace)
        interrupted = tokenizer
    else:
        def broken(texts):
            raise KeyboardInterrupt
        interrupted = (broken, tokenizer[1])
        monkeypatch.setattr(tokens_mod, "tokenizer_key", lambda *a: tokenizer_key(*tokenizer))
    with pytest.raises(KeyboardInterrupt):
        tokens_mod.add_tokens(old.root, *interrupted)
    monkeypatch.undo()
    assert _sha_tree(old.root) == before  # same manifest, no token or staging files left
    assert not list(old.root.glob(".staging-*")) and "tokens" not in open_benchmark(old.root).manifest
    bench = tokens_mod.add_tokens(old.root, *tokenizer)
    assert load_tokens(bench, "pool", tokenizer_key(*tokenizer)).ids.shape[0] == sum(map(len, POOL_CAPTIONS))


def test_ensure_inputs_upgrades_benchmark_and_separate_pool(old_root, tmp_path, tokenizer, capsys):
    from fomo_ray.config import load_config
    from fomo_ray.prep import ensure_inputs

    bench_root = shutil.copytree(old_root, tmp_path / "bench")
    pool_root = shutil.copytree(old_root, tmp_path / "pool")
    cfg = load_config(None, {"data.benchmark": "fif", "data.root": str(bench_root), "data.pool": str(pool_root),
                             "backbone.pretrained": ""})
    ensure_inputs(cfg)
    key = tokenizer_key(*tokenizer)
    out = capsys.readouterr().out
    for root in (bench_root, pool_root):
        assert f"upgraded {root} for tokenizer {key}" in out
        assert tokens_mod.has_tokens(open_benchmark(root), key)
    ensure_inputs(cfg)  # already there: nothing printed, nothing rewritten
    assert "upgraded" not in capsys.readouterr().out


def test_ensure_fifmini_upgrades_an_old_build_in_place(tmp_path, tmp_path_factory, tokenizer):
    from _data_util import small_fifmini
    from fomo_ray.prep.fifmini import ensure_fifmini

    bench = small_fifmini(tmp_path_factory)
    key = tokenizer_key(*tokenizer)
    assert list(bench.manifest["tokens"]) == [key]
    root = shutil.copytree(bench.root, tmp_path / "fm")
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("tokens/")}
    del manifest["tokens"]
    shutil.rmtree(root / "tokens")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # as written before token ids existed
    beton = (root / "pool.beton").stat().st_mtime_ns
    again = ensure_fifmini(root, scale=bench.manifest["generator"]["scale"], progress=False)
    assert (root / "pool.beton").stat().st_mtime_ns == beton  # reused (same generator), not regenerated
    assert tokens_mod.has_tokens(again, key) and again.content_hash == bench.content_hash


def test_converters_write_tokens_and_a_rerun_adds_another_model(tmp_path, tokenizer, capsys):
    """``prepare pool`` and ``prepare fif --pool`` store the default tokenizer's ids; a rerun with ``--model`` only
    adds that tokenizer's ids (no re-assembly); an unknown ``--model`` fails before converting anything."""
    from _fif_fixtures import make_fif_root
    from test_convert_webdataset import make_shards, run as run_pool

    from fomo_ray.cli.prepare import fif_main

    make_shards(tmp_path / "shards")
    pool = tmp_path / "pool"
    assert run_pool(tmp_path / "shards", pool, "--max-bad-fraction", "0.5", "--model", "nope-arch") == 1
    assert "unknown architecture 'nope-arch'" in capsys.readouterr().err and not pool.exists()
    assert run_pool(tmp_path / "shards", pool, "--max-bad-fraction", "0.5") == 0
    key, wide = tokenizer_key(*tokenizer), tokenizer_key(*tokenizer_for("ViT-B-16"))
    assert list(open_benchmark(pool).manifest["tokens"]) == [key]
    beton = (pool / "pool.beton").stat().st_mtime_ns
    assert run_pool(tmp_path / "shards", pool, "--max-bad-fraction", "0.5", "--model", "ViT-B-16") == 0
    assert f"upgraded {pool} for tokenizer {wide}" in capsys.readouterr().out
    assert (pool / "pool.beton").stat().st_mtime_ns == beton
    assert sorted(open_benchmark(pool, verify=True).manifest["tokens"]) == sorted([key, wide])

    fx = make_fif_root(tmp_path / "fif", datasets=("DTD",))
    out = tmp_path / "out"
    assert fif_main(["--root", str(fx.root), "--info-dir", str(fx.info_dir), "--out", str(out), "--datasets", "DTD",
                     "--image-size", "16", "--write-mode", "raw", "--jpeg-quality", "0", "--workers", "1",
                     "--no-progress", "--pool", str(pool)]) == 0
    bench = open_benchmark(out, verify=True)
    for split in bench.splits:
        stored = load_tokens(bench, split, key)
        caps = bench.captions(split)
        assert stored.ids.shape[0] == sum(map(len, caps))
        if caps and caps[0]:
            np.testing.assert_array_equal(stored.pick(np.array([0]), np.array([0])), tokenizer[0](caps[0][:1]).numpy())


def test_concurrent_upgrades_of_one_root_write_once(old):
    """Two processes (e.g. Ray trials on one machine) upgrading the same old root: one writes, the other waits on the
    root's lock and finds nothing to do."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fomo_ray.cli", "prepare", "tokens", "--root", str(old.root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    text = "".join(out for out, _ in outs)
    assert text.count("upgraded") == 1 and text.count("nothing to do") == 1, text
    assert len(open_benchmark(old.root, verify=True).manifest["tokens"]) == 1
