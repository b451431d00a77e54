"""On-disk format (real FFCV betons), loaders (ffcv vs memory) and the seeded CLIP augmentation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from _data_util import toy_images, write_toy
from fomo_ray.data.augment import CLIP_MEAN, CLIP_STD, generator_for, model_input, rrc_boxes
from fomo_ray.data.decode import array_source, axis_taps, beton_source, crop_resize, full_boxes
from fomo_ray.data.format import DataError, DatasetInfo, open_benchmark, read_images, read_row_meta
from fomo_ray.data.writer import BenchmarkWriter
from fomo_ray.data.loaders import clear_caches, ffcv_batches, ffcv_random_order, make_loader

pytestmark = pytest.mark.timeout(120)  # a hung FFCV writer must fail the test, not the suite


@pytest.fixture(scope="module")
def images():
    return toy_images(32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, images):
    return write_toy(tmp_path_factory.mktemp("toy"), images)


# --------------------------------------------------------------------------------------------------- writing/reading
def test_raw_images_round_trip_identical(toy, images):
    assert np.array_equal(read_images(toy.split_path("pool")), images[:12])
    assert np.array_equal(read_images(toy.split_path("test"), [11, 0, 5]), images[[31, 20, 25]])
    # through FFCV's own decoder too: the bytes FFCV serves are the bytes written
    got = list(ffcv_batches(toy.split_path("train"), np.arange(8), 3, order="sequential", num_workers=1))
    assert torch.equal(torch.cat([im for im, _ in got]), torch.from_numpy(images[12:20]))
    assert torch.cat([r for _, r in got]).tolist() == list(range(8))


def test_manifest_meta_captions_and_rows(toy):
    assert toy.dataset_names == ["POOL", "A", "E"]
    assert toy.datasets["A"].rows == {"train": (0, 8), "test": (0, 6)}
    assert toy.datasets["E"].prompts() == ["something red.", "something blue.", "something green."]
    assert toy.rows("E", "test").tolist() == list(range(6, 12))
    assert toy.rows("E", "train").tolist() == []
    ds, lab = toy.meta("test")
    assert ds.dtype == np.int32 and ds.tolist() == [1] * 6 + [2] * 6
    assert lab.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 2, 0, 1, 2]
    assert toy.captions("pool")[3] == ["pool 3", "alt 3"]
    meta = read_row_meta(toy.split_path("test"))  # the beton's own int fields agree with the npz
    assert meta["row"].tolist() == list(range(12)) and meta["label"].tolist() == lab.tolist()
    assert json.loads(toy.stream_path("random").read_text()) == ["A+++dog", "A+++cat"]
    open_benchmark(toy.root, verify=True)


def test_content_hash_is_deterministic(tmp_path, toy, images):
    again = write_toy(tmp_path / "again", images)
    assert again.content_hash == toy.content_hash
    other = images.copy()
    other[0, 0, 0, 0] ^= 1
    assert write_toy(tmp_path / "other", other).content_hash != toy.content_hash


@pytest.mark.parametrize("sample, culprit", [
    ((np.zeros((16, 16, 3), np.float32), "A", 0, ["c"]), "dtype must be uint8"),
    ((np.zeros((16, 16), np.uint8), "A", 0, ["c"]), "HxWx3"),
    ((np.zeros((16, 16, 3), np.uint8), "NOPE", 0, ["c"]), "unknown dataset 'NOPE'"),
    ((np.zeros((16, 16, 3), np.uint8), "A", 5, ["c"]), "label 5 out of range for dataset 'A'"),
    ((np.zeros((16, 16, 3), np.uint8), "A", True, ["c"]), "label must be an integer"),
    ((np.zeros((16, 16, 3), np.uint8), "A", 0, "a caption"), "captions must be a list"),
    ((np.zeros((16, 16, 3), np.uint8), "A", 0, []), "needs at least one caption"),
    ((np.zeros((16, 16, 3), np.uint8), "POOL", -1, ["c"]), "role 'pool'"),
])
def test_invalid_sample_raises_naming_row_instead_of_hanging(tmp_path, sample, culprit):
    w = BenchmarkWriter(tmp_path, "bad", 16)
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    w.add_dataset(DatasetInfo("A", "adapt", "classification", ("x", "y"), "{}"))
    good = (np.zeros((16, 16, 3), np.uint8), "A", 1, ["ok"])
    with pytest.raises(DataError, match="split 'train'.*row 1: .*") as err:
        w.write_split("train", [good, sample, good])
    assert culprit in str(err.value)
    w.write_split("train", [good, good])  # the failed split left nothing behind and can be written again
    assert w.finish().num_rows("train") == 2


def test_writer_rejects_bad_datasets_and_streams(tmp_path):
    w = BenchmarkWriter(tmp_path, "bad", 16)
    with pytest.raises(DataError, match="role 'teacher'"):
        w.add_dataset(DatasetInfo("X", "teacher", "classification", ("a",), "{}"))
    with pytest.raises(DataError, match="'X' template"):
        w.add_dataset(DatasetInfo("X", "adapt", "classification", ("a",), "no placeholder"))
    with pytest.raises(DataError, match="duplicate classnames"):
        w.add_dataset(DatasetInfo("X", "adapt", "classification", ("a", "a"), "{}"))
    w.add_dataset(DatasetInfo("A", "adapt", "classification", ("x", "y"), "{}"))
    with pytest.raises(DataError, match="added twice"):
        w.add_dataset(DatasetInfo("A", "adapt", "classification", ("x",), "{}"))
    with pytest.raises(DataError, match="not an adaptation class"):
        w.add_stream("s", ["A+++z"])
    with pytest.raises(DataError, match="duplicate entry 'A\\+\\+\\+x'"):
        w.add_stream("s", ["A+++x", "A+++x"])
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(DataError, match="not contiguous"):
        w.add_dataset(DatasetInfo("B", "adapt", "classification", ("x",), "{}"))
        w.write_split("train", [(img, "A", 0, ["c"]), (img, "B", 0, ["c"]), (img, "A", 1, ["c"])])


# --------------------------------------------------------------------------------------------------- bad directories
def test_open_missing_partial_and_corrupt(tmp_path, toy):
    with pytest.raises(DataError, match="does not exist"):
        open_benchmark(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(toy.root, bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json is missing.*partial"):
        open_benchmark(bad)
    shutil.copy(toy.root / "manifest.json", bad / "manifest.json")
    open_benchmark(bad)

    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"corrupt manifest .*manifest\.json"):
        open_benchmark(bad)
    shutil.copy(toy.root / "manifest.json", bad / "manifest.json")

    data = (bad / "train.beton").read_bytes()
    (bad / "train.beton").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"train\.beton.*bytes"):
        open_benchmark(bad)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, different content: only the sha256 check sees it
    (bad / "train.beton").write_bytes(bytes(flipped))
    open_benchmark(bad)
    with pytest.raises(DataError, match=r"corrupt benchmark file .*train\.beton"):
        open_benchmark(bad, verify=True)
    (bad / "train.beton").write_bytes(data)

    (bad / "test.captions.jsonl").unlink()
    with pytest.raises(DataError, match=r"test\.captions\.jsonl is missing"):
        open_benchmark(bad)


def test_corrupt_beton_header_and_meta_are_named(tmp_path, toy):
    bad = tmp_path / "bad"
    shutil.copytree(toy.root, bad)
    data = bytearray((bad / "pool.beton").read_bytes())
    data[8:16] = np.uint64(999).tobytes()  # num_samples in the FFCV header
    (bad / "pool.beton").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt beton .*pool\.beton: header says 999 rows"):
        open_benchmark(bad)
    shutil.copy(toy.root / "pool.beton", bad / "pool.beton")
    size = (bad / "test.meta.npz").stat().st_size
    (bad / "test.meta.npz").write_bytes(b"\0" * size)
    with pytest.raises(DataError, match=r"corrupt metadata file .*test\.meta\.npz"):
        open_benchmark(bad).meta("test")


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, toy, images):
    root = tmp_path / "bench"
    shutil.copytree(toy.root, root)  # a complete benchmark that a rebuild overwrites

    def samples():
        yield images[0], "POOL", -1, ["c"]
        raise KeyboardInterrupt  # the user presses Ctrl-C half-way

    w = BenchmarkWriter(root, "toy", 16)
    assert not (root / "manifest.json").exists()  # the old build is invalidated before anything is touched
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    with pytest.raises(KeyboardInterrupt):
        w.write_split("pool", samples())
    with pytest.raises(DataError, match="partial"):
        open_benchmark(root)
    # a writer that dies after writing splits but before finish() leaves only its staging area
    w2 = write_toy(tmp_path / "fresh", images, finish=False)
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == [w2.staging.name]
    with pytest.raises(DataError, match="partial"):
        open_benchmark(tmp_path / "fresh")


# --------------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("train", [True, False])
def test_ffcv_and_memory_backends_give_identical_batches(toy, train):
    rows = np.array([0, 2, 3, 5, 7, 8, 9, 11, 4])
    kw = dict(train=train, seed=3, image_size=16, num_workers=1)
    f = make_loader(toy, "pool", rows, 4, backend="ffcv", **kw)
    m = make_loader(toy, "pool", rows, 4, backend="memory", **kw)
    for _ in range(2):  # two epochs: the second has a new order and new crops
        fb, mb = list(f), list(m)
        assert len(fb) == len(mb) == (2 if train else 3)
        for (fi, fr), (mi, mr) in zip(fb, mb):
            assert torch.equal(fr, mr) and torch.equal(fi, mi)
    assert fi.dtype == torch.uint8 and fi.shape[1:] == (16, 16, 3)
    if not train:
        assert torch.cat([r for _, r in fb]).tolist() == rows.tolist()  # every row once, in the given order


def test_same_seed_same_batches_other_seed_differs(toy):
    rows = np.arange(12)

    def epoch(seed, backend="ffcv"):
        return list(make_loader(toy, "pool", rows, 4, train=True, seed=seed, image_size=16, backend=backend,
                                num_workers=1))

    a, b, c = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    clear_caches()  # a fresh compiled FFCV loader gives the same batches as the cached, re-pointed one
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, epoch(5)))


def test_ffcv_random_order_is_deterministic_given_seed(toy):
    """FFCV itself (a fresh Loader each time): OrderOption.RANDOM with a seed repeats exactly per epoch."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    indices = np.array([1, 3, 4, 6, 7, 8, 10, 11], dtype=np.uint64)

    def orders(seed):
        loader = Loader(str(toy.split_path("pool")), batch_size=3, num_workers=1, order=OrderOption.RANDOM,
                        seed=seed, indices=indices, drop_last=False,
                        pipelines={"image": None, "dataset": None, "label": None,
                                   "row": [IntDecoder(), ToTensor()]})
        return [torch.cat([r.view(-1) for (r,) in loader]).tolist() for _ in range(3)]

    first = orders(11)
    assert first == orders(11)
    assert first != orders(12)
    assert first[0] != first[1]  # a new permutation each epoch
    assert first == [ffcv_random_order(indices, 11, e).astype(int).tolist() for e in range(3)]


