"""Decode resources (issue 27, item 6): decode threads follow the run's CPUs, the evaluation keeps its decoded fixed
subsets within ``evaluation.cache_mb`` without changing a number, and the "memory" loader refuses a split larger
than its share of the RAM."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _data_util import toy_images, write_toy
from fomo_ray.config import DataConfig, EvalConfig, load_config
from fomo_ray.data import loaders
from fomo_ray.data.format import DatasetInfo
from fomo_ray.data.loaders import (MEMORY_LOADER_RAM_SHARE, MemoryLoaderTooLarge, clear_caches, decode_threads,
                                   decoded_nbytes, machine_ram_bytes, make_loader)
from fomo_ray.data.writer import BenchmarkWriter
from fomo_ray.models.evaluation import EvaluationError, Evaluator

pytestmark = pytest.mark.timeout(120)  # a hung FFCV writer must fail the test, not the suite

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """12 test rows of 16 px: A (adapt, 2 classes, 6 rows), E (eval, 3 classes, 6 rows)."""
    return write_toy(tmp_path_factory.mktemp("toy"), toy_images(32))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A JPEG pool of 5 mixed-size images: the "memory" backend decodes it whole for training crops."""
    rng = np.random.default_rng(1)
    w = BenchmarkWriter(tmp_path_factory.mktemp("photos"), "photos", 16, write_mode="jpg")
    w.add_dataset(DatasetInfo("POOL", "pool", "retrieval"))
    w.write_split("pool", [(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8), "POOL", -1, ["c"])
                           for h, wd in [(20, 16), (16, 24), (16, 16), (24, 24), (18, 20)]])
    return w.finish()


@pytest.fixture
def torch_threads():
    """Restores torch's thread count and OMP_NUM_THREADS after a test that changes them."""
    n, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(n)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


# --------------------------------------------------------------------------------------------------- decode threads
def test_decode_threads_follow_the_process_cpus_and_explicit_values_stay(torch_threads, toy, monkeypatch):
    from fomo_ray.data import mixture

    monkeypatch.setattr(mixture, "load_tokens", lambda *a, **k: None)  # the toy has no token ids; not read here

    assert DataConfig().num_workers == 0 and "ray.cpus_per_worker" in DataConfig.__dataclass_fields__[
        "num_workers"].metadata["doc"]
    assert decode_threads(3) == 3
    with pytest.raises(Exception, match="data.num_workers must be >= 0"):
        decode_threads(-1)
    with pytest.raises(Exception, match="data.num_workers"):
        load_config(None, ["data.num_workers=-1"])
    for n in (1, 2):
        torch.set_num_threads(n)
        assert decode_threads(0) == n
        loader = make_loader(toy, "test", np.arange(12), 4, train=False, seed=0, image_size=16, backend="memory")
        assert loader.num_workers == n
        assert make_loader(toy, "test", np.arange(12), 4, train=False, seed=0, image_size=16, backend="memory",
                           num_workers=3).num_workers == 3
        mixed = mixture.MixedBatches(toy, None, np.arange(8), None, (2, 2, 0), 0, 0, token_key="k",
                                     backend="memory", image_size=16)
        assert mixed.num_workers == n
        assert Evaluator(toy, CFG, 0, 16, MEAN, STD, backend="memory").num_workers == 0  # resolved by its loaders


@pytest.mark.parametrize("cpus, threads", [(1.0, 1), (0.5, 1), (2.0, 2), (3.7, 3)])
def test_a_ray_trial_decodes_with_its_reserved_cpus(torch_threads, cpus, threads):
    """Both Ray paths (Train workers and plain Tune trials) pin torch's threads to ray.cpus_per_worker before the run
    is built; data.num_workers = 0 then gives that many decode threads, at least 1."""
    from fomo_ray.engine.ray_train import set_threads

    set_threads(cpus)
    assert decode_threads(0) == threads


