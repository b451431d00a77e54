"""Data-parallel continual loop: 2 real gloo ranks (spawned processes, CPU) against one process on the same global
batch — real FiF-mini files, a real tiny open_clip model, real DDP and a differentiable all-gather.

What must hold (fomo_ray/core/distributed.py): the gradient of the sharded, gathered global CLIP loss averaged by DDP is
the single-process gradient (equal up to float summation order, not bitwise), also for a world size that does not
divide the batch (W = 3, shards 3/3/2); weights and method state stay bitwise identical across ranks; evaluation and
EWC's Fisher pass are shared out (each rank encodes part of the images, and its shard of every Fisher batch) and
still give the one-process results; a mid-task resume under DDP is bitwise exact and may even change the world size;
every hook fires on every rank; early stopping is agreed; a world size larger than the batch is refused naming the
key; every registered method trains only parameters its forward uses (DDP runs with find_unused_parameters=False).
"""
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fomo_ray.core import checkpoint, distributed
from fomo_ray.config import ConfigError, load_config
from fomo_ray.core.loop import RunHooks, run_stream
from fomo_ray.methods import REGISTRY, build_method
from fomo_ray.methods.finetune import FineTune

from _data_util import small_fifmini, tiny_config

WORLD = 2
BATCH = 8  # global batch: 4 rows per rank


class GradSpy(FineTune):
    """Test double: fine-tuning that keeps theta_0 and a copy of every gradient the optimizer used (after DDP's
    averaging and the clip)."""

    name = "grad_spy"
    grads: list[dict[str, torch.Tensor]] = []
    theta0: dict[str, torch.Tensor] = {}

    def setup(self, model):
        model = super().setup(model)
        GradSpy.theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    def after_step(self, model, t, step, lr):
        GradSpy.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _cfg(root, tmp, **overrides):
    """The tiny run (random init, identical on every rank: seeded; 2 tasks x 2 steps) at the ranks' global batch."""
    return tiny_config(root, tmp, **{
        "mixture.batch_size": BATCH,
        "evaluation.batch_size": 16,  # several evaluation batches, so that ranks can share them
        "method.reg.ewc_fisher_batches": 2, **overrides})


class WorkCounter:
    """Counts what this process encodes for evaluation (images) and for EWC's Fisher pass (rows of the Fisher batches'
    losses, and the largest such batch), by wrapping the functions through which that work goes."""

    def __init__(self, monkeypatch_like):
        from fomo_ray.core import batch_step
        from fomo_ray.models import evaluation

        self.images = self.fisher = self.largest = 0
        self._in_fisher = False
        real_input, real_loss, real_sum = evaluation.model_input, batch_step.batch_loss, batch_step.TaskLosses.sum_over

        def counting_input(images, *a, **k):
            self.images += images.shape[0]
            return real_input(images, *a, **k)

        def counting_loss(run, batch, encoder=None):
            if self._in_fisher:
                self.fisher += batch["images"].shape[0]
                self.largest = max(self.largest, batch["images"].shape[0])
            return real_loss(run, batch, encoder)

        def counting_sum(losses, n, per_batch):
            self._in_fisher = True
            try:
                return real_sum(losses, n, per_batch)
            finally:
                self._in_fisher = False

        monkeypatch_like(evaluation, "model_input", counting_input)
        monkeypatch_like(batch_step, "batch_loss", counting_loss)
        monkeypatch_like(batch_step.TaskLosses, "sum_over", counting_sum)


def _observed_run(cfg, should_stop=None, resume=None, counter=None):
    """run_stream with every hook recording; returns what the comparison needs (plain CPU objects)."""
    seen = {"losses": [], "evals": [], "states": []}
    GradSpy.grads = []
    if counter is not None:
        counter.images = counter.fisher = counter.largest = 0
    hooks = RunHooks(on_step=lambda t, s, loss, lr, *_: seen["losses"].append(loss),
                     on_eval=lambda p, recs: seen["evals"].append((p, distributed.is_rank_zero())),
                     on_checkpoint=seen["states"].append, should_stop=should_stop)
    df = run_stream(cfg, hooks=hooks, resume=resume, device="cpu")
    return {"results": df, "losses": seen["losses"], "evals": seen["evals"],
            "mid_task_state": next((s for s in seen["states"] if (s.task, s.step) == (1, 1)), None),
            "final_model": getattr(seen["states"][-1], "model", None) if seen["states"] else None,
            "final_method": getattr(seen["states"][-1], "method", None) if seen["states"] else None, "grads": list(GradSpy.grads),
            "theta0": dict(GradSpy.theta0), "all_states": seen["states"],
            "work": (counter.images, counter.fisher, counter.largest) if counter is not None else None}


