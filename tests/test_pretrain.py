"""Base-model pretraining: recipe hashing, determinism, the checkpoint cache, and the real FiF-mini base."""
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fomo_ray.maths import optim
from fomo_ray.models.backbones import create_backbone
from fomo_ray.cli import pretrain as pretrain_cli
from fomo_ray.core.inputs import PretrainConfig
from fomo_ray.prep import pretrain
from fomo_ray.prep.pretrain import PretrainError

REPO = Path(__file__).resolve().parents[1]
COLOURS = ("red", "green", "blue")
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
TINY_RECIPE = PretrainConfig(steps=4, batch_size=16)


# --------------------------------------------------------------------------------------------------- pure helpers
def test_batch_order_covers_epochs_without_repeats():
    order = pretrain.batch_order(10, steps=5, batch_size=4, rng=np.random.default_rng(0))
    assert order.shape == (5, 4)
    flat = order.ravel()
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))


def test_caption_table_dedupes_and_indexes(tmp_path):
    tok = create_backbone("fomo-tiny-s").tokenizer
    caps = [["a red circle", "a circle"], ["a red circle"], ["two blue squares", "a circle", "x"]]
    tokens, starts, flat = pretrain.caption_table(caps, tok)
    assert tokens.shape == (4, 32) and starts.tolist() == [0, 2, 3, 6]
    for r, cs in enumerate(caps):
        for j, c in enumerate(cs):
            assert torch.equal(tokens[flat[starts[r] + j]], tok([c])[0])


def test_digest_covers_recipe_arch_and_data():
    base = PretrainConfig()
    d = base.digest("fomo-tiny-s", "abc")
    assert d == PretrainConfig().digest("fomo-tiny-s", "abc")
    assert len({d, base.digest("fomo-tiny-m", "abc"), base.digest("fomo-tiny-s", "abd"),
                dataclasses.replace(base, lr=2e-3).digest("fomo-tiny-s", "abc")}) == 4


def test_decay_groups_follow_open_clip():
    model = create_backbone("fomo-tiny-s").model
    decayed = {n for n, p in model.named_parameters() if optim.decays(n, p)}
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert not decayed & {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                          "visual.transformer.resblocks.0.mlp.c_fc.bias"}


