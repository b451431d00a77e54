"""Evaluation: recall@k / top-1 math on constructed inputs, subset drawing, and the Evaluator on a real (tiny) FFCV
benchmark written by the project's BenchmarkWriter."""
import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo_ray.config import EvalConfig
from fomo_ray.evaluation import (EvaluationError, Evaluator, chance_level, class_balanced_quota,
                                 class_balanced_subset, image_to_text_recall, retrieval_recalls, subset_size,
                                 text_to_image_recall, top1_accuracy)

logging.getLogger().setLevel(logging.ERROR)

# --------------------------------------------------------------------------------------------------- pure math
# 3 images, 5 captions; caption j belongs to image OWNER[j].
OWNER = torch.tensor([0, 0, 1, 2, 2])
SIM = torch.tensor([
    # c0    c1    c2    c3    c4
    [0.1, 0.9, 0.8, 0.0, 0.2],   # image 0: best text c1 (own)              -> i2t hit@1
    [0.9, 0.1, 0.3, 0.8, 0.7],   # image 1: ranking c0, c3, c4, c2 (own c2 4th) -> miss@1, miss@3, hit@4
    [0.5, 0.2, 0.1, 0.4, 0.3],   # image 2: ranking c0, c3 (own), c4 (own) -> miss@1, hit@2
])
# text->image (columns): c0 -> img1 (own 0: miss@1, img0 is 3rd -> hit@3); c1 -> img0 (hit@1);
# c2 -> img0, img1 (own 1: hit@2); c3 -> img1, img2 (own 2: hit@2); c4 -> img1, img2 (hit@2)


def test_image_to_text_recall_known_answers():
    assert image_to_text_recall(SIM, OWNER, 1) == pytest.approx(1 / 3)
    assert image_to_text_recall(SIM, OWNER, 2) == pytest.approx(2 / 3)
    assert image_to_text_recall(SIM, OWNER, 3) == pytest.approx(2 / 3)
    assert image_to_text_recall(SIM, OWNER, 4) == pytest.approx(1.0)
    assert image_to_text_recall(SIM, OWNER, 50) == pytest.approx(1.0)   # k larger than the gallery


def test_text_to_image_recall_known_answers():
    assert text_to_image_recall(SIM, OWNER, 1) == pytest.approx(1 / 5)
    assert text_to_image_recall(SIM, OWNER, 2) == pytest.approx(4 / 5)
    assert text_to_image_recall(SIM, OWNER, 3) == pytest.approx(1.0)


def test_retrieval_recalls_average_both_directions():
    r = retrieval_recalls(SIM, OWNER, (1, 2))
    assert r == pytest.approx({"R@1": (1 / 3 + 1 / 5) / 2, "R@2": (2 / 3 + 4 / 5) / 2})


def test_top1_and_chance():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1], [0.5, 0.4, 0.0]])
    assert top1_accuracy(sim, torch.tensor([0, 2, 0, 0])) == pytest.approx(0.75)
    assert chance_level("top1", 4, 100) == pytest.approx(0.25)
    assert chance_level("R@5", 0, 200) == pytest.approx(0.025)


def test_subset_size_formula():
    # n = min(len, max(2C, min, floor(f*len)))
    assert subset_size(10_000, 10, 0.1, 300) == 1000
    assert subset_size(1_000, 10, 0.1, 300) == 300
    assert subset_size(1_000, 400, 0.1, 300) == 800
    assert subset_size(120, 10, 0.1, 300) == 120


def test_class_balanced_quota():
    rng = np.random.default_rng(0)
    assert class_balanced_quota(np.array([10, 2, 10]), 12, rng).tolist() == [5, 2, 5]   # small class hands on
    q = class_balanced_quota(np.array([3, 3, 3]), 7, rng)
    assert q.sum() == 7 and q.min() == 2 and q.max() == 3
    with pytest.raises(ValueError):
        class_balanced_quota(np.array([1, 1]), 3, rng)


