"""EWC's Fisher pass runs like training (issue 27): ``batch_step.TaskLosses`` never encodes more than a rank's batch. The
data-parallel case (W = 2 and 3 against one process) is in ``tests/test_ddp.py``; here, on one process, gradient
accumulation: with ``optimizer.accum_steps`` = k the Fisher batches run as k micro-batches against the cached
features of the rest, and the Fisher is still the whole batches' (the squared gradient of each global batch's loss).
"""
from __future__ import annotations

import pytest
import torch

from fomo_ray.core import batch_step, loop

from _data_util import SCALE, small_fifmini, tiny_config

BATCH = 8


def _cfg(root, tmp, **overrides):
    return tiny_config(root, tmp, **{"data.scale": SCALE, "budget.total_ft_steps": 2, "mixture.batch_size": BATCH,
                                     "method.name": "ewc", **overrides})


def _fisher(cfg, n: int = 2):
    """The summed squared gradients of ``n`` Fisher batches of task 0 on a fresh run, the rows each loss encoded, and
    whether the parameters' own ``.grad`` came back untouched."""
    run = loop.build_run(cfg, "cpu")
    params = [p for p in run.model.parameters() if p.requires_grad]
    marker = [torch.full_like(p, 7.0) for p in params]
    for p, m in zip(params, marker):
        p.grad = m
    rows: list[int] = []
    real = batch_step.model_input

    def counting(images, *args, **kwargs):  # every encode of the Fisher pass goes through it
        rows.append(int(images.shape[0]))
        return real(images, *args, **kwargs)

    def squared_grads(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach().square() for g, p in zip(grads, params)]

    batch_step.model_input = counting
    try:
        total = batch_step.TaskLosses(run, 0, run.plan[0].rows).sum_over(n, squared_grads)
    finally:
        batch_step.model_input = real
    kept = all(p.grad is m for p, m in zip(params, marker))
    return total, rows, kept


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return small_fifmini(tmp_path_factory)


def test_fisher_with_accumulation_equals_the_whole_batches(bench, tmp_path):
    whole, whole_rows, kept_whole = _fisher(_cfg(bench.root, tmp_path))
    micro, micro_rows, kept_micro = _fisher(_cfg(bench.root, tmp_path, **{"optimizer.accum_steps": 2}))
    assert kept_whole and kept_micro  # training's gradients are not the Fisher pass's business
    assert whole_rows == [BATCH, BATCH]
    assert max(micro_rows) == BATCH // 2  # no encode larger than one micro-batch
    scale = max(float(w.abs().max()) for w in whole)
    assert scale > 0
    assert max(float((a - b).abs().max()) for a, b in zip(micro, whole)) < 1e-5 * scale
