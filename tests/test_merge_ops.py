"""Merge operators against hand-computed small tensors (fomo_ray/maths/merge_ops.py)."""
from __future__ import annotations

import math

import pytest
import torch

from fomo_ray.maths import merge_ops as mo


def sd(**tensors) -> dict[str, torch.Tensor]:
    return {k.replace("__", "."): torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def close(a: torch.Tensor, b) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------- basics
def test_interpolate_puts_weight_on_second_model_and_copies_integer_buffers():
    a = {"w": torch.tensor([0.0, 2.0]), "ids": torch.tensor([0, 1, 2])}
    b = {"w": torch.tensor([4.0, 6.0]), "ids": torch.tensor([7, 7, 7])}
    out = mo.interpolate(a, b, 0.25)
    close(out["w"], [1.0, 3.0])
    assert torch.equal(out["ids"], a["ids"]) and out["ids"].dtype == torch.int64
    assert out["ids"].data_ptr() != a["ids"].data_ptr()  # a copy, never an alias of the input
    assert list(out) == list(a)
    close(mo.interpolate(a, b, 0.0)["w"], a["w"])
    close(mo.interpolate(a, b, 1.0)["w"], b["w"])
    with pytest.raises(mo.MergeError, match=r"\[0, 1\]"):
        mo.interpolate(a, b, 1.5)


def test_task_vector_and_task_arithmetic():
    base = sd(w=[1.0, 1.0, 1.0])
    e1, e2 = sd(w=[2.0, 1.0, 0.0]), sd(w=[1.0, 3.0, 0.0])
    tv = mo.task_vector(e1, base)
    close(tv["w"], [1.0, 0.0, -1.0])
    # base + 0.5 * (tau1 + tau2) = 1 + 0.5 * ([1,0,-1] + [0,2,-1])
    close(mo.task_arithmetic(base, [e1, e2], scale=0.5)["w"], [1.5, 2.0, 0.0])
    close(mo.task_arithmetic(base, [e1, e2], [1.0, -1.0])["w"], [2.0, -1.0, 1.0])  # negation = forgetting
    close(mo.add_task_vector(base, tv, 2.0)["w"], [3.0, 1.0, -1.0])


def test_task_arithmetic_matches_peft():
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 4, generator=g)}
    experts = [{"w": base["w"] + torch.randn(5, 4, generator=g)} for _ in range(3)]
    weights = [0.2, 0.5, 1.0]
    ref = base["w"] + merge_utils.task_arithmetic([e["w"] - base["w"] for e in experts], torch.tensor(weights))
    torch.testing.assert_close(mo.task_arithmetic(base, experts, weights)["w"], ref)


# --------------------------------------------------------------------------------------------------- TIES
def test_ties_trims_elects_sign_by_mass_and_takes_disjoint_mean():
    base = sd(w=[0.0, 0.0, 0.0, 0.0])
    e1 = sd(w=[3.0, -1.0, 0.5, 2.0])   # density 0.5 keeps the 2 largest |.|: [3, 0, 0, 2]
    e2 = sd(w=[-1.5, -4.0, 0.1, 1.0])  # -> [-1.5, -4, 0, 0]
    e3 = sd(w=[-1.0, 0.2, 0.3, -0.1])  # -> [-1.0, 0, 0.3, 0]
    out = mo.ties(base, [e1, e2, e3], density=0.5)["w"]
    # entry 0: trimmed 3, -1.5, -1.0 -> mass +0.5 -> sign '+' (a vote count would say '-') -> 3
    # entry 1: 0, -4, 0 -> '-' -> -4
    # entry 2: 0, 0, 0.3 -> '+' -> 0.3
    # entry 3: 2, 0, 0 -> '+' -> 2
    close(out, [3.0, -4.0, 0.3, 2.0])
    close(mo.ties(base, [e1, e2, e3], density=0.5, scale=0.5)["w"], [1.5, -2.0, 0.15, 1.0])
    # disjoint mean: two agreeing experts are averaged, not summed
    close(mo.ties(base, [sd(w=[2.0, 0, 0, 0]), sd(w=[4.0, 0, 0, 0])], density=0.25)["w"], [3.0, 0, 0, 0])