def test_resume_inside_an_epoch_is_exact(toy):
    loader = make_loader(toy, "pool", np.arange(12), 3, train=True, seed=1, image_size=16, backend="ffcv",
                         num_workers=1)
    full = list(loader.epoch_batches(4))
    tail = list(loader.epoch_batches(4, start_batch=2))
    assert len(tail) == 2
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(full[2:], tail))
    loader.set_epoch(4)
    assert torch.equal(next(iter(loader))[0], full[0][0]) and loader.epoch == 5


def test_make_loader_bad_input(toy):
    kw = dict(train=False, seed=0, image_size=16)
    with pytest.raises(DataError, match="unknown loader backend 'gpu'"):
        make_loader(toy, "pool", [0], 1, backend="gpu", **kw)
    with pytest.raises(DataError, match=r"\[12\] out of range for split 'pool'"):
        make_loader(toy, "pool", [0, 12], 1, **kw)
    with pytest.raises(DataError, match="no rows selected"):
        make_loader(toy, "pool", [], 1, **kw)
    with pytest.raises(DataError, match="no split 'valid'"):
        make_loader(toy, "valid", [0], 1, **kw)
    with pytest.raises(DataError, match="no complete batch of 8"):
        make_loader(toy, "pool", [0, 1], 8, train=True, seed=0, image_size=16)


