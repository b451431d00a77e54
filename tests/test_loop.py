"""The continual loop end to end on real components: FiF-mini (small scale) on real .beton files, a real tiny open_clip
model, real peft adapters, the real budget/schedules/merge operators/evaluator.

Every registered method runs through the loop and resumes mid-stream bit-identically (a new method is covered
without editing this file); hooks are reachable; runs are deterministic; a NaN loss stops the run naming task+step.
"""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fomo_ray.core.assembly import run_name
from fomo_ray.core.checkpoint import LoopState, load_state, save_state
from fomo_ray.cli.run import main
from fomo_ray.core.loop import RunHooks, TrainingDiverged, run_stream
from fomo_ray.models.metrics import COLUMNS
from fomo_ray.maths.optim import decays, make_optimizer
from fomo_ray.methods import REGISTRY, Method

from _data_util import FEW_DOP_STEPS, small_fifmini, tiny_config

STEPS_PER_TASK = 2


@pytest.fixture(scope="session")
def bench_root(tmp_path_factory):
    """FiF-mini at 5% scale (same generator, same datasets/streams; ~20 train rows per adaptation dataset): the
    session's small build (tests/_data_util.py), read only."""
    return small_fifmini(tmp_path_factory).root


@pytest.fixture
def tiny_cfg(bench_root, tmp_path):
    def make(**overrides):
        return tiny_config(bench_root, tmp_path, **{"budget.total_ft_steps": 2 * STEPS_PER_TASK,
                                                    "method.reg.ewc_fisher_batches": 1, **overrides})
    return make


def _frame_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


# --------------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_and_resumes_mid_stream_identically(name, tiny_cfg, tmp_path):
    # evaluation (the slowest part on CPU) only before and after the stream; in-stream points: the hooks test
    cfg = tiny_cfg(**{"method.name": name, "ray.checkpoint_every_steps": 1, "evaluation.every_n_tasks": 2,
                      **FEW_DOP_STEPS.get(name, {})})
    states: list[LoopState] = []
    full = run_stream(cfg, hooks=RunHooks(on_checkpoint=states.append))

    assert list(full.columns) == list(COLUMNS)
    assert set(full["run"]) == {run_name(cfg)}
    num_tasks = 1 if name == "joint" else 2
    assert sorted(full["point"].unique()) == [0, num_tasks]
    points = list(range(num_tasks + 1))
    assert full["value"].map(math.isfinite).all() and full["value"].between(0, 1).all()
    assert set(full["role"]) == {"adapt", "eval"}

    # resume from the latest mid-task state (else the latest task boundary): method state, optimizer, buffer, RNG
    # and cursor must all come back for the remaining steps and evaluations to match bit for bit
    mid = [s for s in states if s.step > 0]
    chosen = mid[-1] if mid else states[-2]
    assert chosen.task < len(points) - 1 or chosen.step > 0
    save_state(chosen, tmp_path / "state")
    resumed_states: list[LoopState] = []
    resumed = run_stream(cfg, resume=load_state(tmp_path / "state"),
                         hooks=RunHooks(on_checkpoint=resumed_states.append))
    _frame_equal(resumed, full)
    # accuracies are coarse; the final weights, method state (merge history, Fisher, Omega) and buffer are exact
    final, final_resumed = states[-1], resumed_states[-1]
    assert (final.task, final.step) == (final_resumed.task, final_resumed.step) == (len(points) - 1, 0)
    _assert_tree_equal(final_resumed.model, final.model)
    _assert_tree_equal(final_resumed.method, final.method)
    _assert_tree_equal(final_resumed.buffer, final.buffer)


