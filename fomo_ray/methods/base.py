"""The ``Method`` base class: a few named hooks through which a continual-update method plugs into the loop.

Hooks *return* values; the loop (``fomo_ray/core/loop.py``) applies them. A method never touches the optimizer, the data
or the results. Order of calls (see the loop's module docstring for the full pseudocode)::

    model = method.setup(model)                         # once: freeze / wrap (peft) / remember theta_0
    plan  = method.task_plan(task_rows, steps_per_task)  # which data and how many steps each task gets
    for t:
        weights = method.training_weights(t, model)     # None = continue from the weights in the model
        for step: loss = clip + method.extra_loss(model, t); ...; method.after_step(model, t, step, lr)
        method.after_task(model, t, task_losses)        # Fisher / Omega / merge bookkeeping
        evaluate(method.deployed_weights(t, model))

The budget (``fomo_ray/budgets/budget.py``) asks a method for its own costs through two more hooks: ``steady_state``
puts it in the state it trains in after the first task (so one measured step runs the real ``extra_loss`` and holds the
real state tensors) and ``extra_cost`` declares the work the FLOP counter cannot see. A new regulariser is thus
charged correctly without touching the budget.

``model`` always holds the *raw trained* weights theta_t when a hook is called (the loop swaps deployed weights in
for evaluation and back out afterwards). Everything a method needs for an exact resume (theta_0, merge history,
Fisher, Omega, ...) goes through ``state_dict()`` / ``load_state_dict()``; adapters live in the model's own state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from fomo_ray.config import MethodConfig, flatten
from fomo_ray.costs import ExtraCost


StateDict = dict[str, torch.Tensor]



class TaskLosses(Protocol):
    """What ``after_task`` gets: sums over batches of the task's update data D_t, given how to reduce one batch."""

    def sum_over(self, n: int, per_batch: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``sum(per_batch(loss_k) for k < n)``, ``loss_k`` the CLIP loss of batch k of D_t (a fresh forward pass
        with a graph). Under data parallelism every batch is sharded like training (each rank encodes its shard,
        the loss is the global batch's over the gathered features, the gradients are averaged over the ranks), so
        every rank gets the one-process sum (up to summation order)."""
        ...

@dataclass(frozen=True)
class TaskPlan:
    """What one task of the stream trains on: the train-split row ids of its update data and its step count."""

    rows: np.ndarray
    steps: int


class Method:
    """Base class: plain fine-tuning semantics (train everything, continue from theta_{t-1}, deploy theta_t)."""

    #: the method's name (``method.name``; docs/BENCHMARK.md §Methods); set by each subclass, the registry key
    name: ClassVar[str] = "method"
    #: the registered method whose training step this one's costs exactly (budget.steps_per_task measures that one),
    #: e.g. merges and joint training train like full fine-tuning (merging is counted free, docs/BENCHMARK.md §Budgets)
    cost_as: ClassVar[str | None] = None
    #: the registered method whose training step this one's training step is, with this method's own
    #: ``extra_cost`` charged on top (a continual merge operator: fine-tuning's step plus its SVDs per task)
    step_as: ClassVar[str | None] = None
    #: ``method.*`` settings (relative, prefixes allowed) that change this method's cost beyond the peft/reg
    #: sections: the budget keys its cached measurement by their values (e.g. ZSCL's reference batch)
    cost_reads: ClassVar[tuple[str, ...]] = ()
    #: pool samples this method wants as a fixed reference set (ZSCL); the assembly hands them to
    #: :meth:`use_reference` once, decoded and normalised like training inputs. 0: none
    reference_size: int = 0
    #: the ``method.*`` settings this method reads, relative to ``method.`` ("peft." covers a section, "reg.si_" a
    #: family of keys): a run logs only the settings that apply to its method, so e.g. a fine-tuning run never shows
    #: (or plots at) the default merge weight. tests/test_method_params.py checks the declaration of every registered
    #: method against the keys its hooks really read.
    reads: ClassVar[tuple[str, ...]] = ()
    #: False for a method that never takes a training step (zero_shot): no optimizer / schedule / mixture / budget
    #: setting applies to it then
    trains: ClassVar[bool] = True

    @classmethod
    def config_keys(cls, cfg: MethodConfig) -> tuple[str, ...]:
        """The settings of ``cfg`` (dotted, relative to ``method.``) that change what this method does, besides its
        name. Declared by :attr:`reads`; a method whose keys depend on other settings overrides this."""
        return tuple(k for k in flatten(cfg) if k != "name" and k.startswith(cls.reads))

    def __init__(self, cfg: MethodConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)  # the experiment seed, for methods that draw (e.g. DARE masks)

    # ----------------------------------------------------------------------------------------------- hooks
    def setup(self, model: nn.Module) -> nn.Module:
        """Prepare the model once before the stream (freeze parameters, inject adapters); return the model to train."""
        return model

    def task_plan(self, task_rows: list[np.ndarray], steps_per_task: int) -> list[TaskPlan]:
        """The tasks actually trained: by default every stream task with the budget's step count."""
        return [TaskPlan(rows, steps_per_task) for rows in task_rows]

    def training_weights(self, t: int, model: nn.Module) -> StateDict | None:
        """Weights task ``t`` starts from; ``None`` continues from the weights the model holds (theta_{t-1})."""
        return None

    def use_reference(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        """Take the fixed reference set of :attr:`reference_size` pool samples (model-ready images on the training
        device and their caption token ids), given once before the stream. Only methods that distil need it."""

    def extra_loss(self, model: nn.Module, t: int) -> torch.Tensor | None:
        """A term added to the CLIP loss at every step (regularisers); ``None`` adds nothing."""
        return None

    def after_step(self, model: nn.Module, t: int, step: int, lr: float) -> None:
        """Method-internal bookkeeping after each optimizer step (gradients are still in ``p.grad``)."""

    def after_task(self, model: nn.Module, t: int, task_losses: "TaskLosses") -> None:
        """Bookkeeping after task ``t``. ``task_losses`` sums statistics of the CLIP loss over batches of the task's
        update data (:class:`TaskLosses`): EWC's Fisher needs gradients of the task loss, and this way no method
        needs the data, the tokenizer, the loss function or the data-parallel ranks."""

    def deployed_weights(self, t: int, model: nn.Module) -> StateDict:
        """The weights evaluated/served after task ``t``; by default the trained weights themselves."""
        return model.state_dict()

    # ----------------------------------------------------------------------------------------------- cost
    def steady_state(self, model: nn.Module) -> None:
        """Put the freshly set-up method into the state it trains in after the first task (e.g. EWC with a Fisher and
        an anchor), so the budget's one measured step includes its real ``extra_loss`` and state tensors (those in
        :meth:`state_dict`). Methods without per-task state need nothing."""

    def extra_cost(self) -> ExtraCost:
        """Work beyond the measured training step that the FLOP counter cannot see: elementwise optimizer-side
        FLOPs per step and per-task passes. The budget charges exactly this."""
        return ExtraCost()

    # ----------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the model's own state needed to continue the stream exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"method '{self.name}' keeps no state but was given keys {sorted(state)}")


# --------------------------------------------------------------------------------------------------- helpers
def freeze_all_but(model: nn.Module, keep) -> list[str]:
    """Set ``requires_grad`` to ``keep(name, param)`` for every parameter; return the trainable names.

    Raises when nothing stays trainable, which would silently turn a method into zero-shot."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name, p)))
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError("the method's parameter selection left no trainable parameter in the model")
    return trainable


def clone_state(state: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> StateDict:
    """Detached copies (optionally moved), so later in-place training steps cannot change them."""
    return {k: v.detach().to(device=device, copy=True) if device is not None else v.detach().clone()
            for k, v in state.items()}