def test_class_balanced_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(4), [50, 30, 5, 15])
    a = class_balanced_subset(labels, 40, np.random.default_rng(7))
    b = class_balanced_subset(labels, 40, np.random.default_rng(7))
    c = class_balanced_subset(labels, 40, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == 40 and np.all(np.diff(a) > 0)
    # 10 each, class 2 has only 5: its 5 go 1-1-1 to the others (11, 11, 11), the last 2 to two random classes
    counts = np.bincount(labels[a], minlength=4)
    assert counts[2] == 5 and sorted(counts.tolist()) == [5, 11, 12, 12]


# --------------------------------------------------------------------------------------------------- tiny benchmark
COLOURS = ("red", "green", "blue")
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _img(rgb, noise_rng):
    base = np.array(rgb, np.int16)[None, None, :] + noise_rng.integers(-15, 16, (32, 32, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A real benchmark directory: COLOURS (eval, 3 classes, imbalanced 60/30/10), SWAPPED (adapt, same images but
    class names permuted, so an oracle scores 0), SCENES (eval retrieval, two captions per image)."""
    from fomo_ray.data.writer import BenchmarkWriter

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tinybench")
    w = BenchmarkWriter(root, "tiny", 32)
    w.add_dataset({"name": "COLOURS", "role": "eval", "task": "classification", "classnames": COLOURS,
                   "template": "a photo of the colour {}."})
    w.add_dataset({"name": "SWAPPED", "role": "adapt", "task": "classification",
                   "classnames": ("green", "blue", "red"), "template": "a {} thing."})
    w.add_dataset({"name": "SCENES", "role": "eval", "task": "retrieval", "template": ""})
    test = []
    for name in ("COLOURS", "SWAPPED"):
        for label, count in enumerate((60, 30, 10)):
            test += [(_img(RGB[COLOURS[label]], rng), name, label, []) for _ in range(count)]
    test += [(_img(RGB[COLOURS[i % 3]], rng), "SCENES", -1, [f"scene {i}", f"a {COLOURS[i % 3]} scene"])
             for i in range(40)]
    w.write_split("test", test)
    return w.finish()


class OracleCLIP(torch.nn.Module):
    """A 'model' that knows colours: image feature = one-hot of the dominant channel, text feature = one-hot of the
    colour word in the prompt. Zero-shot top-1 is exactly 1 on COLOURS and 0 on SWAPPED (names permuted)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.colour_tokens = [int(tokenizer([c])[0, 1]) for c in COLOURS]
        self.text_calls = 0

    def encode_image(self, images):
        return F.one_hot(images.mean(dim=(2, 3)).argmax(dim=1), 3).float() + 0 * self.dummy

    def encode_text(self, tokens):
        self.text_calls += 1
        hits = torch.stack([(tokens == t).any(dim=1) for t in self.colour_tokens], dim=1).float()
        return hits + 1e-3  # captions without a colour word stay finite after normalisation


@pytest.fixture(scope="module")
def tok():
    """open_clip's SimpleTokenizer with the tiny models' 32-token context (offline)."""
    from fomo_ray.backbones import create_backbone

    return create_backbone("fomo-tiny-s").tokenizer


MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CFG = EvalConfig(batch_size=32, subset_fraction=0.1, subset_min=24)


def _evaluator(bench, seed=0, backend="memory", cfg=CFG):
    return Evaluator(bench, cfg, seed, 32, MEAN, STD, backend=backend, num_workers=1)


def test_subsets_fixed_balanced_and_data_untouched(bench, tok):
    ds_before, lab_before = (a.copy() for a in bench.meta("test"))
    caps_before = [list(c) for c in bench.captions("test")]
    ev = _evaluator(bench)
    sub = {k: v.copy() for k, v in ev.rows(full=False).items()}
    # n = min(len, max(2C, 24, floor(.1 len))) = 24 for the 100-row sets, 24 of the 40 retrieval rows
    assert {k: len(v) for k, v in sub.items()} == {"COLOURS": 24, "SWAPPED": 24, "SCENES": 24}
    _, labels = bench.meta("test")
    assert np.bincount(labels[sub["COLOURS"]], minlength=3).tolist() == [8, 8, 8]
    assert {k: len(v) for k, v in ev.rows(full=True).items()} == {"COLOURS": 100, "SWAPPED": 100, "SCENES": 40}

    model = OracleCLIP(tok)
    first = ev.evaluate(model, tok, full=False, weights_version="v0")
    second = ev.evaluate(model, tok, full=False, weights_version="v1")
    assert first == second                                                  # same samples, same numbers
    assert all(np.array_equal(sub[k], v) for k, v in ev.rows(full=False).items())
    assert all(np.array_equal(sub[k], v) for k, v in _evaluator(bench).rows(full=False).items())  # same seed
    assert not np.array_equal(sub["COLOURS"], _evaluator(bench, seed=1).rows(full=False)["COLOURS"])
    ev.evaluate(model, tok, full=True, weights_version="v1")
    with pytest.raises(ValueError):
        ev.rows(full=False)["COLOURS"][0] = 0                               # the index sets are read-only
    ds_after, lab_after = bench.meta("test")
    assert np.array_equal(ds_before, ds_after) and np.array_equal(lab_before, lab_after)
    assert bench.captions("test") == caps_before
    bench.verify()                                                          # files byte-identical


@pytest.mark.parametrize("backend", ["memory", "ffcv"])
def test_oracle_scores_are_exact(bench, tok, backend):
    ev = _evaluator(bench, backend=backend)
    model = OracleCLIP(tok)
    recs = {(r["dataset"], r["metric"]): r for r in ev.evaluate(model, tok, full=True, weights_version="w")}
    assert set(recs) == {("COLOURS", "top1"), ("SWAPPED", "top1"), ("SCENES", "R@1"), ("SCENES", "R@5")}
    assert recs["COLOURS", "top1"]["value"] == 1.0 and recs["COLOURS", "top1"]["n"] == 100
    assert recs["COLOURS", "top1"]["role"] == "eval" and recs["SWAPPED", "top1"]["role"] == "adapt"
    assert recs["SWAPPED", "top1"]["value"] == 0.0
    for k in ("R@1", "R@5"):
        assert 0.0 <= recs["SCENES", k]["value"] <= 1.0 and recs["SCENES", k]["n"] == 40


def test_text_embeddings_cached_per_weights_version(bench, tok):
    ev = _evaluator(bench)
    model = OracleCLIP(tok)
    ev.evaluate(model, tok, full=False, weights_version="task0")
    calls = model.text_calls
    assert calls > 0
    ev.evaluate(model, tok, full=False, weights_version="task0")
    assert model.text_calls == calls                                        # cache hit: no text forward
    ev.evaluate(model, tok, full=False, weights_version="task1")
    assert model.text_calls == 2 * calls                                    # new weights: recomputed
    ev.evaluate(model, tok, full=False, weights_version="")
    ev.evaluate(model, tok, full=False, weights_version="")
    assert model.text_calls == 4 * calls                                    # empty version: never cached


def test_real_tiny_clip_restores_train_mode(bench):
    from fomo_ray.backbones import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("fomo-tiny-s")
    bb.model.train()
    ev = _evaluator(bench)
    recs = ev.evaluate(bb.model, bb.tokenizer, full=False, weights_version="rand")
    assert bb.model.training
    assert all(0.0 <= r["value"] <= 1.0 for r in recs) and len(recs) == 4


def test_bad_datasets_are_named(bench):
    with pytest.raises(EvaluationError, match="unknown evaluation dataset.*'NOPE'"):
        Evaluator(bench, CFG, 0, 32, MEAN, STD, backend="memory", datasets=["COLOURS", "NOPE"])
    with pytest.raises(EvaluationError, match="no adapt/eval dataset"):
        Evaluator(bench, CFG, 0, 32, MEAN, STD, backend="memory", datasets=[])
    # the on-disk format refuses class-less classification sets; a bench object edited in memory must too
    original = bench.datasets["COLOURS"]
    bench.datasets["COLOURS"] = dataclasses.replace(original, classnames=())
    try:
        with pytest.raises(EvaluationError, match="'COLOURS' has no classes"):
            _evaluator(bench)
    finally:
        bench.datasets["COLOURS"] = original


@pytest.mark.parametrize("full", [False, True])
def test_workload_counts_what_an_evaluation_encodes(bench, tok, full):
    """The cost estimate's evaluation count (issue 15): every image and text one evaluation point encodes."""
    class Counting(OracleCLIP):
        images = texts = 0

        def encode_image(self, images):
            self.images += len(images)
            return super().encode_image(images)

        def encode_text(self, tokens):
            self.texts += len(tokens)
            return super().encode_text(tokens)

    ev, model = _evaluator(bench), Counting(tok)
    ev.evaluate(model, tok, full=full, weights_version="v")
    assert ev.workload(full) == (model.images, model.texts)
    assert ev.workload(full)[0] == (100 + 100 + 40 if full else 3 * 24)  # every test row of the sets (or subsets)