# --------------------------------------------------------------------------------------------------- tiny benchmark
def _img(rgb, rng):
    return np.clip(np.array(rgb)[None, None] + rng.integers(-15, 16, (32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """A real (FFCV) benchmark: a 96-row pool of coloured images with captions, one eval-only colour dataset."""
    from fomo_ray.data.writer import BenchmarkWriter

    rng = np.random.default_rng(0)
    w = BenchmarkWriter(tmp_path_factory.mktemp("pretrain_bench"), "tiny", 32)
    w.add_dataset({"name": "POOL", "role": "pool", "task": "retrieval"})
    w.add_dataset({"name": "COLOURS", "role": "eval", "task": "classification", "classnames": COLOURS,
                   "template": "a {} image."})
    w.write_split("pool", [(_img(RGB[c], rng), "POOL", -1, [f"a {c} image.", f"something {c}"])
                           for c in COLOURS for _ in range(32)])
    w.write_split("test", [(_img(RGB[c], rng), "COLOURS", i, []) for i, c in enumerate(COLOURS) for _ in range(10)])
    return w.finish()


def test_pool_is_the_same_through_both_loader_backends(tiny_bench):
    """The checkpoint hash ignores the loader backend, so both must feed identical pixels and captions."""
    bb = create_backbone("fomo-tiny-s")
    mem_images, mem_caps = pretrain.load_pool(tiny_bench, 32, bb.mean, bb.std, backend="memory")
    ffcv_images, ffcv_caps = pretrain.load_pool(tiny_bench, 32, bb.mean, bb.std, backend="ffcv")
    assert mem_images.shape == (96, 3, 32, 32) and torch.equal(mem_images, ffcv_images) and mem_caps == ffcv_caps


def _train(bench, recipe):
    torch.manual_seed(recipe.seed)
    bb = create_backbone("fomo-tiny-s")
    images, captions = pretrain.load_pool(bench, bb.image_size, bb.mean, bb.std)
    stats = pretrain.train_base(bb, images, captions, recipe, progress=False)
    return bb.model.state_dict(), stats


def test_training_is_deterministic_and_learns(tiny_bench):
    a, stats = _train(tiny_bench, TINY_RECIPE)
    b, _ = _train(tiny_bench, TINY_RECIPE)
    c, _ = _train(tiny_bench, dataclasses.replace(TINY_RECIPE, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    fresh = create_backbone("fomo-tiny-s").model.state_dict()
    assert not torch.equal(a["visual.conv1.weight"], fresh["visual.conv1.weight"])  # the weights did move
    assert np.isfinite(stats["final_loss"])


def test_checkpoint_is_cached_and_loadable(tiny_bench, monkeypatch, capsys):
    path = pretrain.ensure_base_checkpoint("fomo-tiny-s", tiny_bench, recipe=TINY_RECIPE, progress=False)
    digest = TINY_RECIPE.digest("fomo-tiny-s", tiny_bench.manifest["content_hash"])
    assert path == Path(tiny_bench.root) / "base_models" / f"fomo-tiny-s-{digest}.pt"
    out = capsys.readouterr().out
    assert "COLOURS" in out and "chance" in out and " 33.3%" in out   # zero-shot next to chance (1/3)
    meta = pretrain.read_meta(path)
    assert meta["recipe"]["steps"] == 4 and meta["zero_shot"][0]["dataset"] == "COLOURS"
    assert not list(path.parent.glob(".*.tmp"))                      # atomic write left no temp file

    def boom(*a, **k):
        raise AssertionError("a cached base must not be retrained")

    monkeypatch.setattr(pretrain, "train_base", boom)
    assert pretrain.ensure_base_checkpoint("fomo-tiny-s", tiny_bench, recipe=TINY_RECIPE) == path
    loaded = create_backbone("fomo-tiny-s", pretrained=str(path))
    # loading the cache reproduces what training produced (training is deterministic)
    monkeypatch.undo()
    trained, _ = _train(tiny_bench, TINY_RECIPE)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.model.state_dict().items())


def test_unknown_architecture_is_refused(tiny_bench):
    with pytest.raises(PretrainError, match="no pretraining recipe for 'ViT-B-32'.*fomo-tiny-s"):
        pretrain.ensure_base_checkpoint("ViT-B-32", tiny_bench)


def test_pretrain_command(tiny_bench, capsys):
    args = ["--steps", "2", "--batch-size", "16", "--no-progress", f"data.root={tiny_bench.root}",
            "data.prepare_if_missing=false", "data.loader=memory"]
    assert pretrain_cli.main(args) == 0
    first = capsys.readouterr().out
    assert "2 steps x 16" in first and "COLOURS" in first and "chance" in first
    assert pretrain_cli.main(args) == 0                               # cached: reports, does not retrain
    second = capsys.readouterr().out
    assert "steps x" not in second and "trained in" in second and "COLOURS" in second
    assert pretrain_cli.main(args + ["--arch", "ViT-B-32"]) == 2
    assert "'ViT-B-32' is not a tiny architecture" in capsys.readouterr().err


def test_ensure_inputs_pretrains_only_a_missing_base(tiny_bench, monkeypatch):
    """``backbone.pretrained=auto``: prep.ensure_inputs trains the base when the run's look-up misses it, and only
    then; an architecture without a recipe is refused as a run would refuse it."""
    from fomo_ray.config import ConfigError, load_config
    from fomo_ray.core.inputs import RECIPES, base_checkpoint_path
    from fomo_ray.prep import ensure_inputs

    calls = []
    monkeypatch.setattr(pretrain, "ensure_base_checkpoint", lambda arch, bench, **kw: calls.append((arch, kw)))
    base = {"data.root": str(tiny_bench.root), "data.prepare_if_missing": False, "data.loader": "memory"}
    ensure_inputs(load_config(None, {**base, "backbone.pretrained": ""}))
    assert calls == []
    ensure_inputs(load_config(None, {**base, "backbone.pretrained": "auto"}))
    assert calls == [("fomo-tiny-s", {"backend": "memory"})]
    path = base_checkpoint_path(tiny_bench.root, "fomo-tiny-s", RECIPES["fomo-tiny-s"],
                                tiny_bench.manifest["content_hash"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()  # stands in for a cached base
    try:
        ensure_inputs(load_config(None, {**base, "backbone.pretrained": "auto"}))
        assert len(calls) == 1
    finally:
        path.unlink()
    with pytest.raises(ConfigError, match="'auto' only exists for the tiny architectures"):
        ensure_inputs(load_config(None, {**base, "backbone.name": "ViT-B-32", "backbone.pretrained": "auto"}))


# --------------------------------------------------------------------------------------------------- the real base
@pytest.fixture(scope="session")
def fifmini_base():
    """FiF-mini and its fomo-tiny-s base, built once under the repo's default data root and cached there (the same
    files every other consumer of ``backbone.pretrained=auto`` reuses): ~40 s + ~3-4 min on a quiet 2-core CPU the
    first time, a file lookup afterwards."""
    from fomo_ray.config import load_config
    from fomo_ray.prep.fifmini import ensure_fifmini

    cfg = load_config()
    root = Path(cfg.data.root)
    root = root if root.is_absolute() else REPO / root
    bench = ensure_fifmini(root, cfg.data.generator_seed, cfg.data.image_size, progress=False)
    return bench, pretrain.ensure_base_checkpoint("fomo-tiny-s", bench, progress=False)


@pytest.mark.slow
def test_base_is_a_meaningful_zero_shot_model(fifmini_base):
    """Re-evaluates the cached base from its file (not from the numbers stored in it).

    Margins: a chance-level model's top-1 on n test images has std sqrt(p(1-p)/n) <= 2.9 points here (n >= 300),
    so +15 points over chance is > 5 sigma: no untrained model passes. The measured base sits 25-85 points above
    chance on every eval-only set, so +15 also leaves room for platform float differences. Retrieval: random R@5 over
    500 images is 1%; 30% is far above it (measured ~80%). Adaptation sets hold concepts the pool never shows, so the
    base must be far from their ceiling (100%): each at most 40% and their mean within 10 points of chance
    (measured: all within a few points of chance).
    """
    from fomo_ray.config import EvalConfig
    from fomo_ray.models.evaluation import Evaluator, chance_level

    bench, path = fifmini_base
    bb = create_backbone("fomo-tiny-s", pretrained=str(path))
    ev = Evaluator(bench, EvalConfig(), 0, bb.image_size, bb.mean, bb.std, backend="memory")
    records = ev.evaluate(bb.model, bb.tokenizer, full=True, weights_version="base")
    table = {(r["dataset"], r["metric"]): r for r in records}
    chance = {k: chance_level(k[1], len(bench.datasets[k[0]].classnames), r["n"]) for k, r in table.items()}
    report = "\n".join(f"{d:<14} {m:<5} chance {chance[d, m]:.3f} zero-shot {r['value']:.3f}"
                       for (d, m), r in table.items())
    evals = [k for k, r in table.items() if r["role"] == "eval" and k[1] == "top1"]
    adapts = [k for k, r in table.items() if r["role"] == "adapt"]
    assert len(evals) >= 4 and len(adapts) >= 8, report
    for k in evals:
        assert table[k]["value"] >= chance[k] + 0.15, f"{k} not clearly above chance\n{report}"
    for k in [k for k in table if k[1] == "R@5"]:
        assert table[k]["value"] >= 0.30, f"{k} retrieval too weak\n{report}"
    for k in adapts:
        assert table[k]["value"] <= 0.40, f"{k} already near its ceiling: nothing left to accumulate\n{report}"
    mean_gap = np.mean([table[k]["value"] - chance[k] for k in adapts])
    assert mean_gap <= 0.10, f"adaptation sets {mean_gap:.3f} above chance on average\n{report}"


# --------------------------------------------------------------------------------------------------- the size ladder
def test_pretraining_compute_grows_with_size():
    """Issue 17: a real CLIP ladder spends more pretraining compute on a larger model (more FLOPs per step and at
    least as many steps), so its base starts better; equal steps left fomo-tiny-m's base below fomo-tiny-s's."""
    from fomo_ray.models.backbones import TINY_ARCHS
    from fomo_ray.budgets.budget import measure_step
    from fomo_ray.core.inputs import RECIPES

    steps = [RECIPES[a].steps for a in TINY_ARCHS]
    assert steps == sorted(steps) and steps[0] < steps[-1], steps
    compute = []
    for arch in TINY_ARCHS:
        bb = create_backbone(arch)
        m = measure_step(bb.model, list(bb.model.parameters()), 8, bb.image_size, bb.context_length)
        compute.append(m.gflops / 8 * RECIPES[arch].batch_size * RECIPES[arch].steps)
    assert compute == sorted(compute) and compute[1] > 2 * compute[0], compute


def test_ladder_table_reads_each_cached_base(tiny_bench, tmp_path):
    """scripts/ladder_table.py: one row per size with its recipe, counted pretraining PFLOPs and zero-shot scores,
    written only between its markers (in docs/BENCHMARK.md); a missing base names the command that makes it."""
    import importlib.util

    from fomo_ray.models.backbones import TINY_ARCHS

    spec = importlib.util.spec_from_file_location("ladder_table", REPO / "scripts" / "ladder_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recipes = {a: dataclasses.replace(TINY_RECIPE, steps=2 + i) for i, a in enumerate(TINY_ARCHS)}
    with pytest.raises(SystemExit, match="fomo-ray pretrain --all"):
        script.ladder_rows(tiny_bench, recipes)
    for arch in TINY_ARCHS:
        pretrain.ensure_base_checkpoint(arch, tiny_bench, recipe=recipes[arch], progress=False, report=False)
    rows = script.ladder_rows(tiny_bench, recipes)
    assert [r["arch"] for r in rows] == list(TINY_ARCHS) and [r["steps"] for r in rows] == [2, 3, 4]
    assert rows[0]["pflops"] < rows[1]["pflops"] < rows[2]["pflops"]
    assert all(0 <= r["A_ZS"] <= 1 and r["eval"] == {"COLOURS": r["A_ZS"]} for r in rows)
    text = script.markdown(rows)
    assert re.search(r"\(\d{4}-\d\d-\d\d, commit [0-9a-f]{12}", text)
    from fomo_ray.provenance import platform_label

    assert all(r["platform"] == platform_label() for r in rows) and f"{platform_label()}, `scripts/" in text
    assert [line.split(" | ")[0] for line in text.splitlines()[-3:]] == [f"| {a}" for a in TINY_ARCHS]
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{script.START}\nold\n{script.END}\nb\n")
    script.write_readme("new", readme)
    assert readme.read_text() == f"a\n{script.START}\nnew\n{script.END}\nb\n"
    real = (REPO / "docs" / "BENCHMARK.md").read_text()
    assert real.count(script.START) == 1 and "scripts/ladder_table.py" in real.split(script.START)[1]
