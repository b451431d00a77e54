"""Reference points in every study and the trial cache (issue 17, item 3): ``references:`` adds zero-shot, fine-tune
and joint at the base config (crossed with the seeds only), and an identical finished trial (same config and seed,
same clean commit) is replayed in a later sweep instead of rerun."""
from __future__ import annotations

import pytest

from fomo_ray.results import trial_cache
from fomo_ray.config import load_config
from fomo_ray.planning.sweep_spec import (SweepError, enumerated_dims, enumerated_trials, plan_sweep, spec_from_dict,
                                          trial_label, trial_overrides)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _plan(**raw):
    return plan_sweep(spec_from_dict({"name": "s", **raw}))


def test_references_are_extra_trials_at_the_base_config_crossed_with_seeds_only():
    plan = _plan(references=True, seeds=2, space={"method.merge.weight": {"grid": [0.1, 0.9]}},
                 base={"method.name": "ema_merge"})
    trials = enumerated_trials(plan)
    labels = [trial_label(c, enumerated_dims(plan.space)) for c in trials]
    assert labels == ["weight=0.1,seed=0", "weight=0.1,seed=1", "weight=0.9,seed=0", "weight=0.9,seed=1",
                      "zero_shot,seed=0", "zero_shot,seed=1", "finetune,seed=0", "finetune,seed=1",
                      "joint,seed=0", "joint,seed=1"]
    assert plan.total == len(trials) == 10
    ref = trials[labels.index("joint,seed=1")]
    assert trial_overrides(ref, plan.space) == {"method.name": "joint", "seed": 1}  # the merge weight stays unset
    assert trial_overrides(trials[0], plan.space) == {"method.merge.weight": 0.1, "seed": 0}
    assert len(enumerated_trials(_plan(references=["zero_shot"], space={}))) == 2  # the base trial + zero-shot


@pytest.mark.parametrize("raw, match", [
    ({"references": ["finetune", "oracle"]}, r"unknown reference\(s\) \['oracle'\]"),
    ({"references": "yes"}, "references must be true or a list"),
    ({"references": True, "space": {"variant": {"points": {"finetune": {"method.name": "finetune"}}}}},
     r"sweep point\(s\) \['finetune'\] of 'variant' are also references"),
    ({"references": True, "search": "optuna", "num_samples": 2,
      "space": {"optimizer.lr": {"loguniform": [1e-5, 1e-3]}}}, "optuna chooses its own"),
])
def test_bad_references_are_refused(raw, match):
    with pytest.raises(SweepError, match=match):
        _plan(**raw)


def test_every_shipped_study_uses_references_and_copies_no_reference_point():
    from _edges_util import REPO

    from fomo_ray.planning.sweep_spec import load_sweep

    for path in sorted((REPO / "experiments" / "configs").glob("sweep_*.yaml")):
        plan = plan_sweep(load_sweep(path))
        labels = [trial_label(c, enumerated_dims(plan.space)) for c in enumerated_trials(plan)]
        assert {"zero_shot", "joint"} <= set(labels), path.name
        methods = [plan.base.replace(trial_overrides(c, plan.space)).method.name for c in enumerated_trials(plan)]
        assert methods.count("zero_shot") == 1 and methods.count("joint") == 1, path.name


# --------------------------------------------------------------------------------------------------- the cache
def test_the_result_key_ignores_where_and_how_a_trial_runs_but_not_what_it_computes(tmp_path):
    cfg = load_config(None, {"output_dir": str(tmp_path / "a")})
    same = cfg.replace({"output_dir": str(tmp_path / "b"), "name": "other", "ray.cpus_per_worker": 2.0,
                        "tracking.enabled": False, "data.num_workers": 0, "budget.cache_dir": str(tmp_path)})
    assert trial_cache.result_key(cfg) == trial_cache.result_key(same)
    for change in ({"seed": 1}, {"optimizer.lr": 3e-4}, {"method.name": "lora"}, {"evaluation.subset_min": 5}):
        assert trial_cache.result_key(cfg.replace(change)) != trial_cache.result_key(cfg), change


def test_only_a_finished_trial_of_the_same_clean_commit_and_platform_is_reused(tmp_path):
    cfg = load_config(None, {"output_dir": str(tmp_path)})
    here = trial_cache.Origin(COMMIT, "AMD EPYC, AVX512 kernels, torch 2.14.1")
    evals = [{"kind": "eval", "point": 0, "A_KA": 0.1, "A_ZS": 0.2, "GM": 0.14, "ds/adapt/D/top1": 0.1}]
    assert trial_cache.lookup(cfg, here) is None
    path = trial_cache.store(cfg, here, evals, {"sweep": "s", "trial": "000-x", "mlflow_run_id": "r"})
    assert path.parent == tmp_path / "trial_cache"
    assert trial_cache.lookup(cfg, here)["evals"] == evals
    assert trial_cache.lookup(cfg, trial_cache.Origin("f" * 40, here.platform)) is None  # another commit
    # another CPU runs other kernels, so its numbers differ: an output folder copied there is not replayed
    assert trial_cache.lookup(cfg, trial_cache.Origin(COMMIT, "AMD EPYC, AVX2 kernels, torch 2.14.1")) is None
    assert trial_cache.lookup(cfg.replace({"seed": 3}), here) is None
    assert trial_cache.reusable_commit(COMMIT, "0.4.0") and not trial_cache.reusable_commit(COMMIT, "0.4.0+changes")
    assert not trial_cache.reusable_commit("unknown", "0.4.0")
    sent = []
    trial_cache.replay(trial_cache.lookup(cfg, here), sent.append, None)
    assert sent == [*evals, {"kind": "done", "A_KA": 0.1, "A_ZS": 0.2, "GM": 0.14}]