def _rank_main(rank, world, root, tmp, init_file, out_dir):
    """One spawned rank: the scenarios of this file in one process group; results pickled to out_dir. W = 2 runs
    all of them; W = 3 (a world size that does not divide the batch) the training and the shared work."""
    torch.set_num_threads(1)
    REGISTRY["grad_spy"] = GradSpy
    counter = WorkCounter(setattr)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # the comparisons below read every rank's states; a real run snapshots on rank 0 only (the "stop" scenario)
    rank_zero_only = checkpoint.snapshots_here
    checkpoint.snapshots_here = lambda: True
    try:
        out = {"rank": rank, "world": distributed.world()}
        spy = _cfg(root, tmp, **{"method.name": "grad_spy", "ray.checkpoint_every_steps": 1})
        out["finetune"] = _observed_run(spy, counter=counter)
        out["ewc"] = _observed_run(_cfg(root, tmp, **{"method.name": "ewc"}), counter=counter)
        if world == WORLD:
            # a worker restarted mid-task (as by Ray's FailureConfig) continues from the same state on every rank
            out["resumed"] = _observed_run(spy, resume=out["finetune"]["mid_task_state"])
            # only rank 1 asks to stop, after its first step: both ranks must leave together; with the real
            # snapshot rule, rank 1 holds no state (a marker with the same cursor)
            checkpoint.snapshots_here = rank_zero_only
            out["stop"] = _observed_run(_cfg(root, tmp), should_stop=lambda: rank == 1)
            out["stop"]["state_kinds"] = [(type(s).__name__, s.task, s.step) for s in out["stop"].pop("all_states")]
            try:
                run_stream(_cfg(root, tmp, **{"mixture.batch_size": 1}), device="cpu")
                out["tiny_batch_error"] = None
            except ConfigError as e:
                out["tiny_batch_error"] = str(e)
        torch.save(out, os.path.join(out_dir, f"w{world}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp, root, world):
    mp.spawn(_rank_main, args=(world, str(root), str(tmp), str(tmp / f"pg_init{world}"), str(tmp)), nprocs=world,
             join=True)
    return [torch.load(tmp / f"w{world}_rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """(per-rank outputs of 2 gloo ranks, single-process outputs on the same configs, per-rank outputs of 3)."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = small_fifmini(tmp_path_factory).root  # the session's 5% build, read only
    ranks = _spawn(tmp, root, WORLD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same kernels, so differences come from the sharding alone
    mp_ = pytest.MonkeyPatch()
    try:
        REGISTRY["grad_spy"] = GradSpy
        counter = WorkCounter(mp_.setattr)
        spy = _cfg(root, str(tmp), **{"method.name": "grad_spy", "ray.checkpoint_every_steps": 1})
        single = {"finetune": _observed_run(spy, counter=counter),
                  "ewc": _observed_run(_cfg(root, str(tmp), **{"method.name": "ewc"}), counter=counter),
                  # the 2-rank run's mid-task checkpoint continued on one process (another world size)
                  "from_ddp_state": _observed_run(spy, resume=ranks[0]["finetune"]["mid_task_state"])}
    finally:
        mp_.undo()
        REGISTRY.pop("grad_spy", None)
        torch.set_num_threads(threads)
    return ranks, single, _spawn(tmp, root, 3)


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest difference of any tensor, relative to that tensor's largest entry in ``b``."""
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def _max_abs_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
def test_ranks_see_their_rank_and_every_hook_fires_on_every_rank(ddp_runs):
    ranks, single, _ = ddp_runs
    assert [r["world"] for r in ranks] == [(0, WORLD), (1, WORLD)]
    for r in ranks:
        rank_zero = r["rank"] == 0
        assert r["finetune"]["evals"] == [(0, rank_zero), (1, rank_zero), (2, rank_zero)]
        assert len(r["finetune"]["losses"]) == len(single["finetune"]["losses"]) == 4


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
def test_global_batch_gradient_equals_the_single_process_gradient(ddp_runs):
    ranks, single, _ = ddp_runs
    want = single["finetune"]["grads"]
    assert len(want) == 4 and all(len(r["finetune"]["grads"]) == 4 for r in ranks)
    # step 0 starts from identical weights theta_0: the averaged DDP gradient must be the global-batch gradient.
    # (a per-rank local loss would use 3 negatives instead of 7 and miss this by far more than the tolerance)
    assert _max_rel_diff(ranks[0]["finetune"]["grads"][0], want[0]) < 1e-5
    for step in range(4):  # the all-reduce leaves every rank with bitwise the same gradient
        for n, g in ranks[0]["finetune"]["grads"][step].items():
            assert torch.equal(g, ranks[1]["finetune"]["grads"][step][n]), (step, n)
    np.testing.assert_allclose(ranks[0]["finetune"]["losses"], single["finetune"]["losses"], rtol=1e-5)
    # the tolerance below is not vacuous: training moved the weights far more than DDP and one process differ
    moved = _max_abs_diff(single["finetune"]["final_model"], single["finetune"]["theta0"])
    assert moved > 100 * _max_abs_diff(ranks[0]["finetune"]["final_model"], single["finetune"]["final_model"])
    assert _max_abs_diff(ranks[0]["finetune"]["theta0"], single["finetune"]["theta0"]) == 0  # same theta_0


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
@pytest.mark.parametrize("method", ["finetune", "ewc"])
def test_weights_replicated_and_equal_to_single_process(ddp_runs, method):
    ranks, single, _ = ddp_runs
    a, b = ranks[0][method], ranks[1][method]
    for k in a["final_model"]:
        assert torch.equal(a["final_model"][k], b["final_model"][k]), f"rank weights differ at {k}"
    # EWC's Fisher and anchor: every rank gets the same averaged gradient of every sharded Fisher batch, replicated
    flat_a, flat_b = _tensors(a["final_method"]), _tensors(b["final_method"])
    assert len(flat_a) == len(flat_b) and (len(flat_a) > 0) == (method == "ewc")
    assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))
    # against one process: the same up to floating-point summation order over 4 AdamW steps (measured ~2.5e-7;
    # AdamW moves a weight by up to ~lr = 1e-4 per step, so 2e-6 is ~1% of one step)
    assert _max_abs_diff(a["final_model"], single[method]["final_model"]) < 2e-6
    pd.testing.assert_frame_equal(a["results"], b["results"], check_exact=True)
    pd.testing.assert_frame_equal(a["results"], single[method]["results"], check_exact=False, atol=1e-6, rtol=0)
    assert a["results"]["value"].map(math.isfinite).all()


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
def test_mid_task_resume_under_ddp_is_exact_and_may_change_the_world_size(ddp_runs):
    ranks, single, _ = ddp_runs
    for r in ranks:
        full, resumed = r["finetune"], r["resumed"]
        assert full["mid_task_state"] is not None and len(resumed["losses"]) == 1  # only task 1, step 1 was left
        pd.testing.assert_frame_equal(resumed["results"], full["results"], check_exact=True)
        for k in full["final_model"]:
            assert torch.equal(resumed["final_model"][k], full["final_model"][k]), f"resume differs at {k}"
    # the global batches do not depend on the world size: one process continues the 2-rank run's state
    moved = single["from_ddp_state"]
    assert _max_abs_diff(moved["final_model"], ranks[0]["finetune"]["final_model"]) < 2e-6
    pd.testing.assert_frame_equal(moved["results"], ranks[0]["finetune"]["results"], check_exact=False, atol=1e-6,
                                  rtol=0)


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
def test_early_stop_on_one_rank_stops_all_ranks_at_the_same_step(ddp_runs):
    """The stop is agreed at the task boundary (no collective per step): both ranks finish task 0 and leave."""
    ranks, _, _ = ddp_runs
    assert [len(r["stop"]["losses"]) for r in ranks] == [2, 2]
    assert [sorted(r["stop"]["results"]["point"].unique()) for r in ranks] == [[0, 1], [0, 1]]


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
def test_only_rank_zero_holds_a_snapshot(ddp_runs):
    ranks, _, _ = ddp_runs
    assert ranks[0]["stop"]["state_kinds"] == [("LoopState", 1, 0)]
    assert ranks[1]["stop"]["state_kinds"] == [("CheckpointMarker", 1, 0)]


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
def test_a_world_size_larger_than_the_batch_is_refused(ddp_runs):
    ranks, _, _ = ddp_runs
    for r in ranks:
        assert r["tiny_batch_error"] is not None
        assert "'mixture.batch_size' = 1" in r["tiny_batch_error"] and "world size 2" in r["tiny_batch_error"]


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
@pytest.mark.parametrize("method", ["finetune", "ewc"])
def test_three_ranks_on_a_batch_of_eight_train_like_one_process(ddp_runs, method):
    """W = 3 does not divide b = 8 (shards 3, 3, 2): padded gathers, the same global loss, the same training."""
    _, single, three = ddp_runs
    assert [r["world"] for r in three] == [(0, 3), (1, 3), (2, 3)]
    for r in three[1:]:
        for k, v in three[0][method]["final_model"].items():
            assert torch.equal(r[method]["final_model"][k], v), f"rank weights differ at {k}"
    np.testing.assert_allclose(three[0][method]["losses"], single[method]["losses"], rtol=1e-5)
    assert _max_abs_diff(three[0][method]["final_model"], single[method]["final_model"]) < 2e-6
    pd.testing.assert_frame_equal(three[0][method]["results"], single[method]["results"], check_exact=False,
                                  atol=1e-6, rtol=0)
    if method == "finetune":
        assert _max_rel_diff(three[0]["finetune"]["grads"][0], single["finetune"]["grads"][0]) < 1e-5


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
@pytest.mark.parametrize("world", [2, 3])
def test_the_sharded_fisher_equals_one_processes(ddp_runs, world):
    """Issue 27: EWC's Fisher from sharded batches (each rank its shard, features gathered, gradients averaged before
    squaring) is the one-process Fisher of the whole batches, up to summation order."""
    two, single, three = ddp_runs
    want = _tensors(single["ewc"]["final_method"]["fisher"])
    got = _tensors((two if world == 2 else three)[0]["ewc"]["final_method"]["fisher"])
    assert len(got) == len(want) > 0
    scale = max(float(w.abs().max()) for w in want)
    assert max(float((g - w).abs().max()) for g, w in zip(got, want)) < 1e-5 * scale


@pytest.mark.slow  # ddp_runs: 5 spawned gloo ranks + 3 single runs, ~100 s on a busy 2-core box
@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_and_the_fisher_pass_are_shared_out_not_repeated(ddp_runs, world):
    """Each rank encodes only its share of the evaluation images and only its shard of every EWC Fisher batch (issue
    27: no pass larger than a rank's shard); together exactly the one-process work."""
    two, single, three = ddp_runs
    ranks = two if world == 2 else three
    images, fisher, largest = single["ewc"]["work"]
    assert images > 0 and fisher == 2 * 2 * BATCH and largest == BATCH  # 2 Fisher batches after each of 2 tasks
    per_rank = [r["ewc"]["work"] for r in ranks]
    assert sum(i for i, _, _ in per_rank) == images and max(i for i, _, _ in per_rank) < images
    shards = distributed.shard_sizes(BATCH, world)
    assert [f for _, f, _ in per_rank] == [2 * 2 * n for n in shards]  # every batch, this rank's rows of it
    assert [m for _, _, m in per_rank] == shards


def test_batch_size_check_shards_and_one_process_helpers():
    distributed.check_batch_size(6, 4)  # any world size up to b: near-equal shards
    with pytest.raises(ConfigError, match="'mixture.batch_size' = 3 is smaller than the world size 4"):
        distributed.check_batch_size(3, 4)
    assert distributed.shard_sizes(8, 3) == [2, 3, 3] and distributed.shard_sizes(512, 5) == [102, 102, 103, 102, 103]
    assert list(distributed.share(5, 1, 2)) == [1, 3] and list(distributed.share(1, 2, 3)) == []
    x = torch.arange(6.0).view(3, 2)
    assert distributed.gather_batch(x, [3]) is x and distributed.gather_rows(x, "cpu") is x
    assert distributed.world() == (0, 1) and distributed.data_parallel(torch.nn.Linear(2, 2), "cpu") is None
    # refused when the config loads, before any worker starts
    with pytest.raises(ConfigError, match="'ray.num_workers' = 9 is larger than 'mixture.batch_size' = 8"):
        load_config(None, {"ray.num_workers": 9, "mixture.batch_size": 8})
    with pytest.raises(ConfigError, match="'ray.min_workers' = 3 must lie in \\[0, 'ray.num_workers' = 2\\]"):
        load_config(None, {"ray.num_workers": 2, "ray.min_workers": 3})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_trains_only_parameters_its_forward_uses(name):
    """DDP runs with find_unused_parameters=False: after ``setup`` every trainable parameter of every registered
    method must get a gradient from the CLIP loss of one batch through ``PairEncoder`` (what DDP wraps)."""
    from fomo_ray.models.backbones import create_backbone
    from fomo_ray.maths.losses import clip_loss

    torch.manual_seed(0)
    backbone = create_backbone("fomo-tiny-s", pretrained="")
    method = build_method(load_config(None, {"method.name": name}))
    model = method.setup(backbone.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:  # nothing to synchronise: data_parallel builds no DDP, and such a method must never step
        assert all(task.steps == 0 for task in method.task_plan([np.arange(3)], 5))
        return
    images = torch.randn(4, 3, backbone.image_size, backbone.image_size)
    tokens = backbone.tokenizer([f"a photo of the number {i}" for i in range(4)])
    image_features, text_features, scale = distributed.PairEncoder(model)(images, tokens)
    clip_loss(image_features, text_features, scale).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [], f"method '{name}' trains parameters its forward never uses: {unused[:5]}"