# --------------------------------------------------------------------------------------------------- augmentation
def test_rrc_boxes_follow_the_configured_scale_and_ratio_ranges():
    """The crops the compiled stage receives: area fraction within scale (0.9, 1.0) and aspect ratio within
    (3/4, 4/3), up to integer rounding of the box sides, also for images of different sizes in one batch."""
    heights = torch.tensor([32, 224, 256, 300] * 1000)
    widths = torch.tensor([32, 224, 256, 200] * 1000)
    boxes = rrc_boxes(heights, widths, generator_for(0, 0, 0))
    top, left, h, w = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= heights) & (left + w <= widths)).all()
    big = heights >= 200  # rounding a side of ~30 px moves the area by a few per cent; at 200+ px by < 1%
    area = (h * w).double() / (heights * widths).double()
    assert area[big].min() >= 0.9 - 0.01 and area.max() <= 1.0 and area[~big].min() >= 0.85
    ratio = w.double() / h.double()
    assert ratio[big].min() >= 0.75 - 0.01 and ratio[big].max() <= 4 / 3 + 0.01
    assert area[big].max() - area[big].min() > 0.08 and ratio[big].max() - ratio[big].min() > 0.3  # ranges used
    assert torch.equal(boxes, rrc_boxes(heights, widths, generator_for(0, 0, 0)))
    assert not torch.equal(boxes, rrc_boxes(heights, widths, generator_for(0, 0, 1)))
    assert torch.equal(rrc_boxes(32, 32, generator_for(1), n=5), rrc_boxes(torch.full((5,), 32), 32, generator_for(1)))


