"""Stream orderings: pure generators on small class lists, plus the CLI and model glue on a tiny converted FiF."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _fif_fixtures import make_fif_root  # noqa: E402

from fomo_ray.cli.prepare import stream_main  # noqa: E402
from fomo_ray.data import fif_catalogue  # noqa: E402
from fomo_ray.data import orderings as o  # noqa: E402
from fomo_ray.data.format import open_benchmark  # noqa: E402
from fomo_ray.data.writer import BenchmarkWriter
from fomo_ray.prep import convert_fif  # noqa: E402
from fomo_ray.prep import stream_orderings as so  # noqa: E402

CONCEPTS = [("A", f"a{i}") for i in range(4)] + [("B", f"b{i}") for i in range(3)] + [("C", f"c{i}") for i in range(5)]


def blocks(seq):
    """Dataset of each maximal run of equal datasets, in order."""
    return [d for i, (d, _) in enumerate(seq) if i == 0 or seq[i - 1][0] != d]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    base = tmp_path_factory.mktemp("fifo")
    fx = make_fif_root(base, datasets=("DTD", "CUB200"))
    opts = convert_fif.Options(root=fx.root, out=base / "out", info_dir=fx.info_dir, image_size=16, jpeg_quality=0,
                               write_mode="raw", progress=False)
    convert_fif.convert(opts, ["DTD", "CUB200"])
    return open_benchmark(base / "out")


# --------------------------------------------------------------------------------------------------- pure orderings
def test_random_is_a_seeded_permutation():
    a, b, c = o.random_order(CONCEPTS, 0), o.random_order(CONCEPTS, 0), o.random_order(CONCEPTS, 1)
    assert sorted(a) == sorted(CONCEPTS) and a == b and a != c and a != CONCEPTS


def test_dataset_incremental_keeps_dataset_blocks():
    out = o.dataset_incremental(CONCEPTS, seed=3)
    assert sorted(out) == sorted(CONCEPTS)
    assert sorted(blocks(out)) == ["A", "B", "C"]  # each dataset appears as exactly one contiguous block
    fixed = o.dataset_incremental(CONCEPTS, seed=3, dataset_order=["C", "A", "B"])
    assert blocks(fixed) == ["C", "A", "B"]
    with pytest.raises(o.StreamError, match="lacks B"):
        o.dataset_incremental(CONCEPTS, 0, dataset_order=["A", "C"])


def test_time_incremental_follows_release_order():
    out = o.time_incremental(CONCEPTS, ["B", "C", "A"], seed=0)
    assert blocks(out) == ["B", "C", "A"] and sorted(out) == sorted(CONCEPTS)
    assert fif_catalogue.release_order(["DTD", "CUB200", "FLOWERS102", "QUILT"]) == ["FLOWERS102", "CUB200", "DTD",
                                                                                      "QUILT"]


def test_frequency_rarest_first_and_caption_counts():
    concepts = [("X", "cat"), ("X", "golden retriever"), ("Y", "car"), ("Y", "dog")]
    caps = ["A cat on a mat", "my golden retriever and a cat", "category theory", "Golden  Retriever!", "CAT"]
    counts = o.caption_counts(caps, concepts)
    assert counts == {("X", "cat"): 3, ("X", "golden retriever"): 2, ("Y", "car"): 0, ("Y", "dog"): 0}
    out = o.frequency_order(concepts, counts, seed=0)
    assert out[2:] == [("X", "golden retriever"), ("X", "cat")] and set(out[:2]) == {("Y", "car"), ("Y", "dog")}
    with pytest.raises(o.StreamError, match="no count for 1 concepts, e.g. Y\\+\\+\\+dog"):
        o.frequency_order(concepts, {k: v for k, v in counts.items() if k[1] != "dog"}, 0)


def test_difficulty_easy_first_and_per_class_accuracy():
    acc = so.per_class_accuracy(np.array([0, 1, 1, 2, 0]), np.array([0, 1, 2, 2, 1]), 4)
    assert np.allclose(acc[:3], [1.0, 0.5, 0.5]) and np.isnan(acc[3])
    table = {c: float(i % 3) for i, c in enumerate(CONCEPTS)}
    out = o.difficulty_order(CONCEPTS, table, seed=0)
    assert [table[c] for c in out] == sorted(table.values(), reverse=True)


def test_greedy_path_is_nearest_neighbour_and_visits_everything_once():
    # points on a line: from the middle, the greedy path goes to the nearer side first
    x = np.array([[np.cos(t), np.sin(t)] for t in (0.0, 0.1, 0.25, 0.45, 1.2)])
    assert o.greedy_path(x, 2) == [2, 1, 0, 3, 4]
    rng = np.random.default_rng(0)
    path = o.greedy_path(rng.normal(size=(50, 8)), 7)
    assert path[0] == 7 and sorted(path) == list(range(50))


def test_reverse_reverses(tmp_path):
    src = o.write_stream(tmp_path / "s.json", o.to_entries(CONCEPTS))
    assert stream_main(["--ordering", "reverse", "--input", str(src), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == o.to_entries(CONCEPTS[::-1])


def test_read_table_json_and_csv(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"A+++a0": 5, "a1": 2}))
    (tmp_path / "t.csv").write_text("concept,count\nA+++a0,5\na1,2\n")
    for name in ("t.json", "t.csv"):
        assert o.read_table(tmp_path / name, CONCEPTS[:3], "frequency") == {("A", "a0"): 5.0, ("A", "a1"): 2.0}


# --------------------------------------------------------------------------------------------------- CLI + glue
def test_similarity_with_tiny_model_visits_every_class_once(bench, tmp_path):
    args = ["--ordering", "similarity", "--bench", str(bench.root), "--backbone", "fomo-tiny-s", "--seed", "1"]
    torch.manual_seed(0)  # random-init tiny model: deterministic from the torch seed
    assert stream_main([*args, "--out", str(tmp_path / "a.json")]) == 0
    torch.manual_seed(0)
    assert stream_main([*args, "--out", str(tmp_path / "b.json"), "--reverse"]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    concepts, _ = o.concepts_from_benchmark(bench)
    assert sorted(a) == sorted(o.to_entries(concepts)) and len(a) == 5
    assert json.loads((tmp_path / "b.json").read_text()) == a[::-1]


def test_difficulty_from_zero_shot_accuracy_of_a_backbone(bench, tmp_path):
    from fomo_ray.models.backbones import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("fomo-tiny-s", "")
    table = so.zero_shot_accuracy_table(bench, bb, split="train", backend="memory")
    concepts, _ = o.concepts_from_benchmark(bench)
    assert set(table) == set(concepts)
    assert all(v in (0.0, 0.5, 1.0) for v in table.values())  # every class has exactly 2 training images
    assert table == so.zero_shot_accuracy_table(bench, bb, split="train", backend="memory")
    out = o.difficulty_order(concepts, table, seed=0)
    assert [table[c] for c in out] == sorted(table.values(), reverse=True)


def test_frequency_from_a_converted_pool(bench, tmp_path):
    w = BenchmarkWriter(tmp_path / "pool", "pool", 8)
    w.add_dataset({"name": "POOL", "role": "pool", "task": "retrieval", "template": "{}"})
    caps = ["a banded shirt", "banded tail of a Laysan Albatross", "Laysan albatross at sea", "braided hair"]
    w.write_split("pool", [(np.zeros((8, 8, 3), np.uint8), "POOL", -1, [c]) for c in caps])
    w.finish()
    out = tmp_path / "f.json"
    assert stream_main(["--ordering", "frequency", "--bench", str(bench.root), "--pool", str(tmp_path / "pool"),
                        "--out", str(out)]) == 0
    entries = json.loads(out.read_text())
    # counts: bubbly 0, Black footed Albatross 0, braided 1, banded 2, Laysan Albatross 2 -> rarest first
    assert set(entries[:2]) == {"DTD+++bubbly", "CUB200+++Black footed Albatross"}
    assert entries[2] == "DTD+++braided" and set(entries[3:]) == {"DTD+++banded", "CUB200+++Laysan Albatross"}


def test_authors_stream_files_load_and_bad_entries_are_named(bench, tmp_path, capsys):
    from fomo_ray.data.stream import load_stream

    authors = tmp_path / "authors.json"  # their files: plain JSON lists of NAME+++class
    authors.write_text(json.dumps(["CUB200+++Laysan Albatross", "DTD+++bubbly", "DTD+++banded"]))
    assert stream_main(["--check", "--input", str(authors), "--bench", str(bench.root)]) == 0
    assert "3 entries over 2 datasets, all valid" in capsys.readouterr().out
    assert len(load_stream(authors, bench)) == 3  # what a run does: the file loads unchanged
    handles = tmp_path / "handles.json"  # module handles, accepted by the authors' loader
    handles.write_text(json.dumps(["cub200+++Laysan Albatross", "dtd+++bubbly"]))
    fixed = tmp_path / "fixed.json"
    assert stream_main(["--check", "--input", str(handles), "--bench", str(bench.root), "--out", str(fixed)]) == 0
    assert "2 handle/alias token(s) mapped" in capsys.readouterr().out
    assert load_stream(fixed, bench) == [("CUB200", "Laysan Albatross"), ("DTD", "bubbly")]
    for bad, words in ((["CIFAR100+++apple"], ["entry 0", "CIFAR100"]),
                       (["DTD+++bandd"], ["entry 0", "'bandd'", "'banded'"]),
                       (["DTD+++banded", "dtd+++banded"], ["duplicate", "DTD+++banded"]),
                       (["DTD banded"], ["is not of the form"])):
        authors.write_text(json.dumps(bad))
        assert stream_main(["--check", "--input", str(authors), "--bench", str(bench.root)]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), (bad, err)


def test_streams_from_the_info_dir_without_converting(tmp_path, capsys):
    fx = make_fif_root(tmp_path, datasets=("DTD", "CUB200"))
    out = tmp_path / "ti.json"
    assert stream_main(["--ordering", "time_incremental", "--info-dir", str(fx.info_dir), "--datasets", "DTD,CUB200",
                        "--out", str(out)]) == 0
    assert [e.split("+++")[0] for e in json.loads(out.read_text())] == ["CUB200"] * 2 + ["DTD"] * 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["DTD+++banded", "CUB200+++Sooty Albatross"]))
    check = ["--check", "--input", str(bad), "--info-dir", str(fx.info_dir), "--datasets", "DTD,CUB200"]
    assert stream_main(check) == 2
    assert "entry 1 'CUB200+++Sooty Albatross': 'Sooty Albatross' is not a class of CUB200" in capsys.readouterr().err
    bad.write_text(json.dumps(["DTD+++banded", "fgvcaircraft+++707-320"]))
    assert stream_main(check) == 2
    assert "dataset 'FGVCAircraft' is not one of the adaptation datasets here (DTD, CUB200)" in capsys.readouterr().err
    # without --datasets, a partial 00_info (only DTD and CUB200 here) checks the datasets the stream names
    good = tmp_path / "good.json"
    good.write_text(json.dumps(["dtd+++banded"]))  # a handle: mapped to DTD
    assert stream_main(["--check", "--input", str(good), "--info-dir", str(fx.info_dir)]) == 0
    assert "1 entries over 1 datasets, all valid" in capsys.readouterr().out
