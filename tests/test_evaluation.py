"""Evaluation: recall@k / top-1 math on constructed inputs, subset drawing, and the Evaluator on a real (tiny) FFCV
benchmark written by the project's BenchmarkWriter."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo_ray.config import EvalConfig
from fomo_ray.models.evaluation import (EvaluationError, Evaluator, chance_level, class_balanced_quota,
                                        class_balanced_subset, image_to_text_recall, retrieval_recalls, subset_size,
                                        text_to_image_recall, top1_accuracy)


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
    from fomo_ray.models.backbones import create_backbone

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
    from fomo_ray.models.backbones import create_backbone

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


# --------------------------------------------------------------------------------------------------- zero-shot prompts
def test_default_prompts_are_the_primer_and_unchanged(bench):
    """evaluation.prompts defaults to the reference's one primer prompt per class: the class embeddings are exactly
    the normalised embeddings of ``DatasetInfo.prompts()``, and every record says which texts it used."""
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.models.metrics import tidy_frame

    assert EvalConfig().prompts == "primer"
    torch.manual_seed(0)
    bb = create_backbone("fomo-tiny-s")
    ev = _evaluator(bench)
    recs = ev.evaluate(bb.model, bb.tokenizer, full=False, weights_version="w")
    assert {(r["metric"], r["prompts"]) for r in recs} == {("top1", "primer"), ("R@1", "captions"),
                                                          ("R@5", "captions")}
    with torch.no_grad():
        for name in ("COLOURS", "SWAPPED"):
            want = F.normalize(bb.model.encode_text(bb.tokenizer(bench.datasets[name].prompts())), dim=-1)
            torch.testing.assert_close(ev._text_cache[f"classes:primer:{name}"], want, rtol=1e-5, atol=1e-6)
    # what loop.evaluate_point makes of the records: the tidy table names the prompts
    tidy = tidy_frame([{**r, "run": "x", "point": 0, "eval_set": "subset"} for r in recs])
    assert dict(zip(tidy["dataset"] + "/" + tidy["metric"], tidy["prompts"])) == {
        "COLOURS/top1": "primer", "SWAPPED/top1": "primer", "SCENES/R@1": "captions", "SCENES/R@5": "captions"}


@pytest.mark.parametrize("prompts,batch_size", [("simple_imagenet", 5), ("openai_imagenet", 256)])
def test_ensemble_class_embedding_is_the_normalised_mean_of_normalised_templates(bench, prompts, batch_size):
    """A class's embedding under a template ensemble: mean over its templates of the L2-normalised text embeddings,
    re-normalised -- as open_clip's build_zero_shot_classifier -- whatever the batching (5 texts: one class's 7
    templates split over two batches; 256: several classes a batch)."""
    import open_clip

    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.models.evaluation import prompt_templates

    templates = prompt_templates(prompts)
    assert len(templates) == {"simple_imagenet": 7, "openai_imagenet": 80}[prompts]
    torch.manual_seed(0)
    bb = create_backbone("fomo-tiny-s")
    model = bb.model.eval()
    ev = _evaluator(bench, cfg=dataclasses.replace(CFG, prompts=prompts, batch_size=batch_size))
    recs = ev.evaluate(model, bb.tokenizer, full=True, weights_version="w")
    assert {r["prompts"] for r in recs if r["metric"] == "top1"} == {prompts}
    assert {r["prompts"] for r in recs if r["metric"] != "top1"} == {"captions"}
    for name in ("COLOURS", "SWAPPED"):
        classes = list(bench.datasets[name].classnames)
        with torch.no_grad():
            by_hand = torch.stack([
                F.normalize(F.normalize(model.encode_text(bb.tokenizer([t(c) for t in templates])), dim=-1)
                            .mean(dim=0), dim=0) for c in classes])
            theirs = open_clip.build_zero_shot_classifier(model, bb.tokenizer, classes, templates,
                                                          num_classes_per_batch=2).T
            primer = F.normalize(model.encode_text(bb.tokenizer(bench.datasets[name].prompts())), dim=-1)
        got = ev._text_cache[f"classes:{prompts}:{name}"]
        torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)
        assert (got - primer).abs().max() > 1e-2  # the ensemble changes the class embeddings


def test_prompt_settings_never_share_cached_features_and_oracle_scores_hold(bench, tok):
    class Counting(OracleCLIP):
        texts = largest = 0

        def encode_text(self, tokens):
            self.texts += len(tokens)
            self.largest = max(self.largest, len(tokens))
            return super().encode_text(tokens)

    ev, model = _evaluator(bench), Counting(tok)
    ev.evaluate(model, tok, full=False, weights_version="v")
    primer = {k: v.clone() for k, v in ev._text_cache.items()}
    ev.prompts = "openai_imagenet"
    before = model.texts
    recs = {(r["dataset"], r["metric"]): r for r in ev.evaluate(model, tok, full=False, weights_version="v")}
    # same weights version, other prompts: the class texts are encoded (every template), the captions reused
    assert model.texts - before == 2 * 3 * 80 and model.largest <= CFG.batch_size
    assert all(torch.equal(ev._text_cache[k], v) for k, v in primer.items())
    assert {"classes:openai_imagenet:COLOURS", "classes:openai_imagenet:SWAPPED"} <= set(ev._text_cache)
    # every template names the class, so the oracle still scores exactly 1 and 0
    assert recs["COLOURS", "top1"]["value"] == 1.0 and recs["SWAPPED", "top1"]["value"] == 0.0
    assert recs["COLOURS", "top1"]["prompts"] == "openai_imagenet"
    fresh, counted = _evaluator(bench, cfg=dataclasses.replace(CFG, prompts="openai_imagenet")), Counting(tok)
    fresh.evaluate(counted, tok, full=False, weights_version="v")
    assert fresh.workload(False) == (3 * 24, counted.texts)  # the cost estimate counts every template too
    with pytest.raises(EvaluationError, match="unknown zero-shot prompts 'nope'.*evaluation.prompts"):
        _evaluator(bench, cfg=dataclasses.replace(CFG, prompts="nope"))


class _Ranks:
    """``gather`` for W threads standing in for W data-parallel ranks: the k-th call of every rank returns all ranks'
    k-th tensors concatenated in rank order (``distributed.gather_rows``)."""

    def __init__(self, world: int):
        import threading

        self.world, self.barrier, self.slots = world, threading.Barrier(world, timeout=120), {}
        self.calls = [0] * world

    def gather(self, rank: int):
        def gather(t):
            k = self.calls[rank]
            self.calls[rank] += 1
            self.slots.setdefault(k, [None] * self.world)[rank] = t
            self.barrier.wait()
            return torch.cat(self.slots[k])
        return gather


def test_ensemble_evaluation_shared_over_ranks_equals_one_process(bench):
    """Two ranks each encode every other group of classes (16 texts a batch: 2 classes of 7 templates a group) and
    every other image batch; the gathered class embeddings and the scores are the one-process ones, bit for bit."""
    import copy
    import threading

    from fomo_ray.models.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone("fomo-tiny-s")
    cfg = dataclasses.replace(CFG, prompts="simple_imagenet", batch_size=16)
    one = _evaluator(bench, cfg=cfg)
    want = one.evaluate(model.model, model.tokenizer, full=True, weights_version="w")
    ranks, out, errors = _Ranks(2), {}, []

    def rank(r):
        try:
            ev = Evaluator(bench, cfg, 0, 32, MEAN, STD, backend="memory", num_workers=1, ranks=(r, 2),
                           gather=ranks.gather(r))
            out[r] = (ev, ev.evaluate(copy.deepcopy(model.model), model.tokenizer, full=True, weights_version="w"))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test
            errors.append(e)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for r in range(2):
        ev, recs = out[r]
        assert recs == want
        for name in ("COLOURS", "SWAPPED"):
            key = f"classes:simple_imagenet:{name}"
            assert torch.equal(ev._text_cache[key], one._text_cache[key])