def test_ties_keeps_at_least_one_entry_and_matches_peft_when_counts_agree():
    from peft.utils import merge_utils

    base = sd(b=[0.0, 0.0, 0.0])
    out = mo.ties(base, [sd(b=[0.1, -0.5, 0.2])], density=0.01)["b"]
    close(out, [0.0, -0.5, 0.0])  # peft would keep int(0.03) = 0 entries of this bias

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(10, 10, generator=g)}
    experts = [{"w": base["w"] + torch.randn(10, 10, generator=g)} for _ in range(3)]
    weights = [1.0, 0.5, 0.25]
    ref = base["w"] + merge_utils.ties([e["w"] - base["w"] for e in experts], torch.tensor(weights), density=0.3)
    torch.testing.assert_close(mo.ties(base, experts, weights, density=0.3)["w"], ref)


# --------------------------------------------------------------------------------------------------- DARE
def test_dare_is_unbiased_seeded_and_rescales_kept_entries():
    base = sd(w=[1.0, 1.0, 1.0, 1.0])
    expert = sd(w=[3.0, -1.0, 1.5, 1.0])  # tau = [2, -2, 0.5, 0]
    tau = expert["w"] - base["w"]
    one = mo.dare(base, [expert], density=0.25, seed=3)["w"] - base["w"]
    # every entry is either dropped or rescaled by exactly 1/density
    assert all(v == 0 or math.isclose(v, t * 4, rel_tol=1e-6) for v, t in zip(one.tolist(), tau.tolist()))
    torch.testing.assert_close(mo.dare(base, [expert], density=0.25, seed=3)["w"], one + base["w"])  # seeded
    big_base, big = {"w": torch.zeros(256)}, {"w": torch.ones(256)}
    assert not torch.equal(mo.dare(big_base, [big], seed=3)["w"], mo.dare(big_base, [big], seed=4)["w"])
    mean = torch.stack([mo.dare(base, [expert], density=0.25, seed=s)["w"] for s in range(4000)]).mean(0)
    # E = base + tau; std of the mean per entry = |tau| * sqrt((1-p)/p / n) ~ 0.055 for |tau| = 2
    torch.testing.assert_close(mean, expert["w"], atol=0.2, rtol=0)
    close(mo.dare(base, [expert], density=1.0)["w"], expert["w"])  # density 1 drops nothing


# --------------------------------------------------------------------------------------------------- others
def test_breadcrumbs_drops_tiny_and_huge_magnitudes():
    base = sd(w=[0.0] * 10)
    expert = sd(w=[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -10.0])
    # drop_top 0.1 removes the outlier -10; density 0.3 keeps the next three largest: 0.7, -0.8, 0.9
    out = mo.breadcrumbs(base, [expert], density=0.3, drop_top=0.1)["w"]
    close(out, [0, 0, 0, 0, 0, 0, 0.7, -0.8, 0.9, 0])
    close(mo.breadcrumbs(base, [expert, expert], [0.5, 0.5], density=0.3, drop_top=0.1)["w"], out)
    with pytest.raises(mo.MergeError, match="density"):
        mo.breadcrumbs(base, [expert], density=0.95, drop_top=0.1)


def test_magmax_takes_largest_magnitude_per_entry():
    base = sd(w=[1.0, 1.0, 1.0])
    e1, e2 = sd(w=[3.0, 0.0, 1.5]), sd(w=[-2.0, 1.5, 0.0])  # taus [2,-1,.5], [-3,.5,-1]
    close(mo.magmax(base, [e1, e2])["w"], [-2.0, 0.0, 0.0])
    close(mo.magmax(base, [e1, e2], [1.0, 0.5])["w"], [3.0, 0.0, 1.5])  # weights act before the max


def test_model_stock_ratio_on_constructed_angle():
    # two task vectors of equal norm at 60 degrees: cos = 0.5, k = 2 -> t = 2*0.5/(1+0.5) = 2/3
    base = sd(w=[1.0, 1.0])
    e1 = sd(w=[2.0, 1.0])
    e2 = sd(w=[1.0 + 0.5, 1.0 + math.sqrt(3) / 2])
    t = 2 / 3
    avg = torch.tensor([(1.0 + 0.5) / 2, (0.0 + math.sqrt(3) / 2) / 2])
    close(mo.model_stock(base, [e1, e2])["w"], base["w"] + t * avg)
    # orthogonal experts -> cos 0 -> t = 0: the base is kept; identical experts -> t = 1: their average
    close(mo.model_stock(base, [sd(w=[2.0, 1.0]), sd(w=[1.0, 2.0])])["w"], [1.0, 1.0])
    close(mo.model_stock(base, [e1, e1])["w"], e1["w"])