def _assert_tree_equal(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs after resume"
    else:
        assert a == b, path


# --------------------------------------------------------------------------------------------------- hooks
class Spy(Method):
    """Records every method hook call (test double; the citation rule does not apply)."""

    name = "spy"

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        self.calls: list[tuple] = []
        Spy.last = self

    def setup(self, model):
        self.calls.append(("setup",))
        return model

    def task_plan(self, task_rows, steps_per_task):
        self.calls.append(("task_plan", len(task_rows), steps_per_task))
        return super().task_plan(task_rows, steps_per_task)

    def training_weights(self, t, model):
        self.calls.append(("training_weights", t))
        return None

    def extra_loss(self, model, t):
        self.calls.append(("extra_loss", t))
        return None

    def after_step(self, model, t, step, lr):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and lr > 0  # called after backward, before the next zero_grad
        self.calls.append(("after_step", t, step))

    def after_task(self, model, t, task_losses):
        def check(loss):  # a real CLIP loss on D_t with a graph to differentiate
            assert loss.requires_grad and math.isfinite(float(loss.detach()))
            return [loss.detach().reshape(1)]

        total = task_losses.sum_over(2, check)
        assert total[0].shape == (1,) and float(total[0]) > 0
        self.calls.append(("after_task", t))

    def deployed_weights(self, t, model):
        self.calls.append(("deployed_weights", t))
        return model.state_dict()


def test_every_hook_fires_in_order(tiny_cfg, monkeypatch):
    monkeypatch.setitem(REGISTRY, "spy", Spy)
    cfg = tiny_cfg(**{"method.name": "spy", "ray.checkpoint_every_steps": 1})
    seen = {"eval": [], "step": [], "checkpoint": [], "should_stop": 0}

    def should_stop():
        seen["should_stop"] += 1
        return False

    hooks = RunHooks(on_eval=lambda p, recs: seen["eval"].append((p, len(recs))),
                     on_step=lambda t, s, loss, lr, norm, g: seen["step"].append(
                         (t, s, math.isfinite(loss), lr > 0, float(norm) > 0, g)),
                     on_checkpoint=lambda st: seen["checkpoint"].append((st.task, st.step, st.optimizer is None)),
                     should_stop=should_stop)
    df = run_stream(cfg, hooks=hooks)
    assert [p for p, _ in seen["eval"]] == [0, 1, 2] and all(n > 0 for _, n in seen["eval"])
    assert sum(n for _, n in seen["eval"]) == len(df)
    # the pre-clip gradient norm and the step counted over the whole stream come with every step
    assert seen["step"] == [(t, s, True, True, True, t * STEPS_PER_TASK + s) for t in range(2)
                            for s in range(STEPS_PER_TASK)]
    # mid-task states carry the optimizer; task-boundary states do not (the next task starts a fresh AdamW)
    assert seen["checkpoint"] == [(0, 1, False), (1, 0, True), (1, 1, False), (2, 0, True)]
    assert seen["should_stop"] == 1  # asked between tasks only (never per step, never after the last task)
    expected = [("setup",), ("task_plan", 2, STEPS_PER_TASK)]
    for t in range(2):
        expected += [("training_weights", t)]
        expected += [c for s in range(STEPS_PER_TASK) for c in (("extra_loss", t), ("after_step", t, s))]
        expected += [("after_task", t), ("deployed_weights", t)]
    assert Spy.last.calls == expected


def test_step_hook_gets_the_gradient_norm_without_a_clip_and_changes_nothing(tiny_cfg):
    """With optimizer.grad_clip = 0 the loop measures the norm only for an on_step hook; the run is the same."""
    cfg = tiny_cfg(**{"optimizer.grad_clip": 0.0})
    norms = []
    with_hook = run_stream(cfg, hooks=RunHooks(on_step=lambda t, s, loss, lr, norm, g: norms.append(float(norm))))
    assert len(norms) == 2 * STEPS_PER_TASK and all(math.isfinite(n) and n > 0 for n in norms)
    _frame_equal(with_hook, run_stream(cfg))


def test_should_stop_ends_the_run_cooperatively(tiny_cfg):
    """should_stop is asked between tasks (a sweep's rule decides at evaluation points): asked to stop during task
    0, the run finishes that task and its evaluation point, then leaves."""
    steps = []
    hooks = RunHooks(on_step=lambda t, s, loss, lr, *_: steps.append((t, s)), should_stop=lambda: len(steps) >= 1)
    df = run_stream(tiny_cfg(), hooks=hooks)
    assert steps == [(0, s) for s in range(STEPS_PER_TASK)]
    assert sorted(df["point"].unique()) == [0, 1]  # the zero-shot point and task 0's


# --------------------------------------------------------------------------------------------------- determinism
def test_identical_runs_identical_metrics_and_seed_matters(tiny_cfg):
    """Two runs of one config agree bit for bit (on the real FFCV loader when installed); another seed differs."""
    from fomo_ray.data.loaders import ffcv_available

    loader = "ffcv" if ffcv_available() else "memory"
    losses = {}

    def run(seed):
        rec = losses.setdefault(seed, [])
        return run_stream(tiny_cfg(**{"seed": seed, "data.loader": loader, "method.name": "ema_merge"}),
                          hooks=RunHooks(on_step=lambda t, s, loss, lr, *_: rec.append(loss)))

    first = run(0)
    second_losses = losses.pop(0)
    _frame_equal(run(0), first)
    assert losses[0] == second_losses
    run(1)
    assert losses[1] != losses[0]


# --------------------------------------------------------------------------------------------------- failures
class NaNAtTask1Step1(Method):
    """Test double: a regulariser that returns NaN at task 1, step 1."""

    name = "nan_spy"

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        self.step = 0

    def extra_loss(self, model, t):
        self.step += 1
        return torch.tensor(float("nan")) if (t, self.step) == (1, STEPS_PER_TASK + 2) else None


def test_nan_loss_stops_naming_task_and_step(tiny_cfg, monkeypatch):
    monkeypatch.setitem(REGISTRY, "nan_spy", NaNAtTask1Step1)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at task 1, step 1 \(method 'nan_spy'\)") as err:
        run_stream(tiny_cfg(**{"method.name": "nan_spy"}))
    assert (err.value.task, err.value.step) == (1, 1)


def test_main_marks_a_diverged_run_failed(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "nan_spy", NaNAtTask1Step1)
    cfg = tiny_cfg(**{"method.name": "nan_spy"})
    rc = main([f"{k}={v}" for k, v in cfg.flat().items() if not isinstance(v, tuple)])
    out_dir = Path(cfg.output_dir) / run_name(cfg)
    assert rc == 1
    failed = json.loads((out_dir / "FAILED.json").read_text())
    assert (failed["task"], failed["step"]) == (1, 1)
    assert not (out_dir / "results.parquet").exists()  # a failed run never looks complete
    assert "task 1, step 1" in capsys.readouterr().err


def test_main_writes_results_and_prints_the_table(tiny_cfg, capsys, tmp_path):
    cfg = tiny_cfg()
    overrides = [f"{k}={v}" for k, v in cfg.flat().items() if not isinstance(v, tuple)]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "A_KA" in out and "A_ZS" in out and "GM" in out
    out_dir = tmp_path / "runs" / run_name(cfg)
    table = pd.read_parquet(out_dir / "results.parquet")
    assert sorted(table["point"].unique()) == [0, 1, 2]
    assert load_state(out_dir / "state").task == 2  # the final task-end state, for --resume
    assert not [p for p in out_dir.rglob("*.tmp")]  # atomic writes leave no temp files
    # --resume continues from that state: nothing is left to train, the same table comes back
    assert main(overrides + ["--resume"]) == 0
    _frame_equal(pd.read_parquet(out_dir / "results.parquet"), table)


def test_reservoir_buffer_policy_runs_and_resumes_identically(tiny_cfg):
    cfg = tiny_cfg(**{"mixture.buffer_policy": "reservoir", "mixture.buffer_size": 5, "stream.num_tasks": 3,
                      "budget.total_ft_steps": 3, "ray.checkpoint_every_steps": 0})
    states: list[LoopState] = []
    full = run_stream(cfg, hooks=RunHooks(on_checkpoint=states.append))
    assert [len(s.buffer["slots"]) for s in states] == [5, 5, 5]  # every task adds > 5 rows: the reservoir is full
    resumed_states: list[LoopState] = []
    resumed = run_stream(cfg, resume=states[0], hooks=RunHooks(on_checkpoint=resumed_states.append))
    _frame_equal(resumed, full)
    _assert_tree_equal(resumed_states[-1].buffer, states[-1].buffer)  # incl. the reservoir's RNG state


def test_pretrained_auto_needs_a_tiny_architecture(tiny_cfg):
    from fomo_ray.config import ConfigError
    from fomo_ray.core.assembly import resolve_pretrained

    with pytest.raises(ConfigError, match="'auto' only exists for the tiny architectures"):
        resolve_pretrained(tiny_cfg(**{"backbone.name": "ViT-B-32", "backbone.pretrained": "auto"}), bench=None)


def test_resume_refuses_another_config(tiny_cfg):
    states = []
    run_stream(tiny_cfg(), hooks=RunHooks(on_checkpoint=states.append))
    with pytest.raises(ValueError, match="resume state belongs to run"):
        run_stream(tiny_cfg(**{"optimizer.lr": 1e-3}), resume=states[0])


# --------------------------------------------------------------------------------------------------- budget, optimizer
def test_maf_budget_gives_adapters_more_steps_than_finetune(tiny_cfg):
    counts = {}
    for name in ("finetune", "lora"):
        steps = []
        run_stream(tiny_cfg(**{"method.name": name, "budget.mode": "maf", "stream.num_tasks": 1,
                               "budget.total_ft_steps": 2}),
                   hooks=RunHooks(on_step=lambda t, s, loss, lr, *_: steps.append(s)))
        counts[name] = len(steps)
    assert counts["finetune"] == 2 and counts["lora"] > counts["finetune"]


def test_weight_decay_exempts_biases_norms_embeddings_and_logit_scale(tiny_cfg):
    from fomo_ray.models.backbones import create_backbone

    model = create_backbone("fomo-tiny-s", pretrained="").model
    named = dict(model.named_parameters())
    exempt = {n for n, p in named.items() if not decays(n, p)}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
            "visual.positional_embedding", "ln_final.weight", "visual.transformer.resblocks.0.attn.in_proj_bias",
            "transformer.resblocks.0.mlp.c_fc.bias"} <= exempt
    assert {"visual.proj", "text_projection", "visual.conv1.weight",
            "transformer.resblocks.0.mlp.c_fc.weight"}.isdisjoint(exempt)
    opt = make_optimizer(model, tiny_cfg())
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.0] == {id(named[n]) for n in exempt}
    assert sum(len(g) for g in by_decay.values()) == len(named)
    single = make_optimizer(model, tiny_cfg(**{"optimizer.exempt_no_decay": False}))
    assert [g["weight_decay"] for g in single.param_groups] == [0.2]


