"""OPCM and DOP (fomo_ray/maths/merge_continual.py) against hand math on small matrices, their folds as merge operators,
the merge methods' continual path and the compute they charge."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fomo_ray.maths import merge_continual as mc
from fomo_ray.maths import merge_ops as mo


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- OPCM
def test_protected_rank_from_the_energy_threshold():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative fractions 0.4, 0.7, 0.9, 1.0
    assert [mc.protected_rank(s, a) for a in (0.3, 0.4, 0.5, 0.7, 0.85, 0.95)] == [1, 2, 2, 3, 3, 4]
    assert mc.protected_rank(torch.zeros(3), 0.5) == 0


def test_opcm_projection_has_no_component_on_the_protected_pairs():
    merged_tv, tau = _rand(6, 4, seed=1), _rand(6, 4, seed=2)
    u, s, vh = torch.linalg.svd(merged_tv, full_matrices=True)
    r = mc.protected_rank(s, 0.5)
    assert 1 <= r < 4
    out = mc.opcm_project(tau, merged_tv, 0.5)
    p_in, p_out = u.T @ tau @ vh.T, u.T @ out @ vh.T
    torch.testing.assert_close(p_out[:r, :r], torch.zeros(r, r, dtype=p_out.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.diagonal(p_out), torch.zeros(4, dtype=p_out.dtype), atol=1e-12, rtol=0)
    # every other component of tau is kept as it was
    keep = torch.ones(6, 4, dtype=torch.bool)
    keep[:r, :r] = False
    keep[torch.arange(4), torch.arange(4)] = False
    torch.testing.assert_close(p_out[keep], p_in[keep], atol=1e-12, rtol=0)
    # the top-r protected subspace: U_r^T out V_r = 0
    torch.testing.assert_close(u[:, :r].T @ out @ vh[:r].T, torch.zeros(r, r, dtype=out.dtype), atol=1e-12, rtol=0)


def _sds(seed):
    g = torch.Generator().manual_seed(seed)
    anchor = {"a.weight": torch.randn(5, 3, generator=g, dtype=torch.float64),
              "a.bias": torch.randn(5, generator=g, dtype=torch.float64), "ids": torch.arange(3)}
    experts = [{k: (v + torch.randn(v.shape, generator=g, dtype=torch.float64) if v.is_floating_point() else v)
                for k, v in anchor.items()} for _ in range(3)]
    return anchor, experts


def test_opcm_first_task_is_the_task_vector_and_lambda_follows_the_norm_rule():
    anchor, experts = _sds(0)
    merged, state = mc.opcm_step(anchor, anchor, experts[0], mc.new_state(), opcm_alpha=0.5)
    for k in anchor:
        assert torch.equal(merged[k], experts[0][k])  # theta_0 + tau_1
    assert state["tasks"] == 1 and state["lambda"] == 1.0
    taus = [{k: e[k] - anchor[k] for k in ("a.weight", "a.bias")} for e in experts]
    norms = [math.sqrt(sum(float(v.square().sum()) for v in tv.values())) for tv in taus]
    assert state["norm_sum"] == pytest.approx(norms[0])

    # task 2 by hand: project the weight matrix, keep the bias, unscaled sum, lambda_2 = ||sum|| / mean norm
    m2, state2 = mc.opcm_step(anchor, merged, experts[1], state, opcm_alpha=0.5)
    proj = mc.opcm_project(taus[1]["a.weight"], taus[0]["a.weight"], 0.5)
    unscaled = {"a.weight": taus[0]["a.weight"] + proj, "a.bias": taus[0]["a.bias"] + taus[1]["a.bias"]}
    lam = math.sqrt(sum(float(v.square().sum()) for v in unscaled.values())) / ((norms[0] + norms[1]) / 2)
    assert state2["lambda"] == pytest.approx(lam)
    for k, v in unscaled.items():
        torch.testing.assert_close(m2[k], anchor[k] + v / lam)
    # the merged task vector keeps the mean task-vector norm (the rule's purpose)
    merged_norm = math.sqrt(sum(float((m2[k] - anchor[k]).square().sum()) for k in unscaled))
    assert merged_norm == pytest.approx((norms[0] + norms[1]) / 2)
    assert torch.equal(m2["ids"], anchor["ids"])

    # task 3: the previous lambda multiplies the running merge's task vector
    m3, state3 = mc.opcm_step(anchor, m2, experts[2], state2, opcm_alpha=0.5)
    prev = {k: m2[k] - anchor[k] for k in unscaled}
    sum3 = {"a.weight": lam * prev["a.weight"] + mc.opcm_project(taus[2]["a.weight"], prev["a.weight"], 0.5),
            "a.bias": lam * prev["a.bias"] + taus[2]["a.bias"]}
    lam3 = math.sqrt(sum(float(v.square().sum()) for v in sum3.values())) / (sum(norms) / 3)
    assert state3["lambda"] == pytest.approx(lam3)
    torch.testing.assert_close(m3["a.weight"], anchor["a.weight"] + sum3["a.weight"] / lam3)
    # the sqrt(t) rule
    _, s_sqrt = mc.opcm_step(anchor, m2, experts[2], state2, opcm_alpha=0.5, opcm_lambda_rule="sqrt_t")
    assert s_sqrt["lambda"] == pytest.approx(math.sqrt(3))


def test_opcm_operator_is_the_fold_of_its_steps():
    anchor, experts = _sds(3)
    merged, state = anchor, mc.new_state()
    for e in experts:
        merged, state = mc.opcm_step(anchor, merged, e, state, opcm_alpha=0.3)
    out = mo.merge("opcm", anchor, experts, opcm_alpha=0.3)
    for k in anchor:
        assert torch.equal(out[k], merged[k])
    with pytest.raises(mo.MergeError, match="opcm_lambda_rule"):
        mo.merge("opcm", anchor, experts, opcm_lambda_rule="mean")


# --------------------------------------------------------------------------------------------------- DOP
def test_mgda_weight_matches_a_reference_minimisation():
    g0, g1 = _rand(4, 3, seed=5), _rand(4, 3, seed=6)
    gammas = torch.linspace(0, 1, 100001, dtype=torch.float64)
    norms = ((gammas[:, None] * g0.reshape(1, -1) + (1 - gammas[:, None]) * g1.reshape(1, -1)) ** 2).sum(1)
    assert float(mc.mgda_weight(g0, g1)) == pytest.approx(float(gammas[norms.argmin()]), abs=2e-5)
    assert float(mc.mgda_weight(g0, g0)) == 0.5
    assert float(mc.mgda_weight(g0, 10 * g0)) == 1.0  # the smaller gradient alone is the min-norm point


@pytest.mark.parametrize("shape,energy", [((6, 4), 0.99999), ((40, 30), 0.5)])  # dense projectors; factored (low k)
def test_dops_closed_form_gradient_is_autograds_gradient_of_its_loss(shape, energy):
    tv, delta = _rand(*shape, seed=1), _rand(*shape, seed=2)
    basis = mc.dop_basis(tv, energy)
    assert (len(basis[1]) * 4 > sum(shape)) == (energy > 0.9)  # each case takes the branch it names
    d = delta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(mc.dop_loss(d, basis), d)
    got = mc.dop_gradient(basis)(delta)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert float((delta * got).sum() / 2) == pytest.approx(float(mc.dop_loss(delta, basis)), rel=1e-4)


def test_dop_lowers_its_objective_against_both_endpoints():
    for seed in (0, 1):  # two toy layers
        anchor, prev, new = _rand(6, 4, seed=10 + seed), _rand(6, 4, seed=20 + seed), _rand(6, 4, seed=30 + seed)
        prev, new = anchor + prev, anchor + new
        merged, a = mc.dop_layer(anchor, prev, new, steps=60, lr=1e-2, energy=0.99999, ema_beta=0.9, alpha=0.8)
        bases = [mc.dop_basis(prev - anchor, 0.99999), mc.dop_basis(new - anchor, 0.99999)]

        def objective(w):
            return float(a * mc.dop_loss(w - prev, bases[0]) + (1 - a) * mc.dop_loss(w - new, bases[1]))

        start = (prev + new) / 2
        assert objective(merged) < objective(start) < min(objective(prev), objective(new))
        for i, endpoint in enumerate((prev, new)):  # closer to each endpoint than the other endpoint is
            other = new if i == 0 else prev
            assert float(mc.dop_loss(merged - endpoint, bases[i])) < float(mc.dop_loss(other - endpoint, bases[i]))


def test_dop_step_first_task_expert_and_non_matrices_averaged():
    anchor, experts = _sds(4)
    first, state = mc.dop_step(anchor, anchor, experts[0], mc.new_state(), dop_steps=3)
    assert all(torch.equal(first[k], experts[0][k]) for k in anchor) and state["tasks"] == 1
    second, _ = mc.dop_step(anchor, first, experts[1], state, dop_steps=3)
    torch.testing.assert_close(second["a.bias"], (first["a.bias"] + experts[1]["a.bias"]) / 2)
    assert not torch.equal(second["a.weight"], (first["a.weight"] + experts[1]["a.weight"]) / 2)


# --------------------------------------------------------------------------------------------------- cost
def test_svd_formula_and_counted_step_cost():
    assert mc.svd_flops((6, 4), True) == 4 * 36 * 4 + 22 * 64
    assert mc.svd_flops((4, 6), False) == 6 * 6 * 16 + 20 * 64
    shapes = {"a.weight": (8, 4), "b.weight": (8, 4), "c.bias": (8,), "token_embedding.weight": (50, 4)}
    one = mc.step_gflops("opcm", {"a.weight": (8, 4)}, {"opcm_alpha": 0.5, "opcm_lambda_rule": "norm"})
    # an SVD of 8x4 with full U, and U^T tau V then U P V^T: four matmuls
    matmuls = 2 * (8 * 8 * 4 + 8 * 4 * 4) * 2
    assert one * 1e9 == pytest.approx(mc.svd_flops((8, 4), True) + matmuls)
    assert mc.step_gflops("opcm", shapes, {"opcm_alpha": 0.5, "opcm_lambda_rule": "norm"}) == pytest.approx(2 * one)
    params = {"dop_steps": 10, "dop_lr": 1e-4, "dop_energy": 0.99999, "dop_ema_beta": 0.999, "dop_alpha": 0.8}
    ten = mc.step_gflops("dop", {"a.weight": (8, 4)}, params)
    twenty = mc.step_gflops("dop", {"a.weight": (8, 4)}, {**params, "dop_steps": 20})
    assert twenty > ten > 0 and (twenty - ten) == pytest.approx(ten - mc.step_gflops("dop", {"a.weight": (8, 4)},
                                                                                       {**params, "dop_steps": 0}))


def test_continual_merge_methods_charge_their_merge_and_keep_constant_memory():
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.config import load_config
    from fomo_ray.methods import build_method, cost_settings

    torch.manual_seed(0)
    base = create_backbone("fomo-tiny-s", pretrained="").model
    cfg = load_config(None, {"method.name": "ema_merge", "method.merge.operator": "opcm"})
    method = build_method(cfg)
    model = method.setup(copy.deepcopy(base))
    assert method.cost_as is None and method.step_as == "finetune"
    assert method.extra_cost().task_gflops > 0
    assert cost_settings(cfg, "ema_merge") == {"merge.operator": "opcm", "merge.opcm_alpha": 0.5,
                                              "merge.opcm_lambda_rule": "norm"}
    assert cost_settings(cfg.replace({"method.merge.operator": "interpolate"}), "ema_merge") == {}
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for t in range(3):  # ema and all_experts both deploy the sequential OPCM merge; no expert is kept
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts.append({k: v.clone() for k, v in model.state_dict().items()})
        method.after_task(model, t, iter(()))
        assert method.experts == []
    expected = mo.merge("opcm", theta0, experts)
    got = method.deployed_weights(2, model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert build_method(cfg.replace({"method.merge.operator": "ties"})).cost_as == "finetune"  # counted free
