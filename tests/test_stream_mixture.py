"""Streams (chunking, validation, task index sets), the P/D/B mixture and the replay buffers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _data_util import small_fifmini
from fomo_ray.data.buffer import ReservoirBuffer, UnboundedBuffer, make_buffer
from fomo_ray.data.format import DataError
from fomo_ray.data.mixture import MixedBatches, mixture_sizes
from fomo_ray.data.stream import load_stream, split_tasks, task_rows, task_sizes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return small_fifmini(tmp_path_factory, seed=0)


@pytest.fixture(scope="module")
def tasks(bench):
    return split_tasks(load_stream(bench.stream_path("random"), bench), 4)


# --------------------------------------------------------------------------------------------------- streams
@pytest.mark.parametrize("n, t, expected", [(10, 3, [4, 3, 3]), (20, 6, [4, 4, 3, 3, 3, 3]), (7, 7, [1] * 7),
                                            (5, 1, [5]), (88, 4, [22] * 4), (90, 20, [5] * 10 + [4] * 10)])
def test_task_sizes_examples(n, t, expected):
    assert task_sizes(n, t) == expected


def test_task_sizes_formula_for_many_n_t():
    for n in range(1, 60):
        for t in range(1, n + 1):
            sizes = task_sizes(n, t)
            assert sum(sizes) == n and sizes == [n // t + (1 if i < n % t else 0) for i in range(t)]


def test_task_sizes_errors():
    with pytest.raises(DataError, match="T=5 is larger than the number of stream entries N=4"):
        task_sizes(4, 5)
    with pytest.raises(DataError, match=">= 1"):
        task_sizes(4, 0)


def test_split_tasks_is_contiguous_and_by_dataset_cuts_at_boundaries(bench):
    entries = load_stream(bench.stream_path("dataset_incremental"), bench)
    parts = split_tasks(entries, 5)
    assert [len(p) for p in parts] == task_sizes(len(entries), 5)
    assert sum(parts, []) == entries
    n_datasets = len({d for d, _ in entries})
    per_dataset = split_tasks(entries, n_datasets, by_dataset=True)
    assert [len({d for d, _ in p}) for p in per_dataset] == [1] * n_datasets
    assert sum(per_dataset, []) == entries
    assert all(len({d for d, _ in p}) >= 1 for p in split_tasks(entries, 3, by_dataset=True))
    with pytest.raises(DataError, match="dataset runs"):
        split_tasks(entries, n_datasets + 1, by_dataset=True)


@pytest.mark.parametrize("content, message", [
    (["NOPE+++star"], "unknown dataset 'NOPE'"),
    (["NOVEL_SHAPE+++star"], "did you mean 'NOVEL_SHAPES'"),
    (["NOVEL_SHAPES+++stra"], "unknown class 'stra' of dataset 'NOVEL_SHAPES' \\(did you mean 'star'"),
    (["NOVEL_SHAPES+++star", "DIGITS+++one", "NOVEL_SHAPES+++star"], "duplicate entry 'NOVEL_SHAPES\\+\\+\\+star' "
                                                                     "at positions 0 and 2"),
    (["SHAPES+++circle"], "dataset 'SHAPES' has role 'eval'"),
    (["NOVEL_SHAPES/star"], "entry 0 'NOVEL_SHAPES/star' is not of the form"),
    ({"a": 1}, "must be a JSON list"),
    ([], "is empty"),
])
def test_load_stream_errors_name_the_culprit(tmp_path, bench, content, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        load_stream(path, bench)


def test_load_stream_missing_and_invalid_file(tmp_path, bench):
    with pytest.raises(DataError, match="does not exist"):
        load_stream(tmp_path / "none.json", bench)
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(DataError, match="not valid JSON"):
        load_stream(tmp_path / "bad.json", bench)


def test_task_rows_select_exactly_the_tasks_classes(bench, tasks):
    ds, labels = bench.meta("train")
    names = bench.dataset_names
    every = set()
    for task in tasks:
        rows = task_rows(bench, task)
        assert np.all(np.diff(rows) > 0)
        got = {(names[ds[r]], bench.datasets[names[ds[r]]].classnames[labels[r]]) for r in rows}
        assert got == set(task)
        brute = [r for r in range(len(ds)) if labels[r] >= 0 and
                 (names[ds[r]], bench.datasets[names[ds[r]]].classnames[labels[r]]) in set(task)]
        assert rows.tolist() == brute  # all images of those classes, nothing else
        every |= set(rows.tolist())
    assert every == set(range(bench.num_rows("train")))


# --------------------------------------------------------------------------------------------------- mixture sizes
def test_mixture_sizes_reference_values():
    assert mixture_sizes(512, (0.33, 0.34, 0.33), buffer_empty=False) == (169, 175, 168)
    assert mixture_sizes(512, (0.33, 0.34, 0.33), buffer_empty=True) == (253, 259, 0)
    assert mixture_sizes(64, (0.33, 0.34, 0.33), buffer_empty=False) == (22, 21, 21)
    assert mixture_sizes(64, (0.33, 0.34, 0.33), buffer_empty=True) == (32, 32, 0)


def test_mixture_sizes_without_pool_share():
    assert mixture_sizes(512, (0.0, 0.5, 0.5), buffer_empty=False) == (0, 256, 256)
    assert mixture_sizes(512, (0.0, 0.5, 0.5), buffer_empty=True) == (0, 512, 0)  # div = 1: D takes all of B
    assert mixture_sizes(101, (0.0, 0.5, 0.5), buffer_empty=False) == (0, 51, 50)  # remainder skips P (share 0)
    assert mixture_sizes(10, (0.0, 1.0, 0.0), buffer_empty=True) == (0, 10, 0)


def test_mixture_sizes_always_sum_to_b():
    for lam in [(0.33, 0.34, 0.33), (0.2, 0.5, 0.3), (0.0, 0.7, 0.3), (0.5, 0.5, 0.0), (0.1, 0.1, 0.8)]:
        for b in range(1, 400):
            for empty in (False, True):
                sizes = mixture_sizes(b, lam, empty)
                assert sum(sizes) == b and min(sizes) >= 0 and (not empty or sizes[2] == 0)


@pytest.mark.parametrize("b, lam, message", [
    (64, (0.3, 0.3, 0.3), "sum to 0.9, not 1"),
    (64, (0.5, 0.6, -0.1), "buffer=-0.1"),
    (64, (0.5, 0.5), "needs 3 shares"),
    (0, (0.33, 0.34, 0.33), "positive integer"),
])
def test_mixture_sizes_errors(b, lam, message):
    with pytest.raises(DataError, match=message):
        mixture_sizes(b, lam, buffer_empty=False)


# --------------------------------------------------------------------------------------------------- mixed batches
def _batches(mb, n):
    it = iter(mb)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("images", "tokens", "source", "rows")) and a["step"] == b["step"]


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16", context_length=32)  # the fomo-tiny-* tokenizer


@pytest.fixture(scope="module")
def mixed(bench, tasks, tokenizer):
    from fomo_ray.data.tokens import add_tokens, tokenizer_key

    bench = add_tokens(bench.root, tokenizer, 32)  # a no-op when the build already wrote them
    update, buffer = task_rows(bench, tasks[1]), task_rows(bench, tasks[0])
    return dict(bench=bench, pool_rows=None, update_rows=update, buffer_rows=buffer,
                sizes=mixture_sizes(24, (0.33, 0.34, 0.33), False), seed=7, task=1, image_size=32,
                token_key=tokenizer_key(tokenizer, 32))


def test_mixed_batches_composition_and_captions(mixed, bench, tokenizer):
    batches = _batches(MixedBatches(**mixed, backend="memory"), 6)
    b_p, b_d, b_b = mixed["sizes"]
    pool_caps, train_caps = bench.captions("pool"), bench.captions("train")
    for b in batches:
        assert b["images"].shape == (24, 32, 32, 3) and b["images"].dtype == torch.uint8
        assert b["tokens"].shape == (24, 32) and b["tokens"].dtype == torch.int64
        assert b["source"].tolist() == [0] * b_p + [1] * b_d + [2] * b_b
        rows = b["rows"].numpy()
        assert set(rows[b_p:b_p + b_d]) <= set(mixed["update_rows"])
        assert set(rows[b_p + b_d:]) <= set(mixed["buffer_rows"])
        for i, r in enumerate(rows):  # each row's token ids are those of one of its own captions
            caps = pool_caps[r] if i < b_p else train_caps[r]
            assert any(torch.equal(b["tokens"][i], t) for t in tokenizer(caps))
    # each source cycles through all of its rows before repeating one
    n = len(mixed["update_rows"])
    seen = np.concatenate([b["rows"][b_p:b_p + b_d].numpy() for b in _batches(MixedBatches(**mixed, backend="memory"),
                                                                              -(-n // b_d))])
    assert set(seen[:n]) == set(mixed["update_rows"])


def test_mixed_batches_resume_is_bitwise_exact(mixed):
    full = _batches(MixedBatches(**mixed, backend="ffcv"), 9)
    resumed = _batches(MixedBatches(**mixed, backend="ffcv", start_step=5), 4)
    assert all(_same(a, b) for a, b in zip(full[5:], resumed))
    assert _same(MixedBatches(**mixed, backend="ffcv").batch(7), full[7])


def test_mixed_batches_backends_agree_and_seed_matters(mixed):
    f = _batches(MixedBatches(**mixed, backend="ffcv"), 4)
    m = _batches(MixedBatches(**mixed, backend="memory"), 4)
    assert all(_same(a, b) for a, b in zip(f, m))
    again = _batches(MixedBatches(**mixed, backend="memory"), 4)
    assert all(_same(a, b) for a, b in zip(m, again))
    other = _batches(MixedBatches(**{**mixed, "seed": 8}, backend="memory"), 4)
    assert not any(torch.equal(a["rows"], b["rows"]) for a, b in zip(m, other))


def test_mixed_batches_task0_without_buffer_and_bad_input(mixed, bench):
    sizes = mixture_sizes(24, (0.33, 0.34, 0.33), buffer_empty=True)
    b = next(iter(MixedBatches(**{**mixed, "sizes": sizes, "buffer_rows": None}, backend="memory")))
    assert b["source"].bincount(minlength=3).tolist() == [sizes[0], sizes[1], 0]
    with pytest.raises(DataError, match="source 'buffer' gets 7 samples per batch but has no rows"):
        MixedBatches(**{**mixed, "buffer_rows": []}, backend="memory")
    with pytest.raises(DataError, match=r"update rows \[99999\] out of range for split 'train'"):
        MixedBatches(**{**mixed, "update_rows": [99999]}, backend="memory")
    with pytest.raises(DataError, match="3 non-negative ints"):
        MixedBatches(**{**mixed, "sizes": (1, 2)}, backend="memory")
    with pytest.raises(DataError, match="unknown loader backend"):
        MixedBatches(**mixed, backend="disk")
    with pytest.raises(DataError, match="no token ids for tokenizer 'other'.*fomo-ray prepare tokens"):
        MixedBatches(**{**mixed, "token_key": "other"}, backend="memory")


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_together_are_exactly_the_global_batch(mixed, world):
    """Each data-parallel rank decodes only its slice; the slices, in rank order, are the one-process batch."""
    whole = MixedBatches(**mixed, backend="ffcv").batch(5)
    parts = [MixedBatches(**mixed, backend="ffcv", shard=(r, world)).batch(5) for r in range(world)]
    assert [len(p["rows"]) for p in parts] == [len(r) for r in np.array_split(np.arange(24), world)]
    for key in ("images", "tokens", "source", "rows"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    with pytest.raises(DataError, match="shard rank 2 is not in"):
        MixedBatches(**mixed, backend="ffcv", shard=(2, 2))


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetching_gives_the_same_batches_also_across_a_resume(mixed, depth):
    from fomo_ray.data.prefetch import Prefetcher

    def run(depth, start, end):
        mb = MixedBatches(**mixed, backend="ffcv", start_step=start)
        with Prefetcher(mb.batch, range(start, end), "cpu", depth) as batches:
            return list(batches)

    plain = run(0, 0, 8)
    assert [b["step"] for b in plain] == list(range(8))
    assert all(_same(a, b) for a, b in zip(plain, run(depth, 0, 8)))
    assert all(_same(a, b) for a, b in zip(plain[5:], run(depth, 5, 8)))  # a mid-task resume at step 5


def test_prefetcher_raises_the_producers_error_and_stops_when_left_early():
    import threading

    from fomo_ray.data.prefetch import Prefetcher

    def make(step, out):
        if step == 3:
            raise DataError("bad row at step 3")
        return {"step": step}

    with pytest.raises(DataError, match="bad row at step 3"):
        list(Prefetcher(make, range(10), "cpu", 2))
    made = []
    ahead = threading.Event()

    def slow(step, out):
        made.append(step)
        if len(made) > 2:
            ahead.set()
        return {"step": step}

    with Prefetcher(slow, range(10 ** 6), "cpu", 2) as batches:
        assert next(batches)["step"] == 0
        assert ahead.wait(30)  # it builds ahead while the consumer holds batch 0 ...
    n = len(made)
    assert n <= 5 and made == list(range(n))  # ... at most depth + 2 batches, and stops once closed


# --------------------------------------------------------------------------------------------------- buffers
def test_unbounded_buffer_is_the_union_of_past_tasks():
    buf = make_buffer("unbounded", 0, 0)
    buf.add([5, 1, 3])
    buf.add(np.array([3, 9]))
    assert buf.rows().tolist() == [1, 3, 5, 9] and len(buf) == 4
    state = json.loads(json.dumps(buf.state_dict()))
    copy = UnboundedBuffer()
    copy.load_state_dict(state)
    assert copy.rows().tolist() == [1, 3, 5, 9]


def test_reservoir_keeps_a_uniform_fixed_size_sample():
    hits = np.zeros(1000)
    for seed in range(300):
        buf = make_buffer("reservoir", 100, seed)
        for chunk in np.array_split(np.arange(1000), 7):
            buf.add(chunk)
        rows = buf.rows()
        assert len(rows) == 100 and len(set(rows.tolist())) == 100 and buf.seen == 1000
        hits[rows] += 1
    freq = hits / 300  # every row is kept with probability 100/1000
    assert abs(freq.mean() - 0.1) < 1e-9
    assert abs(freq[:500].mean() - freq[500:].mean()) < 0.02  # early and late rows alike (not FIFO/LIFO)


def test_reservoir_is_deterministic_chunking_invariant_and_resumable():
    a, b = ReservoirBuffer(50, seed=3), ReservoirBuffer(50, seed=3)
    a.add(np.arange(400))
    for chunk in np.array_split(np.arange(400), 9):
        b.add(chunk)
    assert a.rows().tolist() == b.rows().tolist()
    state = json.loads(json.dumps(a.state_dict()))
    a.add(np.arange(400, 700))
    c = ReservoirBuffer(50, seed=999)
    c.load_state_dict(state)
    c.add(np.arange(400, 700))
    assert c.rows().tolist() == a.rows().tolist()
    other = ReservoirBuffer(50, seed=4)
    other.add(np.arange(700))
    assert other.rows().tolist() != a.rows().tolist()


def test_buffer_errors():
    with pytest.raises(DataError, match="unknown buffer policy 'fifo'"):
        make_buffer("fifo", 10, 0)
    with pytest.raises(DataError, match="size must be >= 1"):
        make_buffer("reservoir", 0, 0)
    with pytest.raises(DataError, match="state is for policy 'unbounded'"):
        ReservoirBuffer(5).load_state_dict(UnboundedBuffer().state_dict())
    with pytest.raises(DataError, match="1-D integer"):
        UnboundedBuffer().add([0.5])