def test_state_file_round_trip_is_weights_only_safe(tmp_path):
    state = LoopState(run="r", task=1, step=3, model={"w": torch.ones(2)}, optimizer=None, method={"x": [1, 2]},
                      buffer={"rows": np.arange(3)}, rng={"torch": torch.get_rng_state()},
                      results=[{"run": "r", "point": 0, "dataset": "D", "role": "eval", "metric": "top1",
                                "value": 0.5}])
    save_state(state, tmp_path)
    back = load_state(tmp_path)
    assert back.task == 1 and back.step == 3 and torch.equal(back.model["w"], torch.ones(2))
    assert isinstance(back.buffer["rows"], np.ndarray) and back.buffer["rows"].tolist() == [0, 1, 2]
    assert back.results == state.results
    with pytest.raises(FileNotFoundError, match="no loop state"):
        load_state(tmp_path / "missing")


def _before_the_rename(rows: list[dict]) -> list[dict]:
    """Results rows as a loop state written before issue 30, item 2 holds them: the evaluation point under ``task``."""
    return [{("task" if k == "point" else k): v for k, v in r.items()} for r in rows]


def test_a_state_written_before_the_rename_reads_its_results_with_point(tmp_path):
    rows = [{"run": "r", "point": p, "dataset": "D", "role": "eval", "metric": "top1", "value": 0.5} for p in (0, 1)]
    old = _before_the_rename(rows)
    assert all("task" in r and "point" not in r for r in old)
    save_state(LoopState(run="r", task=1, step=0, model={"w": torch.ones(2)}, optimizer=None, method={}, buffer={},
                         rng={}, results=old), tmp_path)
    back = load_state(tmp_path)
    assert back.results == rows and back.task == 1  # the cursor's task stays the task index


