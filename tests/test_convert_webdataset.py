"""Web-shard pool conversion: img2dataset-style tars with duplicates, a .webp, bad samples; real FFCV output."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _fif_fixtures import colour, image_bytes, make_fif_root, write_shard  # noqa: E402

from fomo_ray.cli.prepare import fif_main, pool_main  # noqa: E402
from fomo_ray.data.format import open_benchmark, read_images  # noqa: E402
from fomo_ray.prep import convert_webdataset as cw  # noqa: E402
from fomo_ray.prep.staging import ConversionError, decode_fit  # noqa: E402

SIZE = 16


def _img(i, fmt="JPEG", size=(40, 24)):
    return image_bytes(colour(i), size, fmt)


def make_shards(d: Path) -> dict[str, tuple[bytes, str]]:
    """Two shards; returns the samples that must survive, in order: key -> (image bytes, caption)."""
    jpg0, png1, webp2, jpeg7 = _img(0), _img(1, "PNG"), _img(2, "WEBP"), _img(7)
    write_shard(d / "00000.tar", [
        {"key": "000000000", "files": {"jpg": jpg0, "txt": "a red car", "json": '{"url": "http://x"}'}},
        {"key": "000000001", "files": {"png": png1, "txt": "a png picture"}},
        {"key": "000000002", "files": {"webp": webp2, "txt": "a webp picture"}},
        {"key": "000000003", "files": {"jpg": jpg0, "txt": "same image, other caption"}},  # exact duplicate
        {"key": "000000004", "files": {"jpg": _img(4)}},  # no caption
        {"key": "000000005", "files": {"jpg": b"\xff\xd8 broken", "txt": "corrupt"}},  # corrupt image
    ])
    write_shard(d / "00001.tar", [
        {"key": "000010000", "files": {"png": png1, "txt": "duplicate across shards"}},
        {"key": "000010001", "files": {"JPEG": jpeg7, "TXT": "upper-case extensions"}},
        {"key": "000010002", "files": {"json": "{}"}},  # no image
    ])
    return {"000000000": (jpg0, "a red car"), "000000001": (png1, "a png picture"),
            "000000002": (webp2, "a webp picture"), "000010001": (jpeg7, "upper-case extensions")}


def run(shards, out, *extra) -> int:
    return pool_main(["--shards", str(shards), "--out", str(out), "--image-size", str(SIZE), "--write-mode", "raw",
                      "--jpeg-quality", "0", "--workers", "1", "--no-progress", *extra])


def test_pool_round_trip_dedup_webp_and_report(tmp_path, capsys):
    kept = make_shards(tmp_path / "shards")
    assert run(tmp_path / "shards", tmp_path / "pool", "--max-bad-fraction", "0.5") == 0
    report = capsys.readouterr().out
    assert "kept: 4" in report and "no caption 1" in report and "no image 1" in report and "corrupt 1" in report
    assert "1 within shards + 1 across shards" in report and "00000.tar:000000005" in report
    bench = open_benchmark(tmp_path / "pool", verify=True)
    assert bench.dataset_names == [cw.POOL_DATASET] and bench.datasets[cw.POOL_DATASET].role == "pool"
    assert bench.num_rows("pool") == 4
    images = read_images(bench.split_path("pool"))
    for img, (data, caption), r in zip(images, kept.values(), range(4)):
        assert np.array_equal(img, decode_fit(data, SIZE))
        assert bench.captions("pool")[r] == [caption]
    assert set(bench.meta("pool")[1]) == {-1}


def test_two_worker_processes_convert_the_same_pool(tmp_path, capsys):
    """Shards converted by two worker processes (spawned) give the pool one process gives, rows in shard order."""
    make_shards(tmp_path / "shards")
    assert run(tmp_path / "shards", tmp_path / "one", "--max-bad-fraction", "0.5") == 0
    assert run(tmp_path / "shards", tmp_path / "two", "--max-bad-fraction", "0.5", "--workers", "2") == 0
    one, two = open_benchmark(tmp_path / "one", verify=True), open_benchmark(tmp_path / "two", verify=True)
    assert two.captions("pool") == one.captions("pool") and len(one.captions("pool")) == 4
    assert np.array_equal(read_images(two.split_path("pool")), read_images(one.split_path("pool")))


def test_default_corruption_limit_fails_the_shard(tmp_path, capsys):
    make_shards(tmp_path / "shards")
    assert run(tmp_path / "shards", tmp_path / "pool") == 1  # 1 corrupt of 6 images > 5%
    err = capsys.readouterr().err
    assert "00000.tar: 1 of 6 images corrupt" in err
    assert not (tmp_path / "pool" / "manifest.json").exists()
    assert not (tmp_path / "pool" / ".parts" / "00000").exists()


def test_sample_cap_stops_early_and_rerun_reuses_shards(tmp_path, capsys):
    make_shards(tmp_path / "shards")
    assert run(tmp_path / "shards", tmp_path / "pool", "--max-samples", "2", "--max-bad-fraction", "0.5") == 0
    assert open_benchmark(tmp_path / "pool").captions("pool") == [["a red car"], ["a png picture"]]
    assert not (tmp_path / "pool" / ".parts" / "00001").exists()  # the cap was reached in the first shard
    capsys.readouterr()
    assert run(tmp_path / "shards", tmp_path / "pool", "--max-bad-fraction", "0.5") == 0
    assert "(1 converted, 1 reused from a previous run, 2 used)" in capsys.readouterr().out
    assert open_benchmark(tmp_path / "pool").num_rows("pool") == 4


def test_non_contiguous_shard_names_are_named(tmp_path, capsys):
    d = tmp_path / "shards"
    for name in ("00000.tar", "00003.tar"):
        write_shard(d / name, [{"key": name[:5] + "0", "files": {"jpg": _img(0 if name < "00001" else 3),
                                                                "txt": "x"}}])
    assert run(d, tmp_path / "pool") == 1
    err = capsys.readouterr().err
    assert "2 shard(s) missing" in err and "00001.tar, 00002.tar" in err and "--allow-gaps" in err
    assert run(d, tmp_path / "pool", "--allow-gaps") == 0
    assert cw.shard_gaps(["00000.tar", "part-a.tar", "001.tar"])[0] == ["part-a.tar", "001.tar"]


def test_shard_without_any_caption_is_an_error_naming_it(tmp_path):
    d = tmp_path / "shards"
    write_shard(d / "00000.tar", [{"key": f"0000{i}", "files": {"jpg": _img(i), "json": "{}"}} for i in range(3)])
    with pytest.raises(ConversionError, match=r"00000\.tar: 3 images but no caption"):
        cw.convert_pool(cw.PoolOptions(shards=d, out=tmp_path / "pool", image_size=SIZE, progress=False))


def test_pool_embedded_into_a_fif_benchmark(tmp_path, capsys):
    kept = make_shards(tmp_path / "shards")
    assert run(tmp_path / "shards", tmp_path / "pool", "--max-samples", "3", "--max-bad-fraction", "0.5") == 0
    fx = make_fif_root(tmp_path / "fif", datasets=("DTD",))
    args = ["--root", str(fx.root), "--info-dir", str(fx.info_dir), "--out", str(tmp_path / "bench"), "--datasets",
            "DTD", "--write-mode", "raw", "--jpeg-quality", "0", "--workers", "1", "--no-progress"]
    assert fif_main([*args, "--image-size", str(SIZE * 2), "--pool", str(tmp_path / "pool")]) == 2
    assert "convert both at the same size" in capsys.readouterr().err
    assert fif_main([*args, "--image-size", str(SIZE), "--pool", str(tmp_path / "pool")]) == 0
    bench = open_benchmark(tmp_path / "bench", verify=True)
    assert bench.dataset_names == ["DTD", cw.POOL_DATASET] and bench.num_rows("pool") == 3
    assert bench.captions("pool") == [[c] for _, c in list(kept.values())[:3]]
    first = list(kept.values())[0][0]
    assert np.array_equal(read_images(bench.split_path("pool"), [0])[0], decode_fit(first, SIZE))
