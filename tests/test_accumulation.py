"""Gradient checkpointing and gradient accumulation (fomo_ray/maths/memory_saving.py, batch_step.forward_backward): both
change memory and compute, never the step.

What must hold: accumulating k micro-batches against the cached features of the rest of the global batch gives the
one-batch CLIP-loss gradient and loss — in float64 to 1e-12 (the scheme is exact), in fp32 on the CPU the loss within
1e-6 and the gradient within fp32 rounding (relative to its norm 2e-6; measured 6e-8 to 1.2e-6, while the one-batch
fp32 gradient is itself 1.3e-6 from float64: its largest entries, ~1.6, are sums over every token) — for InfoNCE and
the sigmoid loss, with a method's
extra loss, through a loss scaler, and under 2-rank DDP (also with shards and micro-batches of unequal size);
open_clip's gradient checkpointing gives the same gradients (also with peft's adapters in the swapped linear
attention, which it recomputes); a continual run with accum_steps = 2 gives the results table of accum_steps = 1;
the budget's formula (``step_cost``) matches what ``FlopCounterMode`` counts; bad settings are refused naming the key.
"""
import copy
import dataclasses
import functools
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from _data_util import small_fifmini, tiny_config
from _test_archs import registered
from fomo_ray.core import distributed
from fomo_ray.models.backbones import create_backbone
from fomo_ray.config import ConfigError, load_config
from fomo_ray.data.mixture import shard_bounds
from fomo_ray.core.loop import batch_loss, forward_backward
from fomo_ray.maths.memory_saving import (block_ledger, check_accumulation, checkpointed_blocks,
                                          enable_grad_checkpointing, micro_sizes, micro_spans, splice, step_cost)

TOL = 1e-6      # the loss, fp32
GRAD_TOL = 2e-6  # the gradient relative to its norm, fp32 (rounding; see the module docstring)


# --------------------------------------------------------------------------------------------------- helpers
def _run(arch="fomo-tiny-s", accum=1, batch=8, method=None, checkpointing=False, double=False):
    """A minimal stand-in for ``assembly.Run`` (what ``forward_backward`` reads), random weights seeded (float64
    weights with ``double``: patch ``batch_step.model_input`` with :func:`_float64_input` too)."""
    base = _base(arch)
    bb = dataclasses.replace(base, model=copy.deepcopy(base.model))
    if checkpointing:
        enable_grad_checkpointing(bb.model)
    model = bb.model
    if method is not None:
        from fomo_ray.methods import build_method

        torch.manual_seed(1)  # adapter init
        model = build_method(load_config(None, {"method.name": method})).setup(model)
    if double:
        model.double()
    cfg = load_config(None, {"optimizer.accum_steps": accum, "mixture.batch_size": batch})
    return SimpleNamespace(cfg=cfg, model=model, backbone=bb, device=torch.device("cpu"))


def _batch(bb, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, bb.image_size, bb.image_size, 3), dtype=torch.uint8, generator=g)
    texts = [f"a photo of the number {i} in colour {i % 3}" for i in range(n)]
    return {"images": images, "tokens": bb.tokenizer(texts)}


@functools.lru_cache(maxsize=None)
def _base(arch):
    """One seeded random-init backbone per architecture and process (building one takes seconds: copies are used)."""
    torch.manual_seed(0)
    return create_backbone(arch, pretrained="")


def _float64_input(model_input):
    return lambda *args, **kwargs: model_input(*args, **kwargs).double()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(run, batch, encoder=None, extra_fn=None, scaler=None):
    """One forward_backward from zeroed gradients: (loss, gradients)."""
    run.model.zero_grad(set_to_none=True)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    extra = extra_fn(run.model) if extra_fn is not None else None
    loss = forward_backward(run, batch, encoder, scaler, extra)
    return float(loss), _grads(run.model)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rel_err(a, b):
    """``||a - b|| / ||b||`` over all parameters' gradients together."""
    assert a.keys() == b.keys()
    diff = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a)
    return (diff / sum(float((b[k].double() ** 2).sum()) for k in b)) ** 0.5