def test_a_run_checkpointed_before_the_rename_resumes(tiny_cfg):
    """``fomo-ray run --resume`` (``execute_run(cfg, resume=True)``) of a run whose task-end state was written before
    the evaluation point's key was named ``point``: it continues and ends with the uninterrupted run's table."""
    import dataclasses

    from fomo_ray.engine.local_run import execute_run
    from fomo_ray.models.metrics import load_results

    cfg = tiny_cfg(**{"ray.checkpoint_every_steps": 0})
    states: list[LoopState] = []
    full = run_stream(cfg, hooks=RunHooks(on_checkpoint=states.append))
    after_task_0 = states[0]
    assert (after_task_0.task, after_task_0.step) == (1, 0) and {r["point"] for r in after_task_0.results} == {0, 1}
    state_dir = Path(cfg.output_dir) / run_name(cfg) / "state"
    save_state(dataclasses.replace(after_task_0, results=_before_the_rename(after_task_0.results)), state_dir)
    out = execute_run(cfg, resume=True)
    _frame_equal(out.results, full)
    _frame_equal(load_results(out.results_file), full)


def test_writing_a_state_copies_no_tensor(tmp_path, monkeypatch):
    """A snapshot is already a private CPU copy: writing it must not copy the model again (that doubled a large
    model's host RAM for the length of every write)."""
    from fomo_ray.core import checkpoint

    written = {}
    monkeypatch.setattr(checkpoint, "torch_save", lambda payload, path: written.update(payload) or path)
    weights = {"w": torch.ones(1000)}
    save_state(LoopState(run="r", task=0, step=1, model=weights, optimizer={"state": {0: {"exp_avg": torch.ones(3)}}},
                         method={}, buffer={}, rng={}, results=[]), tmp_path)
    assert written["model"]["w"].data_ptr() == weights["w"].data_ptr()


