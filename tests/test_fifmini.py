"""FiF-mini: determinism, catalogue requirements, label/content consistency, caching and rebuilds."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from _data_util import SCALE, small_fifmini
from fomo_ray.prep import fifmini, fifmini_text
from fomo_ray.data.format import DataError, open_benchmark, read_images
from fomo_ray.data.stream import load_stream

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return small_fifmini(tmp_path_factory, seed=0)


def test_same_seed_same_hash_other_seed_differs(tmp_path, bench, tmp_path_factory):
    again = fifmini.ensure_fifmini(tmp_path / "again", seed=0, scale=SCALE, progress=False)
    assert again.content_hash == bench.content_hash
    assert small_fifmini(tmp_path_factory, seed=1).content_hash != bench.content_hash


def test_catalogue_meets_the_benchmark_contract(bench):
    infos = bench.datasets
    adapt = [d for d in infos.values() if d.role == "adapt"]
    evals = [d for d in infos.values() if d.role == "eval" and d.task == "classification"]
    retrieval = [d for d in infos.values() if d.role == "eval" and d.task == "retrieval"]
    assert len(adapt) >= 8 and len(evals) >= 4 and len(retrieval) >= 1
    for d in infos.values():
        assert re.fullmatch(r"[A-Z][A-Z_]*", d.name), d.name
        for c in d.classnames:  # plain English words the BPE tokenizer represents as such
            assert re.fullmatch(r"[A-Za-z]+( [A-Za-z]+)*", c), (d.name, c)
    for d in adapt:
        assert 5 <= len(d.classnames) <= 50 and "{}" in d.template
        assert len(bench.rows(d.name, "train")) and len(bench.rows(d.name, "test"))
        _, labels = bench.meta("train")
        assert set(labels[bench.rows(d.name, "train")]) == set(range(len(d.classnames)))
    assert len({d.template for d in adapt}) >= 6  # dataset-specific primers
    for d in retrieval:
        rows = bench.rows(d.name, "test")
        assert (bench.meta("test")[1][rows] == -1).all()
        assert all(len(bench.captions("test")[r]) >= 2 for r in rows)
    caps = bench.captions("pool")
    assert all(len(c) >= 2 for c in caps) and len({c[0] for c in caps}) > 0.9 * len(caps)
    # at full scale the pool has >= 20,000 image-caption pairs (counted, not drawn, here)
    assert len(fifmini.split_labels(fifmini.POOL, "pool", 1.0, np.random.default_rng(0))) >= 20_000


def test_adaptation_concepts_are_absent_from_the_pool(bench):
    pool_text = " ".join(c for caps in bench.captions("pool") for c in caps)
    for word in [*fifmini_text.NOVEL_SHAPES, *fifmini_text.RARE_COLOURS, *fifmini.TEXTURE_CLASSES,
                 *fifmini_text.DIRECTIONS, "greek", "letter", "icon", "number", "digit", "handwritten"]:
        assert not re.search(rf"\b{word}s?\b", pool_text), word
    for word in [*fifmini_text.POOL_SHAPES, *fifmini_text.POOL_COLOURS, "small", "large", "top left", "three"]:
        assert re.search(rf"\b{word}", pool_text), word  # while the evaluation concepts are taught


def test_full_captions_name_the_label(bench):
    ds, labels = bench.meta("test")
    caps = bench.captions("test")
    # (SIZES and POSITIONS are left out: their captions use synonyms such as "big" or "in the middle")
    for name in ["NOVEL_SHAPES", "RARE_COLOURS", "TEXTURES", "ARROWS", "DIGITS", "ICONS", "GREEK", "SHAPES",
                 "COLOURS", "COUNTS"]:
        info = bench.datasets[name]
        for r in bench.rows(name, "test"):
            word = info.classnames[labels[r]]
            assert any(re.search(rf"\b{word}\b", c) for c in caps[r]), (name, word, caps[r])


@pytest.mark.parametrize("name, palette", [("COLOURS", fifmini_text.POOL_COLOURS),
                                           ("RARE_COLOURS", fifmini_text.RARE_COLOURS)])
def test_object_pixels_have_the_labelled_colour(bench, name, palette):
    rows = bench.rows(name, "test")
    images = read_images(bench.split_path("test"), rows).astype(float)
    labels = bench.meta("test")[1][rows]
    classes = bench.datasets[name].classnames
    refs = np.array([palette[c] for c in classes], dtype=float)
    for img, y in zip(images, labels):
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).mean(0)
        fg = img.reshape(-1, 3)[np.abs(img.reshape(-1, 3) - border).sum(1) > 150]
        colour = np.median(fg, axis=0)
        assert np.argmin(np.abs(refs - colour).sum(1)) == y, (name, classes[y], colour)


def test_digits_are_scikit_learn_scans(bench):
    from fomo_ray.prep.fifmini_draw import upsample_grey
    from fomo_ray.prep.fifmini_scenes import sklearn_digits

    scans, targets = sklearn_digits()
    up = upsample_grey(scans, 32).reshape(len(scans), -1)
    train = set(map(bytes, read_images(bench.split_path("train"), bench.rows("DIGITS", "train"))))
    test = read_images(bench.split_path("test"), bench.rows("DIGITS", "test"))
    labels = bench.meta("test")[1][bench.rows("DIGITS", "test")]
    for img, y in zip(test, labels):
        match = np.flatnonzero((up == img.reshape(-1)).all(1))
        assert len(match) and targets[match[0]] == y
        assert bytes(img) not in train  # train and test never share a scan


def test_streams_cover_every_adaptation_class_once(bench):
    adapt = [(n, c) for n, d in bench.datasets.items() if d.role == "adapt" for c in d.classnames]
    rand = load_stream(bench.stream_path("random"), bench)
    inc = load_stream(bench.stream_path("dataset_incremental"), bench)
    assert sorted(rand) == sorted(adapt) and inc == adapt and rand != inc
    other = json.loads(json.dumps(fifmini.stream_entries(1)["random"]))
    assert other != json.loads(bench.stream_path("random").read_text())


def test_pool_chunks_do_not_depend_on_worker_count():
    one = fifmini.draw_dataset(fifmini.POOL, "pool", 3, 16, 0.01, workers=1, chunk=60)
    two = fifmini.draw_dataset(fifmini.POOL, "pool", 3, 16, 0.01, workers=2, chunk=60)
    assert len(one) == 200
    assert all(np.array_equal(a[0], b[0]) and a[3] == b[3] for a, b in zip(one, two))


def test_ensure_reuses_rebuilds_partial_and_mismatched(tmp_path, bench, tmp_path_factory):
    root = tmp_path / "fm"
    shutil.copytree(bench.root, root)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert fifmini.ensure_fifmini(root, seed=0, scale=SCALE).content_hash == bench.content_hash
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (root / "manifest.json").unlink()  # looks like an interrupted build
    assert fifmini.ensure_fifmini(root, seed=0, scale=SCALE, progress=False).content_hash == bench.content_hash
    with pytest.raises(DataError, match=r"generated with seed 0, image_size 32, scale 0.05, not seed 1, "
                                        r"image_size 32, scale 0.05.*--seed 1 .*--force"):
        fifmini.ensure_fifmini(root, seed=1, scale=SCALE, progress=False)  # another study's data: refused
    assert fifmini.ensure_fifmini(root, seed=0, scale=SCALE).content_hash == bench.content_hash  # left as it was
    rebuilt = fifmini.ensure_fifmini(root, seed=1, scale=SCALE, force=True, progress=False)  # asked for: rebuilt
    assert rebuilt.content_hash == small_fifmini(tmp_path_factory, seed=1).content_hash
    assert rebuilt.manifest["generator"]["seed"] == 1


def test_ensure_rebuilds_a_build_of_an_older_generator_version(tmp_path, bench):
    import json

    root = tmp_path / "fm"
    shutil.copytree(bench.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["generator"]["version"] = -1
    (root / "manifest.json").write_text(json.dumps(manifest))
    again = fifmini.ensure_fifmini(root, seed=0, scale=SCALE, progress=False)
    assert again.manifest["generator"]["version"] != -1 and again.content_hash == bench.content_hash


def test_interrupted_generation_leaves_a_partial_dir_that_is_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    real = fifmini.draw_dataset

    def boom(spec, split, *a, **k):
        if spec.name == "GREEK":
            raise KeyboardInterrupt
        return real(spec, split, *a, **k)

    monkeypatch.setattr(fifmini, "draw_dataset", boom)
    with pytest.raises(KeyboardInterrupt):
        fifmini.ensure_fifmini(root, scale=SCALE, progress=False)
    assert not (root / "manifest.json").exists() and not list(root.glob(".staging-*"))
    with pytest.raises(DataError, match="partial"):
        open_benchmark(root)
    monkeypatch.setattr(fifmini, "draw_dataset", real)
    assert fifmini.ensure_fifmini(root, scale=SCALE, progress=False).num_rows("train") > 0


def test_refuses_to_overwrite_another_benchmark(tmp_path):
    from _data_util import toy_images, write_toy

    write_toy(tmp_path / "toy", toy_images(32))
    with pytest.raises(DataError, match="holds benchmark 'toy'"):
        fifmini.ensure_fifmini(tmp_path / "toy", scale=SCALE)


def test_ensure_inputs_builds_the_benchmark_a_run_opens(tmp_path, bench):
    """prep.ensure_inputs builds what assembly.open_data (which never builds) then finds: the same content."""
    from fomo_ray.core.assembly import open_data
    from fomo_ray.config import load_config
    from fomo_ray.core.inputs import InputsMissing
    from fomo_ray.prep import ensure_inputs

    cfg = load_config(None, {"data.root": str(tmp_path / "fm"), "data.scale": SCALE, "backbone.pretrained": ""})
    with pytest.raises(InputsMissing, match="fomo-ray prepare fifmini"):
        open_data(cfg)
    ensure_inputs(cfg)
    assert open_data(cfg).content_hash == bench.content_hash
    stamp = (tmp_path / "fm" / "manifest.json").stat().st_mtime_ns
    ensure_inputs(cfg)  # present: reused, not rebuilt
    assert (tmp_path / "fm" / "manifest.json").stat().st_mtime_ns == stamp


def test_prepare_cli(bench, capsys):
    from fomo_ray.cli import prepare

    args = ["fifmini", "--root", str(bench.root), "--scale", str(SCALE)]
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    assert "NOVEL_SHAPES" in out and bench.content_hash[:16] in out
    assert prepare.main(["nope"]) == 2
    assert prepare.TARGETS["fif"][0] == "fomo_ray.cli.prepare:fif_main"
    assert prepare.TARGETS["pool"][0] == "fomo_ray.cli.prepare:pool_main"
    assert prepare.TARGETS["stream"][0] == "fomo_ray.cli.prepare:stream_main"
