"""A trial's MLflow params: what a person reads first on its run page and what MLflow's compare page plots."""
from __future__ import annotations

from typing import Any, Mapping

from fomo_ray.config import ExperimentConfig
from fomo_ray.planning.sweep_spec import Dim, trial_label, trial_overrides

SWEPT = "Swept"  # the prefix of a trial's params that repeat what its sweep varies (trial_params)


def trial_params(config: Mapping[str, Any], space: Mapping[str, Dim], cfg: ExperimentConfig) -> dict[str, Any]:
    """A trial's MLflow params: first the keys its sweep varies, also as ``Swept/<key>`` (MLflow's compare page
    plots the first three differing params in sorted order, and capitals sort first: its default plot is then the
    swept keys), ``variant`` (its point label in the sweep space, ``trial_label``, e.g. ``ema_w0.3``) and ``name``
    (the same label: the sweep's name is the parent run's), then the other settings that apply to its method
    (``methods.applicable_params``: no merge weight on a fine-tuning trial, so it does not plot at the default
    weight). MLflow lists them in this order. The whole config goes to the run's ``config.json``."""
    from fomo_ray.methods import applicable_params

    rest, label = applicable_params(cfg), trial_label(config, space)
    swept = {k: rest.pop(k) for k in trial_overrides(config, space) if k in rest}
    rest.pop("name", None)
    return {**{f"{SWEPT}/{k}": v for k, v in swept.items()}, **swept, "variant": label, "name": label, **rest}