def test_prefetching_on_and_off_train_identically_also_across_a_mid_task_resume(tiny_cfg, tmp_path):
    """Issue 11: batches built ahead on a thread are the batches built on demand, and a checkpoint counts consumed
    batches (never prefetched ones), so a run resumed mid-task with prefetching equals one without it, bit for bit."""
    steps = {"budget.total_ft_steps": 8, "ray.checkpoint_every_steps": 1, "evaluation.every_n_tasks": 2}
    off_states: list[LoopState] = []
    off = run_stream(tiny_cfg(**steps, **{"data.prefetch": 0}), hooks=RunHooks(on_checkpoint=off_states.append))
    on_states: list[LoopState] = []
    cfg = tiny_cfg(**steps, **{"data.prefetch": 3})
    on = run_stream(cfg, hooks=RunHooks(on_checkpoint=on_states.append))
    off = off.drop(columns="run")  # the run name hashes every key, data.prefetch included
    _frame_equal(on.drop(columns="run"), off)
    _assert_tree_equal(on_states[-1].model, off_states[-1].model)
    mid = next(s for s in on_states if s.task == 0 and s.step == 2)  # 2 of 4 steps consumed, more prefetched
    resumed_states: list[LoopState] = []
    resumed = run_stream(cfg, resume=mid, hooks=RunHooks(on_checkpoint=resumed_states.append))
    _frame_equal(resumed.drop(columns="run"), off)
    _assert_tree_equal(resumed_states[-1].model, off_states[-1].model)


def test_main_refusing_bad_input_leaves_no_run_directory(tiny_cfg, capsys, tmp_path):
    """Issue 14, item 6: an error found after the config loads (here a stream file that does not exist) names the
    culprit and leaves nothing under output_dir that looks like a run (no config.json)."""
    cfg = tiny_cfg(**{"stream.file": str(tmp_path / "missing_stream.json")})
    overrides = [f"{k}={v}" for k, v in cfg.flat().items() if not isinstance(v, tuple)]
    assert main(overrides) == 2
    assert "missing_stream.json" in capsys.readouterr().err
    assert not (tmp_path / "runs" / run_name(cfg)).exists()


