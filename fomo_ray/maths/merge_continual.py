"""Continual merge operators: OPCM and DOP, which fold one expert at a time into a running merge.

Both see three models per step: the anchor theta_0 (the zero-shot weights), the running merge ``merged`` (its task
vector ``merged - theta_0``) and the new expert theta_t (its task vector ``tau_t = theta_t - theta_0``), and carry a
small state between steps (:func:`new_state`): how many experts are merged and OPCM's lambda and norm sum. The
first step reduces to the expert itself (``theta_0 + tau_1``). The state makes them constant-memory over a stream:
no expert is kept. Folding a list of experts with :func:`fold` is the same merge offline (``merge_ops`` registers
that fold as the operators ``opcm`` and ``dop``).

Only *matrices* are projected: 2-D floating tensors that are not embedding tables (attention in/out projections,
MLP ``c_fc``/``c_proj``, the towers' output projections), the papers' "linear layers". Every other floating tensor
(biases, norms, embeddings, the logit scale) follows each paper's rule for non-linear parameters.

- OPCM (Tang et al. 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable
  Continual Model Merging", arXiv 2501.09522; FusionBench docs/algorithms/opcm.md): per matrix, the new task vector
  loses its components on the dominant singular pairs of the running merge's task vector (:func:`opcm_project`),
  and ``merged_t = theta_0 + (lambda_{t-1} tau_merged + P(tau_t)) / lambda_t`` with lambda_t from :func:`opcm_lambda`.
- DOP (dual orthogonal projection; "Continual Model Merging without Data: Dual Projections for Balancing Stability
  and Plasticity", NeurIPS 2025; FusionBench docs/algorithms/dop.md): per matrix, a short Adam optimisation of the
  merged weights against the projected distances to the previous merge and to the new expert
  (:func:`dop_loss`), their mix set every step by the multi-gradient (MGDA) min-norm weight (:func:`mgda_weight`)
  smoothed by an exponential moving average (:func:`dop_layer`).

Their extra compute (SVDs, DOP's optimisation) is counted by :func:`step_gflops`: one steady-state step run under
``FlopCounterMode`` on seeded tensors of the model's matrix shapes, with an SVD formula the counter lacks; the merge
methods charge it through their cost hooks (``fomo_ray/methods/merging.py``, docs/SCALING.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from fomo_ray.costs import ADAMW_FLOPS_PER_PARAM

StateDict = dict[str, torch.Tensor]
Step = Callable[..., tuple[StateDict, dict[str, Any]]]

LAMBDA_RULES = ("norm", "sqrt_t")


def new_state() -> dict[str, Any]:
    """The carried state before any expert: no task merged, lambda_0 = 1, no task-vector norm yet."""
    return {"tasks": 0, "lambda": 1.0, "norm_sum": 0.0}


def is_matrix(key: str, t: torch.Tensor) -> bool:
    """A linear layer's weight: 2-D, floating, not an embedding table (token / positional embeddings are 2-D too)."""
    return t.is_floating_point() and t.dim() == 2 and "embedding" not in key


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(x.double().square().sum()) for x in tensors))


# --------------------------------------------------------------------------------------------------- OPCM math
def protected_rank(s: torch.Tensor, alpha: float) -> int:
    """OPCM's split rank r: the fewest leading singular values whose sum exceeds the fraction ``alpha`` of the total,
    ``r = min{k : sum_{i<=k} s_i / sum_i s_i > alpha}`` (FusionBench docs/algorithms/opcm.md); 0 for a zero matrix."""
    total = float(s.double().sum())
    if total <= 0.0:
        return 0
    over = torch.nonzero(torch.cumsum(s.double(), 0) / total > alpha)
    return int(over[0]) + 1 if len(over) else len(s)


