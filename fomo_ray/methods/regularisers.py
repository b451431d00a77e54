"""Parameter-regularisation methods: EWC and SI (full fine-tuning plus a quadratic penalty towards theta*).

Both keep their per-parameter tensors on the training device and compute the penalty with ``torch._foreach_*`` ops (one
kernel per op over all tensors; the reference computed it on the CPU every step: docs/BENCHMARK.md §Reference faults).
The math lives in the pure functions :func:`quadratic_penalty`, :func:`fisher_update` and :func:`si_importance`.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from fomo_ray.costs import PENALTY_FLOPS_PER_PARAM, ExtraCost
from fomo_ray.methods.base import Method, StateDict, TaskLosses, freeze_all_but
from fomo_ray.maths.optim import trainable_named

Tensors = list[torch.Tensor]


# --------------------------------------------------------------------------------------------------- pure math
def quadratic_penalty(params: Tensors, anchor: Tensors, importance: Tensors) -> torch.Tensor:
    """``sum_i importance_i * (params_i - anchor_i)^2`` over all tensors (differentiable w.r.t. ``params``)."""
    diff = torch._foreach_sub(params, anchor)
    weighted = torch._foreach_mul(torch._foreach_mul(diff, diff), importance)
    return torch.stack([w.sum() for w in weighted]).sum()


def fisher_update(fisher: Tensors, fisher_new: Tensors, gamma: float) -> None:
    """Online EWC accumulation ``F <- gamma*F + F_new`` in place (Schwarz et al. 2018)."""
    torch._foreach_mul_(fisher, gamma)
    torch._foreach_add_(fisher, fisher_new)


def si_importance(omega_big: Tensors, omega_small: Tensors, params: Tensors, anchor: Tensors, xi: float) -> None:
    """SI consolidation in place: ``Omega += omega / ((theta - theta*)^2 + xi)``."""
    delta = torch._foreach_sub(params, anchor)
    denom = torch._foreach_add(torch._foreach_mul(delta, delta), xi)
    torch._foreach_add_(omega_big, torch._foreach_div(omega_small, denom))


# --------------------------------------------------------------------------------------------------- shared plumbing
def _detached(params: Iterable[torch.Tensor]) -> Tensors:
    return [p.detach().clone() for p in params]


def _pack(names: list[str], tensors: Tensors) -> StateDict:
    return {n: t.detach().clone() for n, t in zip(names, tensors)}


def _unpack(names: list[str], state: Mapping[str, torch.Tensor], device: torch.device, key: str) -> Tensors:
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"method state '{key}' lacks parameters {missing[:5]}")
    return [state[n].to(device=device, copy=True) for n in names]


class EWC(Method):
    """Elastic Weight Consolidation, online variant: ``L + (lambda/2)·sum F_i (theta_i - theta*_i)^2`` with a diagonal
    empirical Fisher from squared gradients of the CLIP loss on the task's data after each task,
    ``F <- gamma·F + F_new``, theta* = the weights at the end of the previous task (Kirkpatrick et al. 2017,
    "Overcoming catastrophic forgetting in neural networks", PNAS; online form: Schwarz et al. 2018, "Progress &
    Compress", ICML). The Fisher pass is charged per task by the budget, not per step (docs/BENCHMARK.md §Budgets)."""

    name = "ewc"
    reads = ("reg.ewc_",)

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: True)  # full fine-tuning plus the penalty
        named = trainable_named(model)
        self.names = [n for n, _ in named]
        self.device = named[0][1].device
        self.fisher: Tensors | None = None  # None until the first task ends: no penalty during task 0
        self.anchor: Tensors | None = None
        return model

    def _params(self, model: nn.Module) -> Tensors:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def steady_state(self, model: nn.Module) -> None:
        params = self._params(model)
        self.fisher = [torch.full_like(p, 1e-3).detach() for p in params]
        self.anchor = _detached(params)

    def extra_cost(self) -> ExtraCost:
        # per task a Fisher pass of `fisher` batches (fwd+bwd), squaring and accumulating each batch's gradients (2
        # per parameter and batch) and F <- gamma F + F_new (3); per step the penalty
        fisher = self.cfg.reg.ewc_fisher_batches
        return ExtraCost(step_flops_per_param=PENALTY_FLOPS_PER_PARAM, task_passes=fisher,
                         task_flops_per_param=2.0 * fisher + 3.0)

    def extra_loss(self, model: nn.Module, t: int) -> torch.Tensor | None:
        if self.fisher is None:
            return None
        return 0.5 * self.cfg.reg.ewc_lambda * quadratic_penalty(self._params(model), self.anchor, self.fisher)

    def after_task(self, model: nn.Module, t: int, task_losses: TaskLosses) -> None:
        params = self._params(model)
        n = self.cfg.reg.ewc_fisher_batches

        def squared_grads(loss: torch.Tensor) -> list[torch.Tensor]:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g.detach().square() for g, p in zip(grads, params)]

        fisher_new = task_losses.sum_over(n, squared_grads)  # the empirical diagonal Fisher: mean squared gradient
        torch._foreach_div_(fisher_new, float(n))
        if self.fisher is None:
            self.fisher = fisher_new
        else:
            fisher_update(self.fisher, fisher_new, self.cfg.reg.ewc_gamma)
        self.anchor = _detached(params)

    def state_dict(self) -> dict[str, Any]:
        if self.fisher is None:
            return {}
        return {"fisher": _pack(self.names, self.fisher), "anchor": _pack(self.names, self.anchor)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            self.fisher = self.anchor = None
            return
        self.fisher = _unpack(self.names, state["fisher"], self.device, "fisher")
        self.anchor = _unpack(self.names, state["anchor"], self.device, "anchor")


class SI(Method):
    """Synaptic Intelligence, Mammoth variant: path integral ``omega += lr·g^2`` after every step; after a task
    ``Omega += omega / ((theta - theta*)^2 + xi)``, theta* <- theta, omega <- 0; penalty ``c·sum Omega (theta-theta*)^2``
    (Zenke, Poole, Ganguli 2017, "Continual Learning Through Synaptic Intelligence", ICML; the ``lr·g^2`` surrogate
    follows the Mammoth library, Buzzega et al. 2020, "Dark Experience for General Continual Learning", NeurIPS)."""

    name = "si"
    reads = ("reg.si_",)

    def setup(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, lambda n, p: True)  # full fine-tuning plus the penalty
        named = trainable_named(model)
        self.names = [n for n, _ in named]
        self.anchor = _detached(p for _, p in named)  # theta* = theta_0 before the first task
        self.omega_small = [torch.zeros_like(p) for p in self.anchor]
        self.omega_big = [torch.zeros_like(p) for p in self.anchor]
        self.consolidated = False  # Omega is all zeros until the first task ends: skip the penalty's cost
        return model

    def _params(self, model: nn.Module) -> Tensors:
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def steady_state(self, model: nn.Module) -> None:
        self.omega_big = [torch.full_like(p, 1e-3) for p in self.anchor]
        self.consolidated = True

    def extra_cost(self) -> ExtraCost:
        # per step the penalty and omega += lr g^2 (2 per parameter); per task Omega += omega / ((theta - theta*)^2
        # + xi) (5 per parameter)
        return ExtraCost(step_flops_per_param=PENALTY_FLOPS_PER_PARAM + 2.0, task_flops_per_param=5.0)

    def extra_loss(self, model: nn.Module, t: int) -> torch.Tensor | None:
        if not self.consolidated:
            return None
        return self.cfg.reg.si_c * quadratic_penalty(self._params(model), self.anchor, self.omega_big)

    def after_step(self, model: nn.Module, t: int, step: int, lr: float) -> None:
        pairs = [(o, p.grad) for o, p in zip(self.omega_small, self._params(model)) if p.grad is not None]
        if pairs:
            omegas, grads = map(list, zip(*pairs))
            torch._foreach_addcmul_(omegas, grads, grads, value=lr)

    def after_task(self, model: nn.Module, t: int, task_losses: TaskLosses) -> None:
        params = _detached(self._params(model))
        si_importance(self.omega_big, self.omega_small, params, self.anchor, self.cfg.reg.si_xi)
        self.anchor = params
        torch._foreach_zero_(self.omega_small)
        self.consolidated = True

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": _pack(self.names, self.anchor), "omega_small": _pack(self.names, self.omega_small),
                "omega_big": _pack(self.names, self.omega_big), "consolidated": self.consolidated}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.anchor[0].device
        self.anchor = _unpack(self.names, state["anchor"], device, "anchor")
        self.omega_small = _unpack(self.names, state["omega_small"], device, "omega_small")
        self.omega_big = _unpack(self.names, state["omega_big"], device, "omega_big")
        self.consolidated = bool(state["consolidated"])