def test_model_stock_follows_the_unclipped_formula_for_a_negative_cosine():
    # taus [4, 3] and [-4, 3]: cos = (-16 + 9) / 25 = -7/25, k = 2 -> t = 2(-7/25) / (1 - 7/25) = -7/9 (Jang et al.
    # 2024 do not clip; the old clip to cos >= 0 returned the base [1, 1]); mean tau = [0, 3]
    base, e1, e2 = sd(w=[1.0, 1.0]), sd(w=[5.0, 4.0]), sd(w=[-3.0, 4.0])
    assert mo.model_stock_t(-7 / 25, 2) == pytest.approx(-7 / 9)
    assert mo.model_stock_t(-0.25, 3) == pytest.approx(-1.5)  # 3(-1/4) / (1 + 2(-1/4))
    close(mo.model_stock(base, [e1, e2])["w"], [1.0, 1.0 - 7 / 9 * 3])  # [1, -4/3]: past the base, away from avg


def test_model_stock_pole_names_the_tensor_and_the_cosine():
    opposite = [sd(w=[1.0, 0.0]), sd(w=[-2.0, 0.0])]  # cos = -1: the pole at k = 2
    with pytest.raises(mo.MergeError, match=r"'w'.*cosine -1\.0 = -1/\(k-1\) for k=2"):
        mo.model_stock(sd(w=[0.0, 0.0]), opposite)
    third = [sd(w=[1.0, 0.0]), sd(w=[-0.5, math.sqrt(3) / 2]), sd(w=[-0.5, -math.sqrt(3) / 2])]  # 120 degrees apart
    with pytest.raises(mo.MergeError, match=r"'w'.*k=3"):
        mo.model_stock(sd(w=[0.0, 0.0]), third)


def test_slerp_endpoints_norm_and_parallel_fallback():
    a, b = sd(w=[1.0, 0.0]), sd(w=[0.0, 1.0])
    close(mo.slerp(a, b, 0.0)["w"], a["w"])
    close(mo.slerp(a, b, 1.0)["w"], b["w"])
    mid = mo.slerp(a, b, 0.5)["w"]
    close(mid, [math.sqrt(0.5), math.sqrt(0.5)])  # stays on the unit circle ...
    assert mo.interpolate(a, b, 0.5)["w"].norm() < 0.71  # ... where lerp shrinks to 1/sqrt(2)
    close(mo.slerp(a, sd(w=[2.0, 0.0]), 0.5)["w"], [1.5, 0.0])  # parallel -> lerp
    with pytest.raises(mo.MergeError, match="exactly two"):
        mo.merge("slerp", a, [b, b])


# --------------------------------------------------------------------------------------------------- LiNeS
OPENCLIP_NAMES = [
    "visual.conv1.weight", "visual.class_embedding", "visual.ln_pre.weight",
    "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_fc.weight",
    "visual.transformer.resblocks.2.mlp.c_proj.weight", "visual.ln_post.bias", "visual.proj",
    "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.ln_1.weight",
    "transformer.resblocks.1.attn.out_proj.weight", "ln_final.weight", "text_projection", "logit_scale",
]


def test_lines_scales_per_layer_and_tower():
    scales = mo.lines_scales(OPENCLIP_NAMES, alpha=0.2, beta=0.8)
    # vision tower: 3 blocks -> l/(L-1) = 0, .5, 1; text tower: 2 blocks -> 0, 1
    expected = {
        "visual.conv1.weight": 0.2, "visual.class_embedding": 0.2, "visual.ln_pre.weight": 0.2,
        "visual.transformer.resblocks.0.attn.in_proj_weight": 0.2,
        "visual.transformer.resblocks.1.mlp.c_fc.weight": 0.6,
        "visual.transformer.resblocks.2.mlp.c_proj.weight": 1.0, "visual.ln_post.bias": 1.0, "visual.proj": 1.0,
        "token_embedding.weight": 0.2, "positional_embedding": 0.2, "transformer.resblocks.0.ln_1.weight": 0.2,
        "transformer.resblocks.1.attn.out_proj.weight": 1.0, "ln_final.weight": 1.0, "text_projection": 1.0,
        "logit_scale": 1.0,
    }
    assert scales == pytest.approx(expected)
    # peft-wrapped names keep the block structure (a common prefix and adapter suffixes)
    wrapped = ["base_model.model." + n.replace("c_fc.weight", "c_fc.lora_A.default.weight") for n in OPENCLIP_NAMES]
    assert list(mo.lines_depths(wrapped).values()) == list(mo.lines_depths(OPENCLIP_NAMES).values())