def opcm_project(tau: torch.Tensor, merged_tv: torch.Tensor, alpha: float) -> torch.Tensor:
    """``tau`` without its components on the protected singular pairs of ``merged_tv = U S V^T`` (full SVD): in
    ``P = U^T tau V`` the diagonal (each pair u_i v_i^T with s_i > 0) and the top-left r x r block (r from
    :func:`protected_rank`) are zeroed, then ``U P V^T`` (Tang et al. 2025, arXiv 2501.09522). Singular pairs of a
    zero singular value are any basis of a null space, so their diagonal entries are left alone."""
    u, s, vh = torch.linalg.svd(merged_tv, full_matrices=True)
    r = protected_rank(s, alpha)
    p = u.T @ tau @ vh.T
    tol = float(s[0]) * max(merged_tv.shape) * torch.finfo(s.dtype).eps if len(s) else 0.0
    live = int((s > tol).sum())
    idx = torch.arange(live, device=p.device)
    p[idx, idx] = 0.0
    p[:r, :r] = 0.0
    return u @ p @ vh


def opcm_lambda(unscaled_norm: float, mean_norm: float, t: int, rule: str) -> float:
    """lambda_t of the t-th merged expert. ``"norm"`` (the paper's adaptive scaling, as FusionBench computes it):
    ``||lambda_{t-1} tau_merged + P(tau_t)|| / mean_{i<=t} ||tau_i||``, so the merged task vector keeps the mean norm
    of the task vectors; ``"sqrt_t"``: sqrt(t), the growth the paper observes for that rule. lambda_1 = 1 either way."""
    if rule == "sqrt_t":
        return math.sqrt(t)
    if rule != "norm":
        raise ValueError(f"unknown OPCM lambda rule {rule!r}; valid: {', '.join(LAMBDA_RULES)}")
    return unscaled_norm / mean_norm if unscaled_norm > 0.0 and mean_norm > 0.0 else 1.0


def opcm_step(anchor: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
              expert: Mapping[str, torch.Tensor], state: Mapping[str, Any], *, opcm_alpha: float = 0.5,
              opcm_lambda_rule: str = "norm", weight: float = 1.0) -> tuple[StateDict, dict[str, Any]]:
    """One OPCM step: ``expert`` (its task vector scaled by ``weight``, 1 in the paper) folded into ``merged``."""
    keys = [k for k, v in anchor.items() if v.is_floating_point()]
    taus = {k: weight * (_up(expert[k]) - _up(anchor[k])) for k in keys}
    t = int(state["tasks"]) + 1
    norm_sum = float(state["norm_sum"]) + _norm(list(taus.values()))
    if t == 1:
        unscaled = taus
    else:
        unscaled = {}
        for k in keys:
            prev = _up(merged[k]) - _up(anchor[k])
            tv = taus[k]
            if is_matrix(k, anchor[k]) and bool(prev.any()):
                tv = opcm_project(tv, prev, opcm_alpha)
            unscaled[k] = float(state["lambda"]) * prev + tv
    lam = opcm_lambda(_norm(list(unscaled.values())), norm_sum / t, t, opcm_lambda_rule) if t > 1 else 1.0
    out = {k: v.clone() for k, v in merged.items() if not v.is_floating_point()}
    out.update({k: (_up(anchor[k]) + unscaled[k] / lam).to(anchor[k].dtype) for k in keys})
    return {k: out[k] for k in anchor}, {"tasks": t, "lambda": lam, "norm_sum": norm_sum}


# --------------------------------------------------------------------------------------------------- DOP math
def kept_rank(s: torch.Tensor, energy: float) -> int:
    """DOP's projection rank: the fewest leading singular values holding the fraction ``energy`` of their sum,
    ``min{k : sum_{i<=k} s_i / sum_i s_i >= energy}`` (FusionBench docs/algorithms/dop.md); 0 for a zero matrix."""
    total = float(s.double().sum())
    if total <= 0.0:
        return 0
    ratio = torch.cumsum(s.double(), 0) / total
    return min(len(s), int((ratio < energy - 1e-12).sum()) + 1)


def dop_basis(tv: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, s_k, V_k): the leading singular triplets of a task vector that span its projection subspaces."""
    u, s, vh = torch.linalg.svd(tv, full_matrices=False)
    k = kept_rank(s, energy)
    return u[:, :k], s[:k], vh[:k].T


def dop_loss(delta: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The dual projected distance ``||diag(s) U^T delta||_F^2 + ||delta V diag(s)||_F^2`` of ``delta = W - W_i``
    on endpoint i's left and right singular subspaces, weighted by its singular values (FusionBench's DOP)."""
    u, s, v = basis
    return (s[:, None] * (u.T @ delta)).square().sum() + ((delta @ v) * s).square().sum()