# --------------------------------------------------------------------------------------------------- one eval set
def test_eval_plan_puts_every_point_on_the_subsets_and_the_full_sets_where_asked(tiny_cfg):
    from fomo_ray.core.assembly import eval_plan

    assert eval_plan(4, tiny_cfg(**{"evaluation.full_at_ends": True})) == {0: True, 1: False, 2: False, 3: False,
                                                                          4: True}
    assert eval_plan(4, tiny_cfg(**{"evaluation.every_n_tasks": 2, "evaluation.full_every_n_tasks": 2})) == {
        0: True, 2: True, 4: True}
    assert eval_plan(3, tiny_cfg()) == {0: False, 1: False, 2: False, 3: False}


def test_an_unchanged_model_has_an_exactly_flat_trajectory_and_no_forgetting(tiny_cfg, tmp_path, capsys):
    """Issue 17, item 1: every point on the same fixed subsets (the retrieval gallery too); the full test sets at the
    ends under their own eval_set, never mixed into the trajectory or the scores."""
    from fomo_ray.models.metrics import forgetting, summarize

    cfg = tiny_cfg(**{"method.name": "zero_shot", "stream.num_tasks": 3, "evaluation.full_at_ends": True})
    df = run_stream(cfg)
    assert set(df["eval_set"]) == {"subset", "full"}
    sub = df[df["eval_set"] == "subset"]
    assert sorted(sub["point"].unique()) == [0, 1, 2, 3]
    per_point = sub.pivot_table(index=["dataset", "metric"], columns="point", values="value")
    assert (per_point.nunique(axis=1) == 1).all(), per_point  # identical at every point, every dataset and metric
    assert sorted(df.loc[df["eval_set"] == "full", "point"].unique()) == [0, 3]
    traj = summarize(df)
    assert traj[["A_KA", "A_ZS", "GM"]].nunique().eq(1).all()
    assert summarize(df, "full")["point"].tolist() == [0, 3]
    f = forgetting(df)
    assert f["forgetting"].eq(0.0).all() and f["backward_transfer"].dropna().eq(0.0).all()
    from fomo_ray.cli.score import main as score
    from fomo_ray.models.metrics import save_results

    assert score([str(save_results(df, tmp_path / "zs.csv"))]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in set(df["dataset"])]
    assert len(rows) == df["dataset"].nunique() and all(r[5] == "0.00" for r in rows), out  # the forget column


def test_the_tidy_table_names_the_zero_shot_prompts(tiny_cfg):
    """evaluation.prompts reaches the tidy table: top-1 rows name the class texts, retrieval rows the captions."""
    df = run_stream(tiny_cfg(**{"evaluation.prompts": "simple_imagenet"}))
    assert set(df.loc[df["metric"] == "top1", "prompts"]) == {"simple_imagenet"}
    assert set(df.loc[df["metric"].str.startswith("R@"), "prompts"]) == {"captions"}
    assert set(run_stream(tiny_cfg()).loc[lambda d: d["metric"] == "top1", "prompts"]) == {"primer"}


def test_a_preemption_notice_makes_the_loop_checkpoint_mid_task(tiny_cfg):
    """``RunHooks.checkpoint_now`` is asked at each finiteness read; a True answer becomes a mid-task checkpoint
    (no scheduled one here: ``ray.checkpoint_every_steps`` = 0), so a preempted run resumes from there."""
    cfg = tiny_cfg(**{"ray.checkpoint_every_steps": 0, "tracking.log_every_n_steps": 2, "budget.total_ft_steps": 12})
    asked, states = [], []

    def checkpoint_now():
        asked.append(1)
        return len(asked) == 2  # the notice arrives before the second read

    run_stream(cfg, hooks=RunHooks(on_checkpoint=states.append, checkpoint_now=checkpoint_now))
    assert [(s.task, s.step) for s in states] == [(0, 4), (1, 0), (2, 0)]
    assert states[0].optimizer is not None  # mid-task: AdamW continues after the resume