def test_crop_stage_full_box_is_identity_and_matches_antialiased_bilinear():
    images = toy_images(6, 24)
    source = array_source(images)
    rows = np.arange(6)
    assert np.array_equal(crop_resize(source, rows, full_boxes(source, rows), 24), images)
    boxes = np.array([[1, 2, 20, 21]] * 3 + [[0, 0, 24, 24]] * 3)
    for size in (16, 30):  # shrink (antialiased) and enlarge
        got = crop_resize(source, rows, boxes, size)
        for i, (t, l, h, w) in enumerate(boxes):
            crop = torch.from_numpy(images[i, t:t + h, l:l + w]).permute(2, 0, 1)[None].float()
            ref = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                  antialias=True)
            assert (ref.round().clamp(0, 255)[0].permute(1, 2, 0).numpy() - got[i]).__abs__().max() <= 1
    idx, wgt = axis_taps(3, 40, 16)
    assert np.allclose(wgt.sum(1), 1) and idx.min() >= 3 and idx.max() <= 42
    with pytest.raises(DataError, match=r"crop box \[0, 0, 25, 24\] lies outside row 1's 24x24 image"):
        crop_resize(source, np.array([0, 1]), np.array([[0, 0, 24, 24], [0, 0, 25, 24]]), 8)


def test_crop_stage_reads_betons_like_memory_and_raw_and_jpeg_agree_with_ffcv(tmp_path, toy, images):
    rows = np.array([3, 0, 11, 5])
    boxes = np.array([[0, 0, 16, 16], [1, 1, 14, 15], [2, 0, 13, 16], [0, 3, 16, 12]])
    mapped = crop_resize(beton_source(toy.split_path("pool")), rows, boxes, 12)
    assert np.array_equal(mapped, crop_resize(array_source(images[:12]), rows, boxes, 12))
    out = np.empty((4, 12, 12, 3), np.uint8)
    assert crop_resize(array_source(images[:12]), rows, boxes, 12, out=out, num_threads=2) is out
    assert np.array_equal(out, mapped)