# --------------------------------------------------------------------------------------------------- eval cache
class TinyCLIP(torch.nn.Module):
    """A deterministic stand-in: image features from pooled pixels, text features from token ids."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = torch.nn.Parameter(torch.randn(3 * 16, 8, generator=g))
        self.txt = torch.nn.Embedding.from_pretrained(torch.randn(128, 8, generator=g), freeze=False)
        self.visual = SimpleNamespace(output_dim=8)

    def encode_image(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.img

    def encode_text(self, tokens):
        return self.txt(tokens % 128).sum(dim=1)


def tokenize(texts):
    return torch.tensor([[ord(c) for c in (t + " " * 24)[:24]] for t in texts])


CFG = EvalConfig(batch_size=4, subset_fraction=0.1, subset_min=2)  # subsets: 4 of A's 6 rows, all 6 of E's


class CountDecodes:
    """Counts FFCV epochs the evaluation loaders start (the decoder runs once per epoch)."""

    def __init__(self, monkeypatch):
        self.calls, real = 0, loaders.ffcv_batches

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(loaders, "ffcv_batches", counted)


def _points(ev, model):
    """An evaluation trajectory: full + subsets at 0, subsets after each of 2 tasks, full at the end."""
    out = []
    for k, full_too in enumerate((True, False, True)):
        with torch.no_grad():
            model.img.add_(0.1 * k)  # the weights change between points
        out.append(ev.evaluate(model, tokenize, full=False, weights_version=f"t{k}"))
        if full_too:
            out.append(ev.evaluate(model, tokenize, full=True, weights_version=f"t{k}"))
    return out


def test_evaluation_keeps_decoded_images_and_numbers_do_not_change(toy, monkeypatch):
    plain = Evaluator(toy, SimpleNamespace(**{**CFG.__dict__, "cache_mb": 0}), 0, 16, MEAN, STD, backend="ffcv")
    count = CountDecodes(monkeypatch)
    want = _points(plain, TinyCLIP())
    assert plain.cache_plan() == {False: False, True: False} and count.calls == 5  # every point decodes

    count.calls = 0
    cached = Evaluator(toy, CFG, 0, 16, MEAN, STD, backend="ffcv")
    got = _points(cached, TinyCLIP())
    assert got == want                                                # the same numbers, point by point
    assert cached.cache_plan() == {False: True, True: True}
    assert count.calls == 2                                           # subsets and full sets decoded once each
    kept = cached._images[False]
    assert sum(len(rows) for _, rows in kept) == 10 and all(im.dtype == torch.uint8 for im, _ in kept)


def test_cache_budget_keeps_the_subsets_first_and_decodes_what_does_not_fit(toy, monkeypatch):
    subset, full = 10 * 16 * 16 * 3, 12 * 16 * 16 * 3  # 10 subset rows, 12 test rows, 16x16x3 bytes each
    assert decoded_nbytes(toy.split_path("test"), np.arange(10)) == subset
    want = None
    for budget, plan, calls in ((subset + full, {False: True, True: True}, 1 + 1),
                                (full, {False: True, True: False}, 1 + 2),       # the subsets go first
                                (subset, {False: True, True: False}, 1 + 2),     # full sets decoded at both ends
                                (subset - 1, {False: False, True: False}, 3 + 2)):
        count = CountDecodes(monkeypatch)
        ev = Evaluator(toy, CFG, 0, 16, MEAN, STD, backend="ffcv")
        ev.cache_bytes = budget
        got = _points(ev, TinyCLIP())
        assert ev.cache_plan() == plan and count.calls == calls
        assert want is None or got == want
        want = got


def test_cache_holds_only_this_ranks_share_and_not_the_memory_backend(toy):
    ev = Evaluator(toy, CFG, 0, 16, MEAN, STD, backend="ffcv", ranks=(1, 2), gather=lambda t: t)
    assert ev.cache_plan() == {False: True, True: True}
    list(ev._decoded_images(False))
    # the 10 subset rows in batches of 4: rank 1 encodes the second batch only
    assert [rows.tolist() for _, rows in ev._images[False]] == [ev._my_rows(False).tolist()]
    assert len(ev._my_rows(False)) == 4
    mem = Evaluator(toy, CFG, 0, 16, MEAN, STD, backend="memory")
    assert mem.cache_plan() == {False: False, True: False}  # it holds the decoded split already
    with pytest.raises(EvaluationError, match="evaluation.cache_mb"):
        Evaluator(toy, SimpleNamespace(**{**CFG.__dict__, "cache_mb": -1}), 0, 16, MEAN, STD)
    assert EvalConfig().cache_mb > 0 and "full test sets" in EvalConfig.__dataclass_fields__[
        "cache_mb"].metadata["doc"]


# --------------------------------------------------------------------------------------------------- memory loader
def test_memory_loader_refuses_a_split_over_its_ram_share(toy, monkeypatch):
    clear_caches()
    real_ram = machine_ram_bytes()
    monkeypatch.setattr(loaders, "machine_ram_bytes", lambda: 24_000_000_000)
    monkeypatch.setattr(loaders, "decoded_nbytes", lambda *a, **k: 120_000_000_000)
    loader = make_loader(toy, "test", np.arange(12), 4, train=False, seed=0, image_size=16, backend="memory")
    with pytest.raises(MemoryLoaderTooLarge) as e:
        next(iter(loader))
    assert str(e.value) == (
        f"data.loader=memory refuses to decode split 'test' of {toy.root} (12 images): it would take 120.0 GB of RAM "
        f"in this process, over the limit of 6.0 GB (25% of this machine's 24.0 GB, per process; "
        f"fomo_ray.data.loaders.MEMORY_LOADER_RAM_SHARE); use data.loader=ffcv, which decodes each batch as it is "
        f"read")
    assert MEMORY_LOADER_RAM_SHARE == 0.25
    assert 0 < real_ram <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_memory_loader_counts_what_the_process_already_holds(toy, photos, monkeypatch):
    clear_caches()
    test_bytes = 12 * 16 * 16 * 3
    pool_bytes = decoded_nbytes(photos.split_path("pool"))             # JPEGs decoded at their stored sizes
    assert pool_bytes == 3 * (20 * 16 + 16 * 24 + 16 * 16 + 24 * 24 + 18 * 20)
    monkeypatch.setattr(loaders, "machine_ram_bytes", lambda: 4 * (test_bytes + pool_bytes))  # exactly both fit
    ev = make_loader(toy, "test", np.arange(12), 4, train=False, seed=0, image_size=16, backend="memory")
    assert len(list(ev)) == 3
    train = make_loader(photos, "pool", np.arange(5), 2, train=True, seed=0, image_size=16, backend="memory")
    assert next(iter(train))[0].shape == (2, 16, 16, 3)                # the decoded JPEG pool fits beside it
    clear_caches()
    monkeypatch.setattr(loaders, "machine_ram_bytes", lambda: 4 * (test_bytes + pool_bytes) - 4)
    assert len(list(ev)) == 3
    with pytest.raises(MemoryLoaderTooLarge, match=r"split 'pool' .*5 images.*already holds 0\.0 GB of decoded "
                                                    r"splits.*data\.loader=ffcv"):
        next(iter(train))
    raw_pool = make_loader(toy, "pool", np.arange(12), 4, train=True, seed=0, image_size=16, backend="memory")
    assert next(iter(raw_pool))[0].shape == (4, 16, 16, 3)  # raw training files are read through a memory map
    clear_caches()
