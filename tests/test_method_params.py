"""Which settings apply to which method (``Method.config_keys``, ``methods.applicable_params``: what a run logs as its
MLflow params). Each registered method's declaration is checked against the ``method.*`` keys its hooks really read
while it runs two tasks on a real tiny open_clip model: a key it reads but does not declare, or declares but never
reads, fails the test."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fomo_ray.models.backbones import create_backbone
from fomo_ray.config import load_config
from fomo_ray.methods import REGISTRY, TRAINING_SECTIONS, applicable_params

from test_methods import _loss, _Losses  # the same stand-ins for the loop's loss and TaskLosses


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return create_backbone("fomo-tiny-s", pretrained="").model


class _Reads:
    """A (sub-)config that records every dotted key read through it."""

    def __init__(self, cfg, log, prefix=""):
        self._cfg, self._log, self._prefix = cfg, log, prefix

    def __getattr__(self, name):
        value = getattr(self._cfg, name)
        key = self._prefix + name
        if dataclasses.is_dataclass(value):
            return _Reads(value, self._log, key + ".")
        self._log["keys"].add(key)
        return value


def _keys_read(name, overrides, base_model):
    """The ``method.*`` keys (relative to ``method.``) a method reads when built and over two tasks of one SGD
    step each."""
    cfg = load_config(None, {"method.name": name, **overrides}).method
    log = {"keys": set()}
    method = REGISTRY[name](_Reads(cfg, log), seed=0)
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 400, (2, 32), generator=g)
    model = method.setup(copy.deepcopy(base_model))
    if method.reference_size:  # what the assembly does for a method that distils on pool data (ZSCL)
        method.use_reference(images, texts)
    for t in range(2):
        weights = method.training_weights(t, model)
        if weights is not None:
            model.load_state_dict(weights)
        params = [p for p in model.parameters() if p.requires_grad]
        loss = _loss(model, images, texts)
        extra = method.extra_loss(model, t)
        if extra is not None:
            loss = loss + extra
        if params:  # zero_shot trains nothing
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p -= 0.01 * p.grad
        method.after_step(model, t, 0, 0.01)
        model.zero_grad(set_to_none=True)
        method.after_task(model, t, _Losses([_loss(model, images[i:i + 1], texts[i:i + 1]) for i in range(2)]))
        method.deployed_weights(t, model)
    return log["keys"] - {"name"}, cfg


# every registered method with its defaults, plus the merge settings that change what a merge reads
CASES = [(name, {}) for name in sorted(REGISTRY)] + [
    ("merge", {"method.merge.deploy": "all_experts", "method.merge.operator": "ties"}),
    ("merge", {"method.merge.init": "zero_shot", "method.merge.deploy": "zero_shot_anchor",
               "method.merge.operator": "dare"}),
    ("ema_merge", {"method.merge.operator": "task_arithmetic", "method.merge.lines_alpha": 0.5}),
    ("ft_merge", {"method.merge.operator": "breadcrumbs"}),
    ("offline_merge", {"method.merge.operator": "magmax"}),
    ("zs_merge", {"method.merge.operator": "slerp"}),
    ("ema_merge", {"method.merge.operator": "opcm", "method.merge.lines_alpha": 0.5}),
    ("merge", {"method.merge.deploy": "zero_shot_anchor", "method.merge.operator": "dop",
               "method.merge.dop_steps": 2}),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'defaults'}"
                                                       for n, o in CASES])
def test_declared_settings_are_exactly_the_ones_read(name, overrides, base_model):
    read, cfg = _keys_read(name, overrides, base_model)
    assert set(REGISTRY[name].config_keys(cfg)) == read


def test_a_run_logs_only_what_applies_to_its_method():
    flat = load_config(None, {}).flat()
    finetune = applicable_params(load_config(None, {"method.name": "finetune"}))
    assert not [k for k in finetune if k.startswith("method.") and k != "method.name"]
    assert "optimizer.lr" in finetune and "seed" in finetune
    assert set(flat) - set(finetune) == {k for k in flat if k.startswith("method.") and k != "method.name"}
    ema = applicable_params(load_config(None, {"method.name": "ema_merge", "method.merge.weight": 0.3}))
    assert ema["method.merge.weight"] == 0.3 and "method.peft.rank" not in ema and "method.merge.init" not in ema
    zero_shot = applicable_params(load_config(None, {"method.name": "zero_shot"}))
    assert not [k for k in zero_shot if k.startswith(TRAINING_SECTIONS)]
    assert "evaluation.subset_min" in zero_shot and "backbone.name" in zero_shot