def dop_gradient(basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``delta -> grad dop_loss(delta)`` in closed form, ``2 U S^2 U^T delta + 2 delta V S^2 V^T`` (the loss is a
    quadratic form, so ``dop_loss(delta) = <delta, grad> / 2``): no autograd graph per Adam step. Dense projectors
    (``2 m n (m + n)`` FLOPs per call) where they are cheaper than the factored products (``8 k m n``), i.e. where
    the kept rank k is near full."""
    u, s, v = basis
    m, n, s2 = u.shape[0], v.shape[0], s.square()
    if m + n < 4 * len(s):
        left, right = (u * s2) @ u.T, (v * s2) @ v.T
        return lambda delta: 2 * (left @ delta + delta @ right)
    return lambda delta: 2 * ((u * s2) @ (u.T @ delta) + ((delta @ v) * s2) @ v.T)


def mgda_weight(g0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    """The multi-gradient (MGDA) weight gamma on ``g0`` of the min-norm point of the segment between two gradients,
    ``argmin_{gamma in [0, 1]} ||gamma g0 + (1 - gamma) g1||`` = clip(<g1 - g0, g1> / ||g0 - g1||^2, 0, 1) (Sener &
    Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS); 0.5 for equal gradients. A 0-d
    float64 tensor on the gradients' device: no host sync inside DOP's loop."""
    diff = (g0 - g1).double().reshape(-1)
    den = diff @ diff
    gamma = ((-diff) @ g1.double().reshape(-1)) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, gamma.clamp(0.0, 1.0), torch.full_like(den, 0.5))


def dop_layer(anchor_w: torch.Tensor, prev_w: torch.Tensor, new_w: torch.Tensor, *, steps: int, lr: float,
              energy: float, ema_beta: float, alpha: float) -> tuple[torch.Tensor, float]:
    """One matrix merged by DOP; returns (merged weights, the final smoothed weight on the previous merge).

    Starts at the mean of the endpoints; every Adam step takes the two losses' gradients (:func:`dop_gradient`),
    divides each by its loss, finds their MGDA weight gamma, smooths ``a <- ema_beta a + (1 - ema_beta) gamma`` (from
    ``a = alpha``) and steps along the gradient of ``a L_prev + (1 - a) L_new``, the sum of the raw gradients so
    weighted."""
    gradients = [dop_gradient(dop_basis(prev_w - anchor_w, energy)), dop_gradient(dop_basis(new_w - anchor_w, energy))]
    w = ((prev_w + new_w) / 2).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    a = torch.tensor(float(alpha), dtype=torch.float64, device=w.device)
    for _ in range(steps):
        with torch.no_grad():
            deltas = [w - prev_w, w - new_w]
            grads = [grad(d) for grad, d in zip(gradients, deltas)]
            values = [(d * g).sum() / 2 for d, g in zip(deltas, grads)]
            normed = [g / torch.where(v > 0, v, torch.ones_like(v)) for g, v in zip(grads, values)]
            a = ema_beta * a + (1.0 - ema_beta) * mgda_weight(*normed)
            w.grad = (a * grads[0] + (1.0 - a) * grads[1]).to(w.dtype)
        opt.step()
    return w.detach(), float(a)


def dop_step(anchor: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
             expert: Mapping[str, torch.Tensor], state: Mapping[str, Any], *, dop_steps: int = 200,
             dop_lr: float = 1e-4, dop_energy: float = 0.99999, dop_ema_beta: float = 0.999,
             dop_alpha: float = 0.8, weight: float = 1.0) -> tuple[StateDict, dict[str, Any]]:
    """One DOP step: matrices by :func:`dop_layer`, every other floating tensor the mean of the two endpoints."""
    keys = [k for k, v in anchor.items() if v.is_floating_point()]
    t = int(state["tasks"]) + 1
    out = {k: v.clone() for k, v in merged.items() if not v.is_floating_point()}
    for k in keys:
        a0 = _up(anchor[k])
        new = a0 + weight * (_up(expert[k]) - a0)
        if t == 1:
            value = new
        elif is_matrix(k, anchor[k]):
            value = dop_layer(a0, _up(merged[k]), new, steps=dop_steps, lr=dop_lr, energy=dop_energy,
                              ema_beta=dop_ema_beta, alpha=dop_alpha)[0]
        else:
            value = (_up(merged[k]) + new) / 2
        out[k] = value.to(anchor[k].dtype)
    return {k: out[k] for k in anchor}, {**new_state(), **dict(state), "tasks": t}


#: name -> one step; ``merge_ops`` registers their folds as operators of the same name
STEPS: dict[str, Step] = {"opcm": opcm_step, "dop": dop_step}


def fold(name: str, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
         weights: Sequence[float], **params: Any) -> StateDict:
    """``experts`` merged one after the other into ``base`` (the anchor) by operator ``name``: what the continual
    merge deploys after the last of them."""
    merged, state = dict(base), new_state()
    for expert, w in zip(experts, weights):
        merged, state = STEPS[name](base, merged, expert, state, weight=w, **params)
    return merged


# --------------------------------------------------------------------------------------------------- cost
def svd_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of an SVD of an m x n matrix, M = max(m, n), N = min(m, n): ``4 M^2 N + 22 N^3`` with full U (R-SVD),
    ``6 M N^2 + 20 N^3`` with thin U (Golub & Van Loan, "Matrix Computations", 4th ed., Fig. 8.6.1); a batch of
    matrices multiplies it. ``FlopCounterMode`` has no formula of its own for SVDs."""
    *batch, m, n = a_shape
    big, small = max(m, n), min(m, n)
    full = bool(args[0]) if args else bool(kwargs.get("full_matrices", True))
    per = 4 * big * big * small + 22 * small ** 3 if full else 6 * big * small * small + 20 * small ** 3
    return int(per * math.prod(batch))


def _counted(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._linalg_svd: svd_flops}) as counter:
        fn()
    return float(counter.get_total_flops())