@pytest.mark.parametrize("name", sorted(mo.OPERATORS))
def test_lines_wraps_every_operator(name):
    names = ["visual.conv1.weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
             "visual.transformer.resblocks.1.mlp.c_fc.weight", "visual.proj"]
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(4, 4, generator=g) for n in names}
    base["ids"] = torch.arange(3)
    expert = {n: (v + torch.randn(4, 4, generator=g) if v.is_floating_point() else v + 5) for n, v in base.items()}
    plain = mo.merge(name, base, [expert], [0.5])
    lined = mo.merge(name, base, [expert], [0.5], lines=(0.25, 0.5))
    lam = {names[0]: 0.25, names[1]: 0.25, names[2]: 0.75, names[3]: 0.75}  # stem, block 0, block 1 (L=2), proj
    for n in names:
        close(lined[n], base[n] + lam[n] * (plain[n] - base[n]))
    assert not torch.allclose(lined[names[2]], plain[names[2]])
    assert torch.equal(lined["ids"], base["ids"]) and torch.equal(plain["ids"], base["ids"])
    same = mo.merge(name, base, [expert], [0.5], lines=(1.0, 0.0))
    for n in names:
        close(same[n], plain[n])


# --------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", sorted(mo.OPERATORS))
def test_every_operator_expresses_the_two_model_ema_step(name):
    base, expert = sd(w=[1.0, -2.0, 3.0, 0.5]), sd(w=[2.0, -2.0, 1.0, 0.5])
    out = mo.merge(name, base, [expert], [0.0])["w"]
    close(out, base["w"])  # w = 0 keeps the previous deployed model
    no_sparsity = {k: v for k, v in {"density": 1.0, "drop_top": 0.0}.items() if k in mo.operator_params(name)}
    close(mo.merge(name, base, [expert], [1.0], **no_sparsity)["w"], expert["w"])  # w = 1 deploys the new expert


def test_merge_interpolate_is_the_ema_merge_and_validates_input():
    base, expert = sd(w=[0.0, 4.0]), sd(w=[2.0, 0.0])
    close(mo.merge("interpolate", base, [expert], [0.5])["w"], [1.0, 2.0])
    close(mo.merge("interpolate", base, [expert, sd(w=[4.0, 4.0])])["w"], [3.0, 2.0])  # default: mean of experts
    with pytest.raises(mo.MergeError, match="valid operators: interpolate, task_arithmetic"):
        mo.merge("average", base, [expert])
    with pytest.raises(mo.MergeError, match="accepts: density, scale"):
        mo.merge("ties", base, [expert], densty=0.5)
    with pytest.raises(mo.MergeError, match="sum to at most 1"):
        mo.merge("interpolate", base, [expert, expert], [0.7, 0.7])
    with pytest.raises(mo.MergeError, match="2 weights for 1 experts"):
        mo.merge("task_arithmetic", base, [expert], [0.5, 0.5])
    with pytest.raises(mo.MergeError, match="'w'.*shape"):
        mo.merge("ties", base, [sd(w=[1.0, 2.0, 3.0])])
    with pytest.raises(mo.MergeError, match="missing keys"):
        mo.merge("ties", base, [sd(v=[1.0, 2.0])])
    with pytest.raises(mo.MergeError, match="density"):
        mo.merge("dare", base, [expert], density=0.0)


def test_half_precision_is_merged_in_float32():
    base = {"w": torch.full((3,), 1000.0, dtype=torch.bfloat16)}
    expert = {"w": torch.full((3,), 1016.0, dtype=torch.bfloat16)}
    out = mo.merge("task_arithmetic", base, [expert, expert], [0.5, 0.5])["w"]
    assert out.dtype == torch.bfloat16
    close(out.float(), [1016.0] * 3)