# --------------------------------------------------------------------------------------------------- pure parts
def test_micro_batches_split_a_shard_and_splice_keeps_the_global_row_order():
    assert micro_sizes(8, 1) == [8] and micro_sizes(8, 3) == [2, 3, 3] and micro_sizes(3, 3) == [1, 1, 1]
    with pytest.raises(ConfigError, match="'optimizer.accum_steps' = 4 is larger than this rank's shard of 3"):
        micro_sizes(3, 4)
    # shards 3 and 4 of a global batch of 7, two micro-batches each: [1, 2] and [2, 2]
    assert micro_spans([3, 4], 2, 0) == [(0, 1), (3, 5)] and micro_spans([3, 4], 2, 1) == [(1, 3), (5, 7)]
    cached = torch.arange(7.0).view(7, 1)
    live = (-torch.arange(1.0, 5.0)).view(4, 1).requires_grad_()
    out = splice(cached, live, [(1, 3), (5, 7)])
    assert out.flatten().tolist() == [0, -1, -2, 3, 4, -3, -4]
    out.sum().backward()
    assert live.grad.flatten().tolist() == [1, 1, 1, 1]


def test_bad_accumulation_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="'optimizer.accum_steps' is out of range: 0"):
        load_config(None, {"optimizer.accum_steps": 0})
    with pytest.raises(ConfigError, match="'optimizer.accum_steps' = 5 times 'ray.num_workers' = 2 is larger than "
                                          "'mixture.batch_size' = 8"):
        load_config(None, {"optimizer.accum_steps": 5, "ray.num_workers": 2, "mixture.batch_size": 8})
    load_config(None, {"optimizer.accum_steps": 4, "ray.num_workers": 2, "mixture.batch_size": 8})
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_accumulation(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), 2)
    check_accumulation(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), 1)
    with pytest.raises(ConfigError, match="'backbone.grad_checkpointing'"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("k", [2, 3, 8])
def test_accumulation_gives_the_one_batch_loss_and_gradient(k):
    one, many = _run(accum=1), _run(accum=k)
    batch = _batch(one.backbone)
    loss1, g1 = _step(one, batch)
    loss_k, g_k = _step(many, batch)
    assert abs(loss_k - loss1) < TOL and len(g1) == len(g_k) == len(list(one.model.parameters()))
    assert _rel_err(g_k, g1) < GRAD_TOL and _max_diff(g_k, g1) < 5e-6  # measured: <= 1.2e-6 and <= 1.9e-6
    assert float(g1["logit_scale"].abs()) > 1e-3  # taken once, not k times (open_clip's accum_freq takes it k times)


def test_accumulation_is_exact_in_float64(monkeypatch):
    """In float64 the accumulated gradient is the one-batch gradient to 1e-12: the fp32 differences are rounding."""
    from fomo_ray.core import batch_step

    monkeypatch.setattr(batch_step, "model_input", _float64_input(batch_step.model_input))
    one, many = _run(accum=1, double=True), _run(accum=3, double=True)
    batch = _batch(one.backbone)
    (loss1, g1), (loss3, g3) = _step(one, batch), _step(many, batch)
    assert abs(loss1 - loss3) < 1e-12 and _max_diff(g3, g1) < 1e-12


def test_accumulation_with_the_sigmoid_loss_an_extra_loss_and_a_loss_scaler():
    """SigLIP's sigmoid loss (logit_bias), a method-style penalty added once per step, and a GradScaler that really
    scales (2**10) and unscales: the same gradient as one batch."""
    def penalty(model):  # like EWC/SI: a quadratic term on the weights
        return sum((p ** 2).sum() for p in model.parameters() if p.ndim == 2) * 1e-3

    with registered():
        out = []
        for k in (1, 2):
            run = _run("fomo-test-sigmoid", accum=k)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
            params = [p for p in run.model.parameters() if p.requires_grad]
            run.model.zero_grad(set_to_none=True)
            loss = forward_backward(run, _batch(run.backbone), None, scaler, penalty(run.model))
            scaler.unscale_(torch.optim.SGD(params, lr=0.0))
            out.append((float(loss), _grads(run.model)))
    (loss1, g1), (loss2, g2) = out
    assert "logit_bias" in g1 and abs(loss1 - loss2) < TOL
    assert _rel_err(g2, g1) < GRAD_TOL


@pytest.mark.parametrize("arch, method", [("fomo-tiny-s", "finetune"), ("fomo-tiny-s", "lora"),
                                          ("fomo-test-timm", "lora")])
def test_grad_checkpointing_gives_the_same_gradient_and_recomputes_the_swapped_attention(arch, method):
    """Bitwise the same gradient on CPU; the peft-swapped LinearAttention runs inside open_clip's checkpointed blocks
    (recomputed in the backward); a timm image tower checkpoints its own blocks."""
    with registered():
        plain, ckpt = _run(arch, method=method), _run(arch, method=method, checkpointing=True)
    batch = _batch(plain.backbone)
    assert checkpointed_blocks(ckpt.model) and all(t.grad_checkpointing for t in ckpt.model.modules()
                                                   if hasattr(t, "resblocks"))
    if arch == "fomo-test-timm":
        assert ckpt.model.visual.trunk.grad_checkpointing and not plain.model.visual.trunk.grad_checkpointing
    calls = []
    attn = [m for m in ckpt.model.modules() if type(m).__name__ == ("LinearAttention" if method == "lora"
                                                                    else "MultiheadAttention")]
    for m in attn:
        m.register_forward_hook(lambda *_: calls.append(1))
    loss1, g1 = _step(plain, batch)
    loss2, g2 = _step(ckpt, batch)
    assert loss1 == loss2 and g1.keys() == g2.keys() and _max_diff(g2, g1) < TOL
    assert len(calls) == 2 * len(attn)  # every attention ran again in the backward: it sits inside the checkpoint
    if method == "lora":
        assert all("lora_" in n for n in g1)  # only the adapters train, through the recomputed blocks


def test_accumulation_and_checkpointing_together():
    one, both = _run(accum=1), _run(accum=4, checkpointing=True)
    batch = _batch(one.backbone)
    (loss1, g1), (loss2, g2) = _step(one, batch), _step(both, batch)
    assert abs(loss1 - loss2) < TOL and _rel_err(g2, g1) < GRAD_TOL


# --------------------------------------------------------------------------------------------------- what to charge
def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def test_step_cost_matches_the_counted_flops_and_the_checkpointed_saved_tensors():
    """F = forward, B = backward: checkpointing costs F + R + B, accumulation 2F + B (FlopCounterMode counts the
    recomputation and the cached pass); the ledger's checkpointed activation memory keeps what checkpointing keeps
    outside the blocks."""
    runs = {"plain": _run(), "ckpt": _run(checkpointing=True), "accum": _run(accum=2),
            "both": _run(accum=2, checkpointing=True)}
    batch = _batch(runs["plain"].backbone)
    counted = {name: _flops(lambda r=run: _step(r, batch)) for name, run in runs.items()}
    with torch.no_grad():
        forward = _flops(lambda: batch_loss(runs["plain"], batch))
    backward = counted["plain"] - forward
    recompute = counted["ckpt"] - counted["plain"]
    assert 0.5 * forward < recompute < forward  # the blocks, not the embeddings, projections and loss
    loss_flops = 2 * 2 * 8 * 8 * runs["plain"].model.text_projection.shape[1]  # one more B x B logit matrix ...
    for name, ckpt, accum in (("accum", False, 2), ("both", True, 2)):
        want = step_cost(forward, backward, 1.0, accum_steps=accum, grad_checkpointing=ckpt,
                         recompute_flops=recompute, checkpointed_bytes=1.0).flops
        assert abs(counted[name] - want) <= 3 * loss_flops, name  # ... per extra loss evaluation: negligible

    def saved_bytes(run, ledger=None):
        seen = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen and not isinstance(t, torch.nn.Parameter):
                seen[key] = t.untyped_storage().nbytes()
                if ledger is not None:
                    ledger.add(seen[key])
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _step(run, batch)
        return sum(seen.values())

    with block_ledger(runs["plain"].model) as ledger:
        total = saved_bytes(runs["plain"], ledger)
    # with checkpointing on, the hooks see what is saved outside the blocks and each block's input (non-reentrant
    # checkpoint saves the inputs through them), not the block's recomputed tensors
    seen_when_checkpointed = saved_bytes(runs["ckpt"])
    assert len(ledger.inputs) == len(checkpointed_blocks(runs["plain"].model)) == 4
    kept = ledger.saved[None] + sum(ledger.inputs.values())
    assert abs(kept - seen_when_checkpointed) <= 0.01 * seen_when_checkpointed  # (the text mask, 4 kB, differs)
    one_block = max(v for b, v in ledger.saved.items() if b is not None)
    assert ledger.checkpointed_bytes() == kept + one_block < 0.5 * total


# --------------------------------------------------------------------------------------------------- the loop
def test_a_run_with_accumulation_and_checkpointing_gives_the_results_of_one_batch(tmp_path, tmp_path_factory,
                                                                                   monkeypatch):
    """accum_steps = 2 (and with gradient checkpointing on as well) trains the same continual run as accum_steps = 1:
    the same per-step losses and results table up to float rounding (the micro-batches' matmuls round differently
    from the whole batch's: measured 2.4e-7 on the losses; the table was identical), not bitwise."""
    from fomo_ray.core import assembly
    from fomo_ray.core.loop import RunHooks, run_stream

    root = small_fifmini(tmp_path_factory).root  # the session's 5% build, read only
    enabled = []
    monkeypatch.setattr(assembly, "enable_grad_checkpointing", lambda m: enabled.append(enable_grad_checkpointing(m)))
    out = {}
    for k, ckpt in ((1, False), (2, False), (2, True)):
        losses = []
        cfg = tiny_config(root, tmp_path, **{"mixture.batch_size": 6, "evaluation.every_n_tasks": 2,
                                             "optimizer.accum_steps": k, "backbone.grad_checkpointing": ckpt})
        df = run_stream(cfg, hooks=RunHooks(on_step=lambda t, s, loss, *_: losses.append(float(loss))), device="cpu")
        out[(k, ckpt)] = (df.drop(columns="run"), losses)  # another config, another run name
    assert len(enabled) == 1 and all(t.grad_checkpointing for t in enabled[0].modules() if hasattr(t, "resblocks"))
    df1, l1 = out[(1, False)]
    for key in ((2, False), (2, True)):
        df, losses = out[key]
        assert len(losses) == len(l1) == 4
        np.testing.assert_allclose(losses, l1, rtol=0, atol=1e-5)
        pd.testing.assert_frame_equal(df, df1, check_exact=False, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- DDP
WORLD = 2
DDP_CASES = ((8, 1), (8, 2), (7, 3))  # (b, k): shards 4/4 (micro 2/2), 3/4 (micro [1,1,1], [1,1,2]): padded gathers


def _penalty(model):
    return (model.logit_scale ** 2).sum()  # an extra loss on a parameter the CLIP loss also uses


def _rank_main(rank, world, init_file, out_dir):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from fomo_ray.core import batch_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out, to_float = {}, batch_step.model_input
        for double in (False, True):
            batch_step.model_input = _float64_input(to_float) if double else to_float
            for b, k in DDP_CASES if not double else DDP_CASES[-1:]:
                run = _run(accum=k, batch=b, double=double)
                batch = _batch(run.backbone, b)
                lo, hi = shard_bounds(b, rank, world)
                encoder = distributed.data_parallel(run.model, "cpu")
                syncs = []  # gradient buckets all-reduced by DDP

                def counting_hook(state, bucket, syncs=syncs):
                    syncs.append(bucket.index())
                    return allreduce_hook(state, bucket)
                encoder.register_comm_hook(None, counting_hook)
                loss, grads = _step(run, {key: v[lo:hi] for key, v in batch.items()}, encoder, extra_fn=_penalty)
                out[(b, k, double)] = (loss, grads, len(syncs))
        batch_step.model_input = to_float
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulation_under_two_rank_ddp_gives_the_one_process_one_batch_gradient(tmp_path, monkeypatch):
    """Each rank splits its shard into k micro-batches, gathers the micro-batch features over the ranks against the
    cached global batch, and lets DDP all-reduce once per step (no_sync before the last micro-batch): the averaged
    gradient is the one-process gradient of the whole batch (float64 to 1e-12), with a method's extra loss."""
    from fomo_ray.core import batch_step

    mp.spawn(_rank_main, args=(WORLD, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    to_float = batch_step.model_input
    try:
        for double in (False, True):
            monkeypatch.setattr(batch_step, "model_input", _float64_input(to_float) if double else to_float)
            for b, k in DDP_CASES if not double else DDP_CASES[-1:]:
                run = _run(accum=1, batch=b, double=double)
                loss, want = _step(run, _batch(run.backbone, b), extra_fn=_penalty)
                for r in ranks:
                    got_loss, got, syncs = r[(b, k, double)]
                    if not double:  # every gradient bucket all-reduced once per step, not once per micro-batch
                        assert syncs == r[(8, 1, False)][2] > 0
                    if double:
                        assert abs(got_loss - loss) < 1e-12 and _max_diff(got, want) < 1e-12, (b, k)
                    else:
                        assert abs(got_loss - loss) < TOL and _rel_err(got, want) < GRAD_TOL, (b, k)
                a, c = ranks[0][(b, k, double)][1], ranks[1][(b, k, double)][1]
                assert all(torch.equal(a[n], c[n]) for n in a)  # replicated after the all-reduce
    finally:
        torch.set_num_threads(threads)
