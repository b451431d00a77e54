"""Data-parallel training of other tower families: a SigLIP-style model (sigmoid loss, ``logit_bias``) on 2 real
gloo ranks against one process, and BatchNorm towers (refused on CPU ranks; SyncBatchNorm on CUDA).

Reuses tests/test_ddp.py's config, observation and comparison helpers; the test-only architectures come from
``tests/model_configs`` (``tests/_test_archs.py``) and are registered in every spawned rank.
"""
import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _data_util import small_fifmini
from _test_archs import register, registered
from fomo_ray.core import checkpoint, distributed
from fomo_ray.core.distributed import BatchNormError, batchnorm_layers, needs_sync_batchnorm, sync_batchnorm
from fomo_ray.core.loop import run_stream
from fomo_ray.methods import REGISTRY
from test_ddp import GradSpy, _cfg, _max_abs_diff, _max_rel_diff, _observed_run

WORLD = 2


def _sigmoid_cfg(root, tmp):
    """Fine-tuning of the SigLIP-layout model: one task of 2 steps on a global batch of 8 (4 rows per rank).
    Evaluation batches of 2, so that every rank encodes some of every dataset's prompts (a rank without any reads
    ``model.visual.output_dim``, which open_clip's TimmModel lacks: fomo_ray/models/evaluation.py ``_mine``)."""
    return _cfg(root, tmp, **{"backbone.name": "fomo-test-sigmoid", "method.name": "grad_spy", "stream.num_tasks": 1,
                              "budget.total_ft_steps": 2, "evaluation.batch_size": 2})