def test_model_input_normalises_on_the_device_and_eval_images_equal_the_centre_crop():
    """Evaluation images: as stored, then (only when not at the model's size) today's CLIP test transform: bicubic
    resize of the shorter side and a centre crop, then normalisation - the same float ops as before issue 11."""
    at_size = torch.from_numpy(toy_images(3, 16))
    x = model_input(at_size, 16)
    expected = (at_size.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 16, 16) and torch.equal(x, expected)
    bigger = torch.from_numpy(toy_images(2, 20))
    ref = torch.nn.functional.interpolate(bigger.permute(0, 3, 1, 2).float() / 255, size=(16, 16), mode="bicubic",
                                          align_corners=False, antialias=True).clamp(0, 1)
    assert torch.equal(model_input(bigger, 16, (0, 0, 0), (1, 1, 1)), ref)
    assert model_input(at_size, 16, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected uint8"):
        model_input(x, 16)


# --------------------------------------------------------------------------------------------------- jpg, no FFCV
def test_jpg_mode_with_max_resolution_and_mixed_sizes(tmp_path):
    rng = np.random.default_rng(1)
    w = BenchmarkWriter(tmp_path, "photos", 16, write_mode="jpg", max_resolution=24)
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    shapes = [(40, 30), (30, 40), (24, 24), (50, 50), (16, 20)]
    w.write_split("pool", [(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8), "POOL", -1, ["c"])
                           for h, wd in shapes])
    bench = w.finish()
    assert bench.manifest["write_mode"] == "jpg"
    meta = read_row_meta(bench.split_path("pool"))["image"]
    assert meta["mode"].tolist() == [0] * 5 and max(meta["height"].max(), meta["width"].max()) <= 24
    kw = dict(train=False, seed=0, image_size=16, num_workers=1)
    f = list(make_loader(bench, "pool", np.arange(5), 2, backend="ffcv", **kw))
    m = list(make_loader(bench, "pool", np.arange(5), 2, backend="memory", **kw))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(f, m)) and f[0][0].shape == (2, 16, 16, 3)
    t = dict(train=True, seed=0, image_size=16, num_workers=1)  # crops from each stored size, JPEG decoded by FFCV
    ft = list(make_loader(bench, "pool", np.arange(5), 2, backend="ffcv", **t))
    mt = list(make_loader(bench, "pool", np.arange(5), 2, backend="memory", **t))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ft, mt)) and ft[0][0].shape == (2, 16, 16, 3)
    assert read_images(bench.split_path("pool"), size=16).shape == (5, 16, 16, 3)  # the PIL fallback


def test_memory_backend_runs_without_ffcv(toy, images, monkeypatch):
    import sys

    clear_caches()
    monkeypatch.setitem(sys.modules, "ffcv", None)  # any `import ffcv...` now fails
    loader = make_loader(toy, "pool", np.arange(12), 5, train=False, seed=0, image_size=16, backend="memory")
    assert torch.equal(torch.cat([im for im, _ in loader]), torch.from_numpy(images[:12]))
    train = make_loader(toy, "pool", np.arange(12), 4, train=True, seed=0, image_size=12, backend="memory")
    assert next(iter(train))[0].shape == (4, 12, 12, 3)  # the crop stage needs neither FFCV nor its JPEG decoder
    with pytest.raises(DataError, match="needs the ffcv package"):
        make_loader(toy, "pool", np.arange(12), 5, train=False, seed=0, image_size=16, backend="ffcv")


def test_crop_stage_without_numba_gives_the_same_bytes():
    """The GPU check's machine may lack numba (and FFCV): the same stage then runs as plain Python, byte-identical."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['numba'] = None; sys.modules['ffcv'] = None\n"
            "import numpy as np\n"
            "from fomo_ray.data.decode import array_source, crop_resize, numba\n"
            "assert numba is None\n"
            "images = np.random.default_rng(0).integers(0, 256, (3, 12, 14, 3), dtype=np.uint8)\n"
            "boxes = np.array([[0, 0, 12, 14], [1, 2, 10, 9], [2, 1, 9, 12]])\n"
            "sys.stdout.buffer.write(crop_resize(array_source(images), np.arange(3), boxes, 8).tobytes())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    images = np.random.default_rng(0).integers(0, 256, (3, 12, 14, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 12, 14], [1, 2, 10, 9], [2, 1, 9, 12]])
    assert out == crop_resize(array_source(images), np.arange(3), boxes, 8).tobytes()


def test_a_second_process_imports_ffcv_with_the_typed_dict_from_numbas_cache(tmp_path):
    """FFCV's import fills a numba typed Dict (str -> int); fomo_ray turns numba's disk cache on for the typed dict's
    helpers first (fomo_ray/data/ffcv_import.py), so only the first process compiles them and later ones load them.
    The second process only builds a Dict of the same types (a cheap stand-in for importing FFCV again)."""
    import os
    import subprocess
    import sys

    stats = ("from numba.typed import typeddict\n"
             "s = typeddict._setitem.stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))")
    first = "from fomo_ray.data.loaders import ffcv_available; assert ffcv_available()\n" + stats
    again = ("from fomo_ray.data.ffcv_import import cache_typed_dict; cache_typed_dict()\n"
             "from numba.typed import Dict; d = Dict(); d['jpg'] = 0\n" + stats)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    hits_misses = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.split() for code in (first, again)]
    assert hits_misses == [["0", "1"], ["1", "0"]]  # compiled and stored by FFCV's import, then loaded
