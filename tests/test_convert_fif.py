"""FiF conversion on tiny directories in the authors' exact layout (tests/_fif_fixtures.py): real FFCV betons."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _fif_fixtures import DTD_CLASSES, make_fif_root, tar_dataset  # noqa: E402

from fomo_ray.cli.prepare import fif_main, pool_main  # noqa: E402
from fomo_ray.data import fif_catalogue  # noqa: E402
from fomo_ray.data.format import open_benchmark, read_images  # noqa: E402
from fomo_ray.prep import convert_fif, fif_sources, staging  # noqa: E402
from fomo_ray.prep.convert_fif import Options  # noqa: E402
from fomo_ray.prep.staging import ConversionError, decode_fit  # noqa: E402

SIZE = 16
FOUR = "DTD,CUB200,MONKEYS10,MSCOCO"


def run(fx, out, datasets, *extra) -> int:
    """The CLI with test settings: raw betons + lossless staging, so pixels round-trip exactly."""
    return fif_main(["--root", str(fx.root), "--info-dir", str(fx.info_dir), "--out", str(out),
                     "--datasets", datasets, "--image-size", str(SIZE), "--write-mode", "raw",
                     "--jpeg-quality", "0", "--workers", "1", "--no-progress", *extra])


def opts(fx, out, **kw) -> Options:
    base = dict(root=fx.root, out=out, info_dir=fx.info_dir, image_size=SIZE, jpeg_quality=0, write_mode="raw",
                progress=False)
    return Options(**{**base, **kw})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Four datasets of both roles converted once with two worker processes (shared by the round-trip tests)."""
    base = tmp_path_factory.mktemp("fif")
    fx = make_fif_root(base)
    assert run(fx, base / "out", FOUR, "--workers", "2") == 0
    return fx, open_benchmark(base / "out", verify=True)


# --------------------------------------------------------------------------------------------------- pure pieces
def test_fit_image_resizes_shorter_side_and_centre_crops():
    arr = np.zeros((20, 90, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:60] = (0, 255, 0)
    arr[:, 60:] = (0, 0, 255)
    out = staging.fit_image(Image.fromarray(arr), 10)  # 20x90 -> 10x45; centre 10x10 lies in the green third
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (0, 255, 0)).max() <= 2
    small = staging.fit_image(Image.new("L", (4, 6), 128), 12)  # grey, upscaled: shorter side 4 -> 12
    assert small.shape == (12, 12, 3) and np.all(small == 128)


def test_training_text_rules_follow_fif():
    tc = fif_sources.training_captions
    assert tc({"default_caption": "a sketch", "synthetic_merged_caption": ["x"]}) == ["a sketch"]
    assert tc({"default_caption": None, "synthetic_merged_caption": ["m1", "m2"]}) == ["m1", "m2"]
    assert tc({"default_caption": ["c1", "c2", "c3", "c4", "c5"]}) == ["c1", "c2", "c3", "c4", "c5"]
    assert tc({"default_caption": None, "synthetic_merged_caption": "one merged"}) == ["one merged"]
    assert tc({"default_caption": None, "synthetic_merged_caption": None}) == []


def test_unknown_classname_names_dataset_key_and_class(tmp_path):
    info = {"dtd/a.jpg": {"classname": "banded", "default_caption": None, "synthetic_merged_caption": None,
                          "primer_caption": None, "target": 0},
            "dtd/b.jpg": {"classname": "stripy", "default_caption": None, "synthetic_merged_caption": ["s"],
                          "primer_caption": None, "target": 1}}
    spec = fif_catalogue.CATALOGUE["DTD"]
    with pytest.raises(ConversionError, match=r"DTD.*'dtd/b\.jpg'.*'stripy'.*not in the class list"):
        fif_sources.build_records(spec, info, DTD_CLASSES, tmp_path / "DTD_train.json")
    records, counts = fif_sources.build_records(spec, {"dtd/a.jpg": info["dtd/a.jpg"]}, DTD_CLASSES, Path("x"))
    assert records[0].captions == ("A photo of a banded texture.",) and counts["primer_fallback"] == 1