def _rank_local_scenario(rank):
    """A SyncBatchNorm layer on CPU under a 2-rank group: torch refuses its synchronised forward; inside
    ``distributed.rank_local`` it normalises with this rank's own batch and keeps its running statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    plain = copy.deepcopy(net)
    sync_batchnorm(net)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    try:
        net(x)
        cpu_error = None
    except ValueError as e:
        cpu_error = str(e)
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    with distributed.rank_local(net):
        y = net(x)
    return {"cpu_error": cpu_error, "same_as_plain_bn": bool(torch.allclose(y, plain(x), atol=1e-6)),
            "stats_kept": all(torch.equal(net[1].state_dict()[k], v) for k, v in before.items()),
            "forward_restored": "forward" not in vars(net[1])}


def _rank_main(rank, world, root, tmp, init_file, out_dir):
    torch.set_num_threads(1)
    register()  # the test-only architectures, in this spawned process too
    REGISTRY["grad_spy"] = GradSpy
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # the comparison reads every rank's final weights; a real run snapshots on rank 0 only
    checkpoint.snapshots_here = lambda: True
    try:
        out = {"rank": rank, "sigmoid": _observed_run(_sigmoid_cfg(root, tmp))}
        try:
            run_stream(_cfg(root, tmp, **{"backbone.name": "fomo-test-rn"}), device="cpu")
            out["bn_error"] = None
        except BatchNormError as e:
            out["bn_error"] = str(e)
        out["rank_local"] = _rank_local_scenario(rank)
        torch.save(out, os.path.join(out_dir, f"fam_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """(per-rank outputs of 2 gloo ranks, the one-process run of the same SigLIP-layout config)."""
    tmp = tmp_path_factory.mktemp("ddp_families")
    root = small_fifmini(tmp_path_factory).root
    mp.spawn(_rank_main, args=(WORLD, str(root), str(tmp), str(tmp / "pg_init"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"fam_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same kernels, so differences come from the sharding alone
    try:
        with registered():
            REGISTRY["grad_spy"] = GradSpy
            single = _observed_run(_sigmoid_cfg(root, str(tmp)))
    finally:
        REGISTRY.pop("grad_spy", None)
        torch.set_num_threads(threads)
    return ranks, single


@pytest.mark.slow  # family_runs: 2 spawned gloo ranks + a single run, ~45 s on a busy 2-core box
def test_a_sigmoid_loss_model_trains_data_parallel_like_one_process(family_runs):
    """DDP (find_unused_parameters=False) sees the logit_bias used (it failed at its second step when the model
    trained with InfoNCE); the gathered global sigmoid loss gives the one-process gradient, bias included."""
    ranks, single = family_runs
    want = single["grads"]
    assert len(want) == 2 and all(len(r["sigmoid"]["grads"]) == 2 for r in ranks)
    assert float(want[0]["logit_bias"].abs()) > 0
    assert _max_rel_diff(ranks[0]["sigmoid"]["grads"][0], want[0]) < 1e-5
    for step in range(2):
        for n, g in ranks[0]["sigmoid"]["grads"][step].items():
            assert torch.equal(g, ranks[1]["sigmoid"]["grads"][step][n]), (step, n)
    np.testing.assert_allclose(ranks[0]["sigmoid"]["losses"], single["losses"], rtol=1e-5)
    moved = _max_abs_diff(single["final_model"], single["theta0"])
    assert moved > 100 * _max_abs_diff(ranks[0]["sigmoid"]["final_model"], single["final_model"])
    for k, v in ranks[0]["sigmoid"]["final_model"].items():
        assert torch.equal(v, ranks[1]["sigmoid"]["final_model"][k]), f"rank weights differ at {k}"


@pytest.mark.slow  # family_runs: 2 spawned gloo ranks + a single run, ~45 s on a busy 2-core box
def test_batchnorm_model_is_refused_on_cpu_ranks(family_runs):
    ranks, _ = family_runs
    for r in ranks:
        msg = r["bn_error"]
        assert msg is not None and "\n" not in msg
        assert "BatchNorm layers (visual.bn1, visual.bn2, visual.bn3, visual.layer1.0.bn1, ...)" in msg
        assert "on 2 data-parallel ranks" in msg and "'ray.num_workers' = 1" in msg and "GPU" in msg


@pytest.mark.slow  # family_runs: 2 spawned gloo ranks + a single run, ~45 s on a busy 2-core box
def test_rank_local_passes_skip_the_batchnorm_sync(family_runs):
    ranks, _ = family_runs
    for r in ranks:
        s = r["rank_local"]
        assert s["cpu_error"] is not None and "GPU" in s["cpu_error"]  # what a synchronised CPU forward does
        assert s["same_as_plain_bn"] and s["stats_kept"] and s["forward_restored"]


def test_the_batchnorm_decision_by_world_size_and_device():
    layers = [f"visual.layer{i}.bn" for i in range(6)]
    assert needs_sync_batchnorm(layers, 1, "cpu") is False  # one process: plain BatchNorm is right
    assert needs_sync_batchnorm([], 4, "cpu") is False  # no BatchNorm: nothing to do
    assert needs_sync_batchnorm(layers, 2, "cuda:0") is True
    with pytest.raises(BatchNormError, match=r"has 6 BatchNorm layers \(visual\.layer0\.bn, visual\.layer1\.bn, "
                                             r"visual\.layer2\.bn, visual\.layer3\.bn, \.\.\.\): on 3 data-parallel"):
        needs_sync_batchnorm(layers, 3, "cpu")
    assert issubclass(BatchNormError, ValueError)


def test_sync_batchnorm_conversion_keeps_keys_parameters_and_outputs():
    with registered():
        torch.manual_seed(0)
        from fomo_ray.models.backbones import create_backbone

        model = create_backbone("fomo-test-rn", "").model.eval()
    names = batchnorm_layers(model)
    keys = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = model.encode_image(images)
    assert sync_batchnorm(model) == len(names) > 0
    assert all(type(model.get_submodule(n)) is nn.SyncBatchNorm for n in names) and batchnorm_layers(model) == names
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(keys) and all(after[k] is v for k, v in keys.items())  # same tensors, same keys
    torch.testing.assert_close(model.encode_image(images), before)  # eval mode: running statistics, no sync
    assert sync_batchnorm(model) == 0  # idempotent
    with pytest.raises(ValueError, match="not a bare BatchNorm"):
        sync_batchnorm(nn.BatchNorm1d(3))


def _gpu_rank(rank, world, init_file, out_dir):
    """One rank of the CUDA check: both ranks on cuda:0 over gloo (SyncBatchNorm supports gloo with CUDA tensors;
    NCCL refuses two ranks on one GPU). One DDP training forward/backward of a BatchNorm model on this rank's shard."""
    register()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from fomo_ray.models.backbones import create_backbone

        torch.manual_seed(0)
        model = create_backbone("fomo-test-rn", "", device="cuda:0", precision="fp32").model.train()
        ddp = distributed.data_parallel(model, "cuda:0")
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()
        lo, hi = rank * 4, (rank + 1) * 4
        image_features, text_features, scale = ddp(images[lo:hi], torch.ones(4, 32, dtype=torch.long, device="cuda:0"))
        # every parameter takes part (DDP runs with find_unused_parameters=False)
        (image_features.sum() + text_features.sum() + scale).backward()
        stats = {n: b.detach().cpu() for n, b in model.state_dict().items() if "running_" in n}
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in batchnorm_layers(model)})
        torch.save({"stats": stats, "kinds": kinds}, os.path.join(out_dir, f"gpu_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_batchnorm_under_cuda_ddp_uses_global_batch_statistics(tmp_path):
    """Two CUDA ranks: the BatchNorm layers are synchronised, so every rank holds the running statistics one
    process gets from the whole global batch."""
    mp.spawn(_gpu_rank, args=(WORLD, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"gpu_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["kinds"] == ["SyncBatchNorm"]
    with registered():
        from fomo_ray.models.backbones import create_backbone

        torch.manual_seed(0)
        model = create_backbone("fomo-test-rn", "", device="cuda:0", precision="fp32").model.train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()
    model.encode_image(images)  # one process, the whole global batch
    want = {n: b.detach().cpu() for n, b in model.state_dict().items() if "running_" in n}
    for n, v in want.items():
        torch.testing.assert_close(ranks[0]["stats"][n], ranks[1]["stats"][n], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["stats"][n], v, rtol=1e-3, atol=1e-4)  # TF32 convs, other batch sizes