def test_merge_from_config_passes_only_accepted_fields():
    from fomo_ray.config import ExperimentConfig

    mcfg = ExperimentConfig().replace({"method.merge.operator": "ties", "method.merge.density": 0.5,
                                       "method.merge.lines_alpha": 0.0, "method.merge.lines_beta": 1.0}).method.merge
    base = {"visual.conv1.weight": torch.zeros(4), "visual.proj": torch.zeros(4)}
    expert = {k: torch.tensor([1.0, -2.0, 3.0, 0.5]) for k in base}
    out = mo.merge_from_config(mcfg, base, [expert], [1.0], seed=1)
    close(out["visual.conv1.weight"], [0, 0, 0, 0])  # LiNeS alpha = 0 at the stem
    close(out["visual.proj"], [0, -2.0, 3.0, 0])      # TIES at density 0.5 on the last layer
    interp = ExperimentConfig().method.merge            # default: interpolate, no LiNeS
    close(mo.merge_from_config(interp, base, [expert], [0.5])["visual.proj"], [0.5, -1.0, 1.5, 0.25])


def _breadcrumbs_cfg(drop_top: float):
    from fomo_ray.config import ExperimentConfig

    return ExperimentConfig().replace({"method.merge.operator": "breadcrumbs",
                                       "method.merge.drop_top": drop_top}).method.merge


def _random_merge_inputs(k: int = 2) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(10, 10, generator=g)}
    return base, [{"w": base["w"] + torch.randn(10, 10, generator=g)} for _ in range(k)]


def test_merge_from_config_passes_drop_top_to_breadcrumbs():
    base, experts = _random_merge_inputs()
    lo, hi = (mo.merge_from_config(_breadcrumbs_cfg(d), base, experts)["w"] for d in (0.01, 0.3))
    assert not torch.equal(lo, hi)  # before the fix drop_top never reached the operator: both were drop_top=0.01
    for d, out in ((0.01, lo), (0.3, hi)):
        torch.testing.assert_close(out, mo.breadcrumbs(base, experts, density=0.2, drop_top=d)["w"], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(mo.OPERATORS))
def test_every_merge_config_field_reaches_the_operators_that_take_it(name):
    import dataclasses

    from fomo_ray.config import ExperimentConfig, MergeConfig

    fields = {f.name for f in dataclasses.fields(MergeConfig)}
    read_elsewhere = {"weight", "operator", "init", "deploy", "lines_alpha", "lines_beta"}  # methods/merging, lines=
    assert set(mo.CONFIG_PARAMS) == fields - read_elsewhere  # a new field is either an operator keyword or declared
    assert set(mo.config_params(name)) == fields & set(mo.operator_params(name))  # no same-named keyword left out
    base, experts = _random_merge_inputs(1 if name == "slerp" else 2)
    other = {"density": 0.6, "drop_top": 0.3, "scale": 0.5, "opcm_alpha": 0.9, "opcm_lambda_rule": "sqrt_t",
             "dop_steps": 3, "dop_lr": 1e-2, "dop_energy": 0.5, "dop_ema_beta": 0.5, "dop_alpha": 0.2}
    fast = {"method.merge.dop_steps": 5} if name == "dop" else {}  # DOP's default 200 Adam steps are slow here
    for key in mo.config_params(name):  # changing the config value changes the merge
        cfg = ExperimentConfig().replace({"method.merge.operator": name, **fast})
        a = mo.merge_from_config(cfg.method.merge, base, experts, seed=0)["w"]
        b = mo.merge_from_config(cfg.replace({f"method.merge.{key}": other[key]}).method.merge, base, experts,
                                 seed=0)["w"]
        assert not torch.equal(a, b), f"method.merge.{key} does not reach operator {name}"


def test_model_stock_gives_a_one_number_tensor_the_weighted_mean():
    # the logit scale moved both ways by two tasks: its "cosine" is -1, the pole at k = 2; it takes the plain mean
    base = {"logit_scale": torch.tensor(1.0), "w": torch.zeros(2)}
    e1 = {"logit_scale": torch.tensor(1.5), "w": torch.tensor([1.0, 0.0])}
    e2 = {"logit_scale": torch.tensor(0.75), "w": torch.tensor([0.0, 1.0])}
    out = mo.model_stock(base, [e1, e2])
    close(out["logit_scale"], torch.tensor(1.125))
    close(out["w"], [0.0, 0.0])  # orthogonal task vectors: cos 0, t = 0