def test_catalogue_roles_splits_and_aliases():
    evals = ("CALTECH101 CALTECH256 CARS196 CIFAR10 DOMAINNET_QUICKDRAW EuroSAT FashionMNIST FLICKR30K Food101 GTSRB "
             "IMAGENET IMAGENET_A IMAGENET_D IMAGENET_R IMAGENET_S IMAGENET_V2 MNIST MONKEYS10 MSCOCO OXFORDPETS STL10 "
             "SVHN").split()  # evaluation.additional_datasets of the authors' continualfomo_default.yaml
    assert sorted(fif_catalogue.EVAL_NAMES) == sorted(evals) and len(fif_catalogue.ADAPT_NAMES) == 41
    assert {n for n, d in fif_catalogue.CATALOGUE.items() if d.task == "retrieval"} == {"MSCOCO", "FLICKR30K", "FSCOCO"}
    cat = fif_catalogue.CATALOGUE
    assert cat["iNATURALIST2021"].converted_splits() == {"train": "train_mini", "test": "val"}
    assert cat["CIFAR10"].converted_splits() == {"test": "test"}  # eval-only: its train split is never converted
    assert [fif_catalogue.resolve(t) for t in ("fgvcaircraft", "FOOD101", "snake_clef", "DTD")] == [
        "FGVCAircraft", "Food101", "SNAKECLEF", "DTD"]
    with pytest.raises(fif_catalogue.CatalogueError, match="Did you mean CIFAR100"):
        fif_catalogue.resolve("CIFAR1000")


def test_duplicate_classnames_keep_first_plain():
    assert convert_fif.disambiguate(["crane", "kite", "crane"]) == ["crane", "kite", "crane (2)"]


# --------------------------------------------------------------------------------------------------- round trip
def test_round_trip_images_classes_captions(converted):
    fx, bench = converted
    assert bench.dataset_names == ["CUB200", "DTD", "MONKEYS10", "MSCOCO"]  # catalogue order
    for name, info in bench.datasets.items():
        spec = fif_catalogue.CATALOGUE[name]
        assert (info.role, info.task, info.template) == (spec.role, spec.task, spec.template)
    assert bench.datasets["DTD"].classnames == tuple(DTD_CLASSES)
    for (name, split), rows in fx.expected.items():
        if split == "train" and fif_catalogue.CATALOGUE[name].role == "eval":
            assert len(bench.rows(name, "train")) == 0, f"{name}: eval-only datasets keep only their test split"
            continue
        ids = bench.rows(name, split)
        assert len(ids) == len(rows), (name, split)
        images = read_images(bench.split_path(split), ids)
        for r, img, exp in zip(ids, images, rows):
            # the exact pixels of the source file after resize + centre crop: proves which file was read
            assert np.array_equal(img, decode_fit(exp.path.read_bytes(), SIZE)), (name, exp.key)
            assert bench.meta(split)[1][r] == exp.label, (name, exp.key)
            assert bench.captions(split)[r] == exp.captions, (name, exp.key)


def test_variants_retrieval_captions_and_summary(converted):
    fx, bench = converted
    report = {r["dataset"]: r for r in bench.manifest["conversion"]}
    assert report["MONKEYS10"]["variant"] == "224"  # _224 tree present: preferred
    assert report["MSCOCO"]["variant"] == "base"  # _224 info file present, tree absent: originals
    assert all(r["skipped"] == 0 for r in report.values())
    coco = bench.rows("MSCOCO", "test")
    assert all(len(bench.captions("test")[r]) == 5 for r in coco)
    assert set(bench.meta("test")[1][coco]) == {-1}
    dtd_first = bench.rows("DTD", "train")[0]
    assert len(bench.captions("train")[dtd_first]) == 2  # a caption list keeps all its entries


def test_default_streams_cover_every_adaptation_class(converted):
    _, bench = converted
    want = {f"{d}+++{c}" for d in ("DTD", "CUB200") for c in bench.datasets[d].classnames}
    for ordering in ("random", "dataset_incremental", "time_incremental"):
        entries = json.loads(bench.stream_path(ordering).read_text())
        assert sorted(entries) == sorted(want), ordering
    ti = [e.split("+++")[0] for e in json.loads(bench.stream_path("time_incremental").read_text())]
    assert ti == ["CUB200"] * 2 + ["DTD"] * 3  # CUB-200 (2011) was released before DTD (2014)


