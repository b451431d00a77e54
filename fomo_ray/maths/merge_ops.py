"""Model-merging operators: pure functions over state dicts (``dict[str, Tensor]``).

Every operator works on *task vectors* ``tau_i = theta_i - base`` (Ilharco et al. 2023, "Editing Models with Task
Arithmetic") and returns a new state dict; inputs are never modified. Only floating tensors are merged; integer and
bool buffers (position ids, ``num_batches_tracked``) are copied from ``base``. Half-precision tensors are merged in
float32 and cast back, so bf16 checkpoints do not lose the small task-vector entries.

The registry :data:`OPERATORS` gives every operator one signature, ``op(base, experts, weights=None, **params)``, and
:func:`merge` is the checked entry point. The continual merge methods (EMA-, ZS-, FT-merge; docs/BENCHMARK.md §Methods)
are the two-model case ``merge(name, base=m_prev, experts=[theta_t], weights=[w])``, which every operator supports:

==================  ==============================================================  ==============================
operator            merged task vector (then ``base + that``)                       ``weights=None`` means
==================  ==============================================================  ==============================
interpolate         ``sum_i w_i tau_i`` (convex: ``w_i >= 0``, ``sum w_i <= 1``)     ``1/k`` each (the mean model)
task_arithmetic     ``scale * sum_i w_i tau_i``                                     ``1`` each
ties                trim, elect sign, disjoint mean (Yadav et al. 2023)             ``1`` each
dare                random drop + rescale, then sum (Yu et al. 2024)                ``1`` each
breadcrumbs         drop tiny and huge entries, then sum (Davari & Belilovsky 2024) ``1`` each
magmax              per entry the ``w_i tau_i`` of largest magnitude (Marczak 2024) ``1`` each
model_stock         ``t * mean_i tau_i``, ``t`` from the angle (Jang et al. 2024)   uniform mean
slerp               spherical interpolation of the raw weights (Shoemake 1985)      ``w = 0.5``
opcm                experts folded in order, orthogonal projection (Tang 2025)      ``1`` each
dop                 experts folded in order, dual projections + MGDA (2025)         ``1`` each
==================  ==============================================================  ==============================

``opcm`` and ``dop`` are continual operators (``fomo_ray/maths/merge_continual.py``): each folds its experts one at a
time into a running merge anchored at ``base``; the merge methods call their steps directly with a carried state.

With one expert and weight ``w`` every operator reduces to a (possibly sparsified) step of size ``w`` from ``base``
towards the expert, i.e. ``interpolate`` gives exactly ``(1-w) * base + w * theta`` (the EMA-merge).

LiNeS layer scaling (Wang et al. 2024, "LiNeS: Post-training layer scaling prevents forgetting and enhances model
merging") is a wrapper around *every* operator: ``merge(..., lines=(alpha, beta))`` rescales the merged task vector of
each parameter by ``lambda_l = alpha + beta * l / (L - 1)`` (see :func:`lines_depths`). The TIME study (Dziadzio et
al. 2024, arXiv 2412.06712) frames continual merging as init rule x deploy rule x operator; this module is the
operator axis.
"""
from __future__ import annotations

import inspect
import math
import re
import zlib
from typing import Callable, Mapping, Sequence

import torch

from fomo_ray.maths import merge_continual

StateDict = dict[str, torch.Tensor]
Operator = Callable[..., StateDict]

__all__ = [
    "MergeError", "StateDict", "OPERATORS", "CONFIG_PARAMS", "merge", "merge_from_config", "config_params",
    "operator_params", "task_vector", "add_task_vector", "interpolate", "slerp", "task_arithmetic", "ties", "dare",
    "breadcrumbs", "magmax", "model_stock", "model_stock_t", "lines_depths", "lines_scales", "apply_lines", "opcm",
    "dop", "CONTINUAL",
]


class MergeError(ValueError):
    """Incompatible state dicts, an unknown operator or an out-of-range merge parameter (the message names it)."""