def step_gflops(name: str, shapes: Mapping[str, Sequence[int]], params: Mapping[str, Any]) -> float:
    """GFLOPs of one steady-state step (not the first, which merges nothing) of operator ``name`` on a model whose
    floating tensors have ``shapes``: counted, per distinct matrix shape, on seeded tensors of that shape under
    ``FlopCounterMode`` (matmuls, and SVDs by :func:`svd_flops`). DOP's Adam steps are counted at 1 and 2 steps and
    extended along the line (every step costs the same), plus Adam's elementwise update
    (``costs.ADAMW_FLOPS_PER_PARAM`` per entry and step). Elementwise merge arithmetic stays uncharged, as for
    every other operator."""
    counts: dict[tuple[int, ...], int] = {}
    for key, shape in shapes.items():
        if len(shape) == 2 and "embedding" not in key:
            counts[tuple(int(x) for x in shape)] = counts.get(tuple(int(x) for x in shape), 0) + 1
    total = 0.0
    for shape, n in sorted(counts.items()):
        g = torch.Generator().manual_seed(0)
        anchor = {"w": torch.randn(shape, generator=g)}
        merged = {"w": anchor["w"] + 0.01 * torch.randn(shape, generator=g)}
        expert = {"w": anchor["w"] + 0.01 * torch.randn(shape, generator=g)}
        state = {**new_state(), "tasks": 1}

        def run(**over: Any) -> float:
            return _counted(lambda: STEPS[name](anchor, merged, expert, state, **{**params, **over}))

        if name == "dop":
            steps = int(params["dop_steps"])
            one, two = run(dop_steps=1), run(dop_steps=2)
            per_layer = one + (steps - 1) * (two - one) + steps * ADAMW_FLOPS_PER_PARAM * math.prod(shape)
        else:
            per_layer = run()
        total += n * per_layer
    return total / 1e9