# --------------------------------------------------------------------------------------------------- resume
def test_resume_skips_verified_parts_and_redoes_tampered(tmp_path):
    fx = make_fif_root(tmp_path, datasets=("DTD", "CUB200"))
    out = tmp_path / "out"
    rows = convert_fif.convert(opts(fx, out), ["DTD", "CUB200"])
    assert {r["status"] for r in rows} == {"converted"}
    manifest_mtime = (out / "manifest.json").stat().st_mtime_ns
    part_mtime = (out / ".parts" / "DTD" / "part.json").stat().st_mtime_ns

    rows = convert_fif.convert(opts(fx, out), ["DTD", "CUB200"])
    assert {r["dataset"]: r["status"] for r in rows} == {"DTD": "cached", "CUB200": "cached"}
    assert (out / ".parts" / "DTD" / "part.json").stat().st_mtime_ns == part_mtime
    assert (out / "manifest.json").stat().st_mtime_ns == manifest_mtime  # nothing changed: no re-assembly

    with open(out / ".parts" / "DTD" / "train.images.bin", "ab") as f:
        f.write(b"\0")  # a damaged part fails its sha256 check
    rows = convert_fif.convert(opts(fx, out), ["DTD", "CUB200"])
    assert {r["dataset"]: r["status"] for r in rows} == {"DTD": "converted", "CUB200": "cached"}
    open_benchmark(out, verify=True)

    rows = convert_fif.convert(opts(fx, out, image_size=SIZE * 2), ["DTD", "CUB200"])
    assert {r["status"] for r in rows} == {"converted"}  # a new setting invalidates every part
    assert open_benchmark(out).image_size == SIZE * 2