# --------------------------------------------------------------------------------------------------- helpers
def _is_merged(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _up(t: torch.Tensor) -> torch.Tensor:
    """Half tensors are merged in float32 (task-vector entries are tiny next to the weights)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_compatible(base: Mapping[str, torch.Tensor], others: Sequence[Mapping[str, torch.Tensor]]) -> None:
    for i, sd in enumerate(others):
        missing = [k for k in base if k not in sd]
        extra = [k for k in sd if k not in base]
        if missing or extra:
            raise MergeError(f"state dict of expert {i} does not match the base: missing keys {missing[:5]}, "
                             f"unexpected keys {extra[:5]}")
        for k, v in base.items():
            if sd[k].shape != v.shape:
                raise MergeError(f"parameter '{k}': expert {i} has shape {tuple(sd[k].shape)}, "
                                 f"base has {tuple(v.shape)}")


def _check_fraction(name: str, value: float, *, low_open: bool = True) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0)
    if not (isinstance(value, (int, float)) and ok):
        interval = "(0, 1]" if low_open else "[0, 1)"
        raise MergeError(f"merge parameter '{name}' must be in {interval}, got {value!r}")


def _check_weight(w: float, op: str) -> None:
    if not (isinstance(w, (int, float)) and 0.0 <= w <= 1.0):
        raise MergeError(f"{op}: merge weight must be in [0, 1], got {w!r}")


def _weights(weights: Sequence[float] | None, k: int, default: float, op: str) -> list[float]:
    if weights is None:
        return [default] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise MergeError(f"{op}: got {len(weights)} weights for {k} experts")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"{op}: weights must be finite, got {weights}")
    return weights


def _copy_unmerged(base: Mapping[str, torch.Tensor]) -> StateDict:
    """Non-floating buffers are taken from the base (they are ids/counters, not weights)."""
    return {k: v.clone() for k, v in base.items() if not _is_merged(v)}


def _ordered(base: Mapping[str, torch.Tensor], out: StateDict) -> StateDict:
    return {k: out[k] for k in base}


def _merge_task_vectors(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                        combine: Callable[[torch.Tensor, str], torch.Tensor]) -> StateDict:
    """``base + combine(stack(tau_i), key)`` for every floating tensor; ``combine`` sees ``[k, *shape]``."""
    out = _copy_unmerged(base)
    for key, b in base.items():
        if not _is_merged(b):
            continue
        b_up = _up(b)
        taus = torch.stack([_up(e[key]) - b_up for e in experts])
        out[key] = (b_up + combine(taus, key)).to(b.dtype)
    return _ordered(base, out)


def _per_expert(w: Sequence[float], taus: torch.Tensor) -> torch.Tensor:
    """Weights as a ``[k, 1, 1, ...]`` tensor that broadcasts over stacked task vectors."""
    return torch.tensor(w, dtype=taus.dtype, device=taus.device).view(-1, *([1] * (taus.dim() - 1)))


def _kept(n: int, density: float) -> int:
    """Entries kept out of ``n`` at ``density``; at least one, so small tensors (biases) are never wiped out."""
    return max(1, min(n, int(math.floor(density * n + 0.5))))


# --------------------------------------------------------------------------------------------------- task vectors
def task_vector(sd: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    """``sd - base`` for every floating tensor (Ilharco et al. 2023); non-floating entries are left out."""
    _check_compatible(base, [sd])
    keys = [k for k, v in base.items() if _is_merged(v)]
    diffs = torch._foreach_sub([_up(sd[k]) for k in keys], [_up(base[k]) for k in keys])
    return dict(zip(keys, diffs))


def add_task_vector(base: Mapping[str, torch.Tensor], tv: Mapping[str, torch.Tensor], scale: float = 1.0) -> StateDict:
    """``base + scale * tv`` for the keys of ``tv``; every other entry is copied from ``base``."""
    out = {k: v.clone() for k, v in base.items() if k not in tv}
    unknown = [k for k in tv if k not in base]
    if unknown:
        raise MergeError(f"task vector has keys the base lacks: {unknown[:5]}")
    keys = list(tv)
    summed = torch._foreach_add([_up(base[k]) for k in keys], [tv[k] for k in keys], alpha=scale)
    out.update({k: s.to(base[k].dtype) for k, s in zip(keys, summed)})
    return _ordered(base, out)


# --------------------------------------------------------------------------------------------------- two-model ops
def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], w: float) -> StateDict:
    """Linear interpolation ``(1 - w) * a + w * b`` (weight ``w`` on ``b``), as in WiSE-FT / the EMA-merge.

    One fused ``torch._foreach_lerp`` over all floating tensors; non-floating buffers come from ``a``.
    """
    _check_weight(w, "interpolate")
    _check_compatible(a, [b])
    keys = [k for k, v in a.items() if _is_merged(v)]
    lerped = torch._foreach_lerp([_up(a[k]) for k in keys], [_up(b[k]) for k in keys], float(w))
    out = _copy_unmerged(a)
    out.update({k: v.to(a[k].dtype) for k, v in zip(keys, lerped)})
    return _ordered(a, out)


def _slerp_tensor(a: torch.Tensor, b: torch.Tensor, w: float, parallel_threshold: float) -> torch.Tensor:
    a_up, b_up = _up(a), _up(b)
    va, vb = a_up.flatten().double(), b_up.flatten().double()
    na, nb = va.norm(), vb.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a_up, b_up, w).to(a.dtype)
    cos = float(torch.dot(va / na, vb / nb).clamp(-1.0, 1.0))
    if abs(cos) > parallel_threshold:  # the angle is ill-conditioned: the two models are (anti)parallel
        return torch.lerp(a_up, b_up, w).to(a.dtype)
    theta = math.acos(cos)
    s = math.sin(theta)
    c_a, c_b = math.sin((1.0 - w) * theta) / s, math.sin(w * theta) / s
    return (c_a * a_up + c_b * b_up).to(a.dtype)


def slerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], w: float, *,
          parallel_threshold: float = 0.9995) -> StateDict:
    """Spherical linear interpolation per tensor (Shoemake 1985; per-tensor use on weights as in mergekit).

    ``sin((1-w) theta)/sin(theta) * a + sin(w theta)/sin(theta) * b`` with ``theta`` the angle between the
    flattened tensors; ``w=0`` gives ``a``, ``w=1`` gives ``b``. Falls back to linear interpolation when
    ``|cos theta| > parallel_threshold`` or a tensor is zero, where the angle is numerically meaningless.
    """
    _check_weight(w, "slerp")
    _check_compatible(a, [b])
    out = _copy_unmerged(a)
    for k, v in a.items():
        if _is_merged(v):
            out[k] = _slerp_tensor(v, b[k], float(w), parallel_threshold)
    return _ordered(a, out)


# --------------------------------------------------------------------------------------------------- k-model ops
def task_arithmetic(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                    weights: Sequence[float] | None = None, *, scale: float = 1.0) -> StateDict:
    """``base + scale * sum_i w_i (theta_i - base)`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    Fused over all tensors with ``torch._foreach_*`` (one pass per expert, no per-tensor Python arithmetic).
    """
    w = _weights(weights, len(experts), 1.0, "task_arithmetic")
    _check_compatible(base, experts)
    keys = [k for k, v in base.items() if _is_merged(v)]
    b = [_up(base[k]) for k in keys]
    acc = [x.clone() for x in b]
    for expert, wi in zip(experts, w):
        torch._foreach_add_(acc, torch._foreach_sub([_up(expert[k]) for k in keys], b), alpha=scale * wi)
    out = _copy_unmerged(base)
    out.update({k: v.to(base[k].dtype) for k, v in zip(keys, acc)})
    return _ordered(base, out)


def _interpolate_op(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                    weights: Sequence[float] | None = None) -> StateDict:
    """Convex combination ``(1 - sum w_i) base + sum_i w_i theta_i``; one expert: ``interpolate(base, e, w)``."""
    w = _weights(weights, len(experts), 1.0 / len(experts), "interpolate")
    if any(x < 0 for x in w) or sum(w) > 1.0 + 1e-6:
        raise MergeError(f"interpolate: weights must be >= 0 and sum to at most 1, got {w}")
    if len(experts) == 1:
        return interpolate(base, experts[0], w[0])
    return task_arithmetic(base, experts, w)


def _trim_top_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-|.| entries of each row of ``x`` (``[k, ...]``), zero the rest."""
    flat = x.reshape(x.shape[0], -1)
    idx = flat.abs().topk(_kept(flat.shape[1], density), dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).view_as(x)


def ties(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
         weights: Sequence[float] | None = None, *, density: float = 0.2, scale: float = 1.0) -> StateDict:
    """TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

    Per tensor: (1) trim each task vector to its top-``density`` entries by magnitude; (2) elect each entry's sign
    as the sign of the summed trimmed values (total mass; ties go to +); (3) disjoint mean: average the weighted
    entries that agree with the elected sign (zeros do not vote and are not counted). Result ``base + scale * .``.
    Same order as ``peft.utils.merge_utils.ties`` (weights applied after the election), except that at least one
    entry per tensor survives trimming.
    """
    _check_fraction("density", density)
    w = _weights(weights, len(experts), 1.0, "ties")
    _check_compatible(base, experts)

    def combine(taus: torch.Tensor, _key: str) -> torch.Tensor:
        trimmed = _trim_top_magnitude(taus, density)
        elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
        agree = trimmed.sign() == elected  # sign 0 (trimmed) never equals +-1
        summed = (trimmed * _per_expert(w, taus) * agree).sum(0)
        return scale * summed / agree.sum(0).clamp(min=1)

    return _merge_task_vectors(base, experts, combine)


def _derived_seed(seed: int, key: str, expert: int) -> int:
    """A per-(tensor, expert) seed, so the drop mask does not depend on dict order or on other tensors."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{key}#{expert}".encode())) % (2**63 - 1)


def dare(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
         weights: Sequence[float] | None = None, *, density: float = 0.2, seed: int = 0,
         scale: float = 1.0) -> StateDict:
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models").

    Each task-vector entry is kept with probability ``density`` and rescaled by ``1/density`` (so its expectation
    is unchanged), then the weighted task vectors are summed: ``base + scale * sum_i w_i drop(tau_i)``. Masks come
    from ``torch.Generator``s seeded by ``(seed, tensor name, expert index)``: same seed, same merge.
    """
    _check_fraction("density", density)
    w = _weights(weights, len(experts), 1.0, "dare")
    _check_compatible(base, experts)

    def combine(taus: torch.Tensor, key: str) -> torch.Tensor:
        keep = torch.empty_like(taus, dtype=torch.bool)
        for i in range(taus.shape[0]):  # one generator per expert; the draw itself is one vectorised op
            g = torch.Generator(device=taus.device).manual_seed(_derived_seed(seed, key, i))
            keep[i] = torch.rand(taus.shape[1:], generator=g, device=taus.device) < density
        return scale * (taus * keep * _per_expert(w, taus)).sum(0) / density

    return _merge_task_vectors(base, experts, combine)


def breadcrumbs(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float] | None = None, *, density: float = 0.2, drop_top: float = 0.01,
                scale: float = 1.0) -> StateDict:
    """Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks").

    Per tensor and task vector, rank entries by magnitude; drop the largest ``drop_top`` fraction (outliers) and the
    smallest ones so that a ``density`` fraction survives; then ``base + scale * sum_i w_i masked(tau_i)``.
    """
    _check_fraction("density", density)
    _check_fraction("drop_top", drop_top, low_open=False)
    if density + drop_top > 1.0 + 1e-12:
        raise MergeError(f"breadcrumbs: density ({density}) + drop_top ({drop_top}) must be <= 1")
    w = _weights(weights, len(experts), 1.0, "breadcrumbs")
    _check_compatible(base, experts)

    def combine(taus: torch.Tensor, _key: str) -> torch.Tensor:
        flat = taus.reshape(taus.shape[0], -1)
        n = flat.shape[1]
        n_keep = _kept(n, density)
        n_top = min(int(math.floor(drop_top * n + 0.5)), n - n_keep)
        order = flat.abs().argsort(dim=1, stable=True)  # ascending magnitude
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=flat.device).expand_as(order))
        mask = (ranks >= n - n_top - n_keep) & (ranks < n - n_top)
        return scale * (flat * mask).view_as(taus).mul(_per_expert(w, taus)).sum(0)

    return _merge_task_vectors(base, experts, combine)


def magmax(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
           weights: Sequence[float] | None = None, *, scale: float = 1.0) -> StateDict:
    """MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning").

    Per entry, the weighted task-vector value of largest magnitude across experts: ``base + scale * that``.
    """
    w = _weights(weights, len(experts), 1.0, "magmax")
    _check_compatible(base, experts)

    def combine(taus: torch.Tensor, _key: str) -> torch.Tensor:
        weighted = taus * _per_expert(w, taus)
        idx = weighted.abs().argmax(dim=0, keepdim=True)
        return scale * weighted.gather(0, idx).squeeze(0)

    return _merge_task_vectors(base, experts, combine)


def _mean_pairwise_cosine(taus: torch.Tensor) -> float:
    """Mean cosine over the ``k (k-1)`` ordered pairs of stacked task vectors ``[k, ...]``; a zero task vector has
    no direction and contributes cosine 0 (as in mergekit, whose norm clamp has the same effect)."""
    k = taus.shape[0]
    flat = taus.reshape(k, -1).double()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-30)
    gram = unit @ unit.T
    cos = float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1)))
    return min(max(cos, -1.0), 1.0)  # rounding only: a mean of cosines is in [-1, 1]


# 1 + (k-1) cos = |sum_i u_i|^2 / k for unit task vectors u_i, never negative: a value below this tolerance is
# float64 rounding of a zero (the unit vectors cancel), and t = k cos / that, of order 1e9 or more, would be noise.
_MODEL_STOCK_POLE_TOL = 1e-9


def model_stock_t(cos: float, k: int, key: str = "") -> float:
    """Model Stock's interpolation ratio ``t = k cos(theta) / (1 + (k-1) cos(theta))`` for ``k`` fine-tuned models
    at (mean pairwise) angle ``theta`` of their task vectors (Jang et al. 2024, "Model Stock: All we need is just a
    few fine-tuned models", arXiv 2403.19522), as the paper states it: not clipped.

    The denominator is ``>= 0`` (``|sum_i u_i|^2 / k`` for the unit task vectors ``u_i``), so ``t <= 1`` always;
    ``cos < 0`` gives ``t < 0`` (the merge steps from the base *away* from the experts' average), and ``t -> -inf``
    as ``cos -> -1/(k-1)``, where the unit task vectors cancel (``k = 2``: antiparallel, e.g. a scalar such as
    ``logit_scale`` moved in opposite directions). That pole raises :class:`MergeError` naming the tensor ``key``
    and the cosine, where an unguarded implementation would return inf/NaN or huge weights.
    """
    den = 1.0 + (k - 1) * cos
    if den <= _MODEL_STOCK_POLE_TOL:
        raise MergeError(f"model_stock: tensor '{key}' has mean pairwise task-vector cosine {cos!r} = -1/(k-1) for "
                         f"k={k} experts (their directions cancel), where t = k cos / (1 + (k-1) cos) has a pole; "
                         f"use another operator for these experts")
    return k * cos / den


def model_stock_ratio(taus: torch.Tensor, key: str = "") -> float:
    """:func:`model_stock_t` for stacked task vectors ``[k, ...]`` (``cos``: their mean pairwise cosine)."""
    return model_stock_t(_mean_pairwise_cosine(taus), taus.shape[0], key)


def model_stock(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float] | None = None) -> StateDict:
    """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models").

    Per tensor, ``base + t * mean_i tau_i`` with ``t = k cos / (1 + (k-1) cos)`` from the mean pairwise cosine of
    the experts' task vectors (:func:`model_stock_t`), i.e. ``t * w_avg + (1 - t) * w_0``. As in the paper (and
    mergekit) ``t`` is not clipped: a negative cosine gives ``t < 0``, a merge beyond the base away from the
    experts' average; the pole ``cos = -1/(k-1)`` raises :class:`MergeError`. A one-number tensor (the logit scale)
    has no angle and takes the weighted mean (``t = 1``). ``weights`` (optional) weight the
    expert average. With a single expert there is no angle: the operator is then ``interpolate(base, expert, w)`` with
    ``w = weights[0]`` (default 1), which keeps the EMA-merge case expressible.
    """
    k = len(experts)
    if k == 1:
        w1 = _weights(weights, 1, 1.0, "model_stock")[0]
        _check_weight(w1, "model_stock")
        return interpolate(base, experts[0], w1)
    w = _weights(weights, k, 1.0, "model_stock")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise MergeError(f"model_stock: weights must be >= 0 with a positive sum, got {w}")
    w = [x / sum(w) for x in w]
    _check_compatible(base, experts)

    def combine(taus: torch.Tensor, key: str) -> torch.Tensor:
        mean = (taus * _per_expert(w, taus)).sum(0)
        # a one-number tensor (logit_scale) has no angle: its "cosine" is +-1, and -1 is the pole at k = 2, which
        # two tasks moving the temperature both ways would hit; it takes the plain weighted mean (t = 1)
        return mean if taus[0].numel() == 1 else model_stock_ratio(taus, key) * mean

    return _merge_task_vectors(base, experts, combine)


def _slerp_op(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
              weights: Sequence[float] | None = None, *, parallel_threshold: float = 0.9995) -> StateDict:
    """SLERP between ``base`` and exactly one expert with weight ``w`` on the expert (default 0.5)."""
    if len(experts) != 1:
        raise MergeError(f"slerp merges exactly two models (base and one expert), got {len(experts)} experts; "
                         f"use another operator for offline merges of many experts")
    w = _weights(weights, 1, 0.5, "slerp")[0]
    return slerp(base, experts[0], w, parallel_threshold=parallel_threshold)


def opcm(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
         weights: Sequence[float] | None = None, *, opcm_alpha: float = 0.5,
         opcm_lambda_rule: str = "norm") -> StateDict:
    """OPCM (Tang et al. 2025, arXiv 2501.09522): the experts folded in order into ``base`` by
    ``merge_continual.opcm_step``; weights scale each task vector (default 1, the paper)."""
    _check_fraction("opcm_alpha", opcm_alpha)
    if opcm_lambda_rule not in merge_continual.LAMBDA_RULES:
        raise MergeError(f"merge parameter 'opcm_lambda_rule' must be one of {list(merge_continual.LAMBDA_RULES)}, "
                         f"got {opcm_lambda_rule!r}")
    w = _weights(weights, len(experts), 1.0, "opcm")
    _check_compatible(base, experts)
    return merge_continual.fold("opcm", base, experts, w, opcm_alpha=opcm_alpha, opcm_lambda_rule=opcm_lambda_rule)


def dop(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float] | None = None, *, dop_steps: int = 200, dop_lr: float = 1e-4,
        dop_energy: float = 0.99999, dop_ema_beta: float = 0.999, dop_alpha: float = 0.8) -> StateDict:
    """DOP (dual projections, NeurIPS 2025): the experts folded in order into ``base`` by
    ``merge_continual.dop_step``; weights scale each task vector (default 1, the paper)."""
    if isinstance(dop_steps, bool) or int(dop_steps) != dop_steps or dop_steps < 0 or dop_lr <= 0:
        raise MergeError(f"DOP needs dop_steps >= 0 (an integer) and dop_lr > 0, got {dop_steps!r}, {dop_lr!r}")
    _check_fraction("dop_energy", dop_energy)
    for name, value in (("dop_ema_beta", dop_ema_beta), ("dop_alpha", dop_alpha)):
        if not 0.0 <= value <= 1.0:
            raise MergeError(f"merge parameter '{name}' must be in [0, 1], got {value!r}")
    w = _weights(weights, len(experts), 1.0, "dop")
    _check_compatible(base, experts)
    return merge_continual.fold("dop", base, experts, w, dop_steps=int(dop_steps), dop_lr=dop_lr,
                                dop_energy=dop_energy, dop_ema_beta=dop_ema_beta, dop_alpha=dop_alpha)


# --------------------------------------------------------------------------------------------------- LiNeS
_BLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.")
# Outside the transformer blocks: input stems are the first layer, output norms/projections the last.
_FIRST_PARTS = {"conv1", "ln_pre", "class_embedding", "positional_embedding", "token_embedding", "patch_embed"}
_LAST_PARTS = {"ln_post", "ln_final", "proj", "text_projection", "logit_scale", "logit_bias", "attn_pool", "head"}


def lines_depths(names: Sequence[str]) -> dict[str, float]:
    """Relative depth ``l / (L - 1)`` in [0, 1] of every parameter name (open_clip naming).

    ``...resblocks.<l>....`` is block ``l`` of its tower (``L`` = blocks in that tower, towers told apart by the
    name prefix before ``resblocks``; a one-block tower has depth 0). Outside blocks, embeddings and stems
    (``conv1``, ``ln_pre``, ``*embedding``) are depth 0 and final norms / projections (``ln_post``, ``ln_final``,
    ``proj``, ``text_projection``, ``logit_scale``) depth 1; any other name counts as a stem (depth 0).
    """
    blocks: dict[str, tuple[str, int]] = {}
    n_blocks: dict[str, int] = {}
    for name in names:
        m = _BLOCK.search(name)
        if m:
            tower, layer = name[: m.start()], int(m.group(1))
            blocks[name] = (tower, layer)
            n_blocks[tower] = max(n_blocks.get(tower, 0), layer + 1)
    depths: dict[str, float] = {}
    for name in names:
        if name in blocks:
            tower, layer = blocks[name]
            depths[name] = layer / (n_blocks[tower] - 1) if n_blocks[tower] > 1 else 0.0
        else:
            parts = set(name.split("."))
            depths[name] = 1.0 if (parts & _LAST_PARTS and not parts & _FIRST_PARTS) else 0.0
    return depths


def lines_scales(names: Sequence[str], alpha: float, beta: float) -> dict[str, float]:
    """LiNeS factors ``lambda_l = alpha + beta * l / (L - 1)`` per parameter name (Wang et al. 2024)."""
    return {k: alpha + beta * d for k, d in lines_depths(names).items()}


def apply_lines(base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], alpha: float,
                beta: float) -> StateDict:
    """``base + lambda_l * (merged - base)`` per floating tensor: LiNeS on the merged task vector of any operator.

    Shallow layers keep less of the update (retaining general features), deep layers more.
    """
    _check_compatible(base, [merged])
    keys = [k for k, v in base.items() if _is_merged(v)]
    scales = lines_scales(keys, alpha, beta)
    tv = torch._foreach_sub([_up(merged[k]) for k in keys], [_up(base[k]) for k in keys])
    torch._foreach_mul_(tv, [scales[k] for k in keys])
    return add_task_vector(base, dict(zip(keys, tv)))


# --------------------------------------------------------------------------------------------------- registry
OPERATORS: dict[str, Operator] = {
    "interpolate": _interpolate_op,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "breadcrumbs": breadcrumbs,
    "magmax": magmax,
    "model_stock": model_stock,
    "slerp": _slerp_op,
    "opcm": opcm,
    "dop": dop,
}
#: operators that fold experts into a running merge with a carried state (merge_continual.STEPS)
CONTINUAL = tuple(merge_continual.STEPS)


def _operator(name: str) -> Operator:
    if name not in OPERATORS:
        raise MergeError(f"unknown merge operator '{name}'; valid operators: {', '.join(OPERATORS)}")
    return OPERATORS[name]


def operator_params(name: str) -> tuple[str, ...]:
    """The keyword parameters an operator accepts besides ``base, experts, weights``."""
    sig = inspect.signature(_operator(name))
    return tuple(p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def merge(name: str, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
          weights: Sequence[float] | None = None, *, lines: tuple[float, float] | None = None,
          **params: float) -> StateDict:
    """Merge ``experts`` into ``base`` with operator ``name`` (see :data:`OPERATORS`), optionally with LiNeS.

    ``merge("interpolate", m_prev, [theta_t], [w])`` is the EMA-merge step (docs/BENCHMARK.md §Methods).
    ``lines=(alpha, beta)`` rescales the merged task vector per layer (:func:`apply_lines`). Unknown operators or
    parameters raise :class:`MergeError` listing the valid ones.
    """
    op = _operator(name)
    accepted = operator_params(name)
    unknown = [p for p in params if p not in accepted]
    if unknown:
        raise MergeError(f"merge operator '{name}' got unknown parameter(s) {unknown}; "
                         f"it accepts: {', '.join(accepted) or 'none'}")
    if not experts:
        raise MergeError(f"merge operator '{name}' needs at least one expert state dict")
    merged = op(base, list(experts), weights, **params)
    if lines is not None:
        merged = apply_lines(base, merged, float(lines[0]), float(lines[1]))
    return merged


# MergeConfig fields that are keyword parameters of the same name of some operators (config.py documents each);
# the other fields (weight, operator, init, deploy, lines_*) are read by the merge methods or as ``lines=``.
CONFIG_PARAMS = ("density", "drop_top", "scale", "opcm_alpha", "opcm_lambda_rule", "dop_steps", "dop_lr", "dop_energy",
                 "dop_ema_beta", "dop_alpha")


def config_params(operator: str) -> tuple[str, ...]:
    """The ``MergeConfig`` fields :func:`merge_from_config` passes to ``operator``: those of :data:`CONFIG_PARAMS` it
    accepts (so a merge method declares exactly the settings a run reads)."""
    accepted = operator_params(operator)
    return tuple(k for k in CONFIG_PARAMS if k in accepted)


def merge_from_config(merge_cfg, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float] | None = None, *, seed: int | None = None,
                      operator: str | None = None) -> StateDict:
    """:func:`merge` driven by a ``config.MergeConfig`` (``operator``, :func:`config_params`, ``lines_*``).

    Only the config fields the operator accepts are passed; ``seed`` reaches operators that draw (DARE).
    LiNeS is on when ``lines_alpha >= 0``. ``operator`` overrides the config's (a preset that fixes it).
    """
    operator = operator or merge_cfg.operator
    params = {k: getattr(merge_cfg, k) for k in config_params(operator)}
    if seed is not None and "seed" in operator_params(operator):
        params["seed"] = int(seed)
    lines = (merge_cfg.lines_alpha, merge_cfg.lines_beta) if merge_cfg.lines_alpha >= 0 else None
    return merge(operator, base, experts, weights, lines=lines, **params)
