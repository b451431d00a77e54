"""The paper preset, and the guard that keeps a sweep sized for the tiny CPU models off a real backbone (no Ray: all of
it is sweep planning)."""
from pathlib import Path

import pytest

from fomo_ray.cli.sweep import main as sweep_main
from fomo_ray.config import load_config
from fomo_ray.planning.presets import PRESET_DIR, preset_overrides
from fomo_ray.planning.sweep_spec import SweepError, load_sweep, plan_sweep

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
STUDIES = sorted(CONFIGS.glob("sweep_*.yaml"))
PAPER = PRESET_DIR / "paper.yaml"


def test_the_paper_preset_holds_the_papers_setting():
    """docs/BENCHMARK.md §Reference settings (Roth et al. 2024): ViT-B/16 at 224 px, b = 512 (P 169 / D 175 / B 168), T
    = 20, 1,420 fine-tuning steps per task, AdamW 1e-5 with weight decay 0.2 on every parameter, cosine with 10% warm-up
    and a 1e-3 floor restarted per task, one global clip at 1.0, bf16 autocast."""
    from fomo_ray.data.mixture import mixture_sizes

    cfg = load_config(PAPER)
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.precision) == ("ViT-B-16", "openai", "bf16")
    assert (cfg.data.benchmark, cfg.data.image_size, cfg.stream.num_tasks) == ("fif", 224, 20)
    assert cfg.budget.total_ft_steps // cfg.stream.num_tasks == 1420
    m = cfg.mixture
    assert mixture_sizes(m.batch_size, (m.pool, m.update, m.buffer), buffer_empty=False) == (169, 175, 168)
    o, s = cfg.optimizer, cfg.schedule
    assert (o.lr, o.weight_decay, o.exempt_no_decay, o.grad_clip) == (1e-5, 0.2, False, 1.0)
    assert (s.name, s.warmup_frac, s.min_lr_ratio, s.meta) == ("cosine", 0.1, 1e-3, "none")


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_study_is_sized_for_tiny_and_runs_on_the_preset(study):
    spec = load_sweep(study)
    assert spec.sized_for == "tiny"
    plan_sweep(spec)  # the tiny models it was sized for: fine

    on_vit = load_sweep(study, {"backbone.name": "ViT-B-16", "backbone.pretrained": "openai"})
    if "backbone.name" in spec.space:  # the study sweeps its backbones: the base's is never run
        plan_sweep(on_vit)
    else:
        with pytest.raises(SweepError, match=rf"sweep '{spec.name}' is sized for the tiny CPU models .*backbone "
                                             r"ViT-B-16.*--preset paper.*--keep-sizing"):
            plan_sweep(on_vit)

    plan = plan_sweep(load_sweep(study, preset="paper"))
    paper, flat = load_config(PAPER).resolved().flat(), plan.base.flat()
    kept = [k for k in preset_overrides(PAPER) if k not in plan.space and k != "budget.reference_backbone"]
    assert {k: flat[k] for k in kept} == {k: paper[k] for k in kept}
    assert plan.base.name == spec.name  # the study's own keys stay


def test_the_model_size_study_grids_real_architectures_on_the_preset():
    plan = plan_sweep(load_sweep(CONFIGS / "sweep_model_sizes.yaml", preset="paper"))
    assert plan.space["backbone.name"].values == ("ViT-B-32", "ViT-B-16", "ViT-L-14")
    assert plan.base.budget.reference_backbone == "ViT-B-16"


def test_flags_win_over_the_preset_and_keep_sizing_overrides_the_guard():
    spec = load_sweep(CONFIGS / "sweep_methods.yaml", {"optimizer.lr": 2e-5, "stream.num_tasks": 50},
                      preset="paper")
    assert (spec.base["optimizer.lr"], spec.base["stream.num_tasks"]) == (2e-5, 50)
    from dataclasses import replace

    tiny_on_real = load_sweep(CONFIGS / "sweep_methods.yaml", {"backbone.name": "ViT-B-32", "backbone.pretrained": ""})
    assert plan_sweep(replace(tiny_on_real, keep_sizing=True)).base.optimizer.lr == 1e-4


def test_a_swept_real_backbone_is_caught_too():
    spec = load_sweep(CONFIGS / "sweep_model_sizes.yaml")
    from dataclasses import replace

    from fomo_ray.planning.sweep_spec import parse_space

    spec = replace(spec, space={**parse_space(spec.space), **parse_space({"backbone.name": {"grid": ["fomo-tiny-s",
                                                                                                       "ViT-L-14"]}})})
    with pytest.raises(SweepError, match="would run backbone ViT-L-14"):
        plan_sweep(spec)


def test_the_command_refuses_in_one_line_and_names_the_flag(capsys):
    code = sweep_main([str(CONFIGS / "sweep_merge_weights.yaml"), "--dry-run", "--backbone", "ViT-B-16",
                       "--pretrained", "openai"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "sized for the tiny CPU models" in err and "--preset paper" in err and "ViT-B-16" in err


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(SweepError, match="unknown preset 'papr'.*paper"):
        load_sweep(CONFIGS / "sweep_methods.yaml", preset="papr")


def test_budget_on_the_preset_prints_steps_per_task_at_t20_beside_the_paper(tmp_path, capsys):
    """`fomo-ray budget --preset paper` measures ViT-B-16 (random weights, a CPU step at a small batch here) and prints
    every method's steps per task at T = 20 beside the paper's Tab. 4."""
    from fomo_ray.cli.budget import main as budget_main

    code = budget_main([f"budget.cache_dir={tmp_path}", "--preset", "paper", "--batch-size", "1",
                        "--methods", "finetune", "bitfit"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "backbone ViT-B-16, batch 1, image 224px" in out and "paper ViT-B/16 T=20" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    header = out.splitlines()[1].split()
    t20 = header.index("T=20")
    assert rows["finetune"][t20] == "1420" and "1420" in rows["finetune"][t20 + 4:]
    assert int(rows["bitfit"][t20]) > 1420  # biases only: cheaper steps, more of them


def test_the_paper_budget_table_extends_along_the_line_through_two_batches():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_budget_table", REPO / "scripts" / "paper_budget_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.extend(10.0, 18.0, 4, 8, 512) == 18.0 + 2.0 * 504  # state 2 + 2 per sample
    assert set(mod.PAPER_T20) == set(mod.METHODS) and mod.PAPER_T20["finetune"] == 1420