def test_interrupted_dataset_leaves_no_complete_looking_part(tmp_path, monkeypatch):
    fx = make_fif_root(tmp_path, datasets=("DTD",))
    out = tmp_path / "out"
    calls = {"n": 0}
    real = convert_fif._stage_one

    def crash_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(convert_fif, "_stage_one", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert_fif.convert(opts(fx, out), ["DTD"])
    parts = out / ".parts"
    assert not (parts / "DTD").exists() and not list(parts.glob(".*tmp*")) and not (out / "manifest.json").exists()


# --------------------------------------------------------------------------------------------------- bad input
def test_corrupt_and_missing_images_are_reported_and_counted(tmp_path, capsys):
    fx = make_fif_root(tmp_path, datasets=("DTD",))
    corrupt = fx.expected[("DTD", "train")][1].path
    corrupt.write_bytes(b"this is not a jpeg")
    missing = fx.expected[("DTD", "test")][0].path
    missing.unlink()
    assert run(fx, tmp_path / "strict", "DTD") == 1  # 2 of 9 bad > 1%
    err = capsys.readouterr().err
    assert "DTD: 2 of 9 images missing or corrupt" in err and f"train:{corrupt}" in err
    assert err.count(str(corrupt)) == 1  # named once, with its split
    assert "2 skipped (missing/corrupt), 1 dataset(s) FAILED" in err  # the failed dataset's bad images count
    assert not (tmp_path / "strict" / "manifest.json").exists()
    assert not (tmp_path / "strict" / ".parts" / "DTD").exists()
    assert str(missing) in (tmp_path / "strict" / ".parts" / "DTD.bad.txt").read_text()

    assert run(fx, tmp_path / "lenient", "DTD", "--max-bad-fraction", "0.5") == 0
    out = capsys.readouterr().out
    assert str(corrupt) in out and "2 skipped" in out
    bench = open_benchmark(tmp_path / "lenient")
    assert len(bench.rows("DTD", "train")) == 5 and len(bench.rows("DTD", "test")) == 2
    bad = (tmp_path / "lenient" / ".parts" / "DTD.bad.txt").read_text()
    assert "corrupt image" in bad and "missing file" in bad


def test_missing_dataset_folder_fails_before_writing(tmp_path, capsys):
    fx = make_fif_root(tmp_path, datasets=("DTD",))
    out = tmp_path / "out"
    assert run(fx, out, "DTD,CIFAR100,GTSRB") == 2
    err = capsys.readouterr().err
    assert "2 dataset folder(s) missing" in err and "CIFAR100, GTSRB" in err and "--allow-missing" in err
    assert not out.exists()
    assert run(fx, out, "DTD,CIFAR100", "--allow-missing", "--dry-run") == 0
    table = capsys.readouterr().out
    assert "nothing written" in table and not out.exists()
    assert any(line.split()[:1] == ["DTD"] and line.split()[5:7] == ["6", "3"] for line in table.splitlines())
    assert run(fx, out, "DTD,CIFAR100", "--allow-missing") == 0
    table = capsys.readouterr().out
    assert "CIFAR100" in table and "missing" in table
    assert open_benchmark(out).dataset_names == ["DTD"]


def test_classname_not_in_class_list_fails_before_writing(tmp_path, capsys):
    fx = make_fif_root(tmp_path, datasets=("DTD",))
    path = fx.info_dir / "DTD_test.json"
    info = json.loads(path.read_text())
    key = next(iter(info))
    info[key]["classname"] = "stripy"
    path.write_text(json.dumps(info))
    assert run(fx, tmp_path / "out", "DTD") == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and "'stripy'" in err and "DTD_test.json" in err
    assert not (tmp_path / "out" / ".parts").exists()


def test_missing_info_dir_explains_where_it_comes_from(tmp_path, capsys):
    fx = make_fif_root(tmp_path, datasets=("DTD",))
    rc = fif_main(["--root", str(fx.root), "--out", str(tmp_path / "o"), "--datasets", "DTD"])
    assert rc == 2 and "data_lib/00_info" in capsys.readouterr().err


def test_tar_download_converts_like_the_folder(tmp_path):
    fx = make_fif_root(tmp_path, datasets=("CUB200",))
    spec = fif_catalogue.CATALOGUE["CUB200"]
    o = opts(fx, tmp_path / "a")
    convert_fif.convert_dataset(convert_fif.plan_dataset(spec, o), o)
    tar_dataset(fx, "CUB200")
    o2 = opts(fx, tmp_path / "b")
    plan = convert_fif.plan_dataset(spec, o2)
    assert plan.source_kind == "tar"
    convert_fif.convert_dataset(plan, o2)
    for split in ("train", "test"):
        a = list(staging.iter_part(tmp_path / "a" / ".parts" / "CUB200", split))
        b = list(staging.iter_part(tmp_path / "b" / ".parts" / "CUB200", split))
        assert a == b and len(a) == len(fx.expected[("CUB200", split)])


def test_fscoco_retrieval_rows_keep_their_class(tmp_path):
    fx = make_fif_root(tmp_path, datasets=("FSCOCO",))
    assert run(fx, tmp_path / "out", "FSCOCO") == 0
    bench = open_benchmark(tmp_path / "out")
    assert bench.datasets["FSCOCO"].task == "retrieval"
    for split in ("train", "test"):
        rows = bench.rows("FSCOCO", split)
        assert [int(bench.meta(split)[1][r]) for r in rows] == [e.label for e in fx.expected[("FSCOCO", split)]]
        assert [bench.captions(split)[r] for r in rows] == [e.captions for e in fx.expected[("FSCOCO", split)]]


def test_converted_fif_runs_in_the_loop_with_one_switch(converted, tmp_path):
    """data.benchmark=fif + data.root (+ data.pool) is all a run needs: the loop trains and evaluates on it."""
    from _fif_fixtures import colour, image_bytes, write_shard

    from fomo_ray.config import load_config
    from fomo_ray.core.loop import run_stream

    _, bench = converted
    write_shard(tmp_path / "shards" / "00000.tar",
                [{"key": f"{i:09d}", "files": {"jpg": image_bytes(colour(100 + i)), "txt": f"web caption {i}"}}
                 for i in range(32)])
    assert pool_main(["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "pool"),
                      "--image-size", str(SIZE), "--workers", "1", "--no-progress"]) == 0
    cfg = load_config(None, {"data.benchmark": "fif", "data.root": str(bench.root), "data.pool": str(tmp_path / "pool"),
                             "data.loader": "memory", "backbone.pretrained": "", "stream.num_tasks": 2,
                             "stream.ordering": "time_incremental", "budget.mode": "equal_steps",
                             "budget.total_ft_steps": 2, "mixture.batch_size": 8, "tracking.enabled": False,
                             "output_dir": str(tmp_path / "runs"),
                             "data.allow_resize": True})  # converted at 16 px to stay small; fomo-tiny-s takes 32
    df = run_stream(cfg)
    assert sorted(df.point.unique()) == [0, 1, 2]  # before any update + after each of the 2 tasks
    last = df[df.point == 2]
    assert set(last.dataset) == {"CUB200", "DTD", "MONKEYS10", "MSCOCO"}
    assert set(last[last.dataset == "MSCOCO"].metric) >= {"R@1", "R@5"}
    assert set(last[last.dataset == "DTD"].metric) == {"top1"}
