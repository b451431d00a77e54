"""One training step measured for the budget (fomo_ray/budgets/budget.py): FLOPs counted by ``FlopCounterMode``, memory
on CUDA from the allocator's peak and on the CPU by an analytic count (parameters, gradients, optimizer and method
state, every tensor saved for backward), either counted directly at the global batch on fake tensors (shapes without
data: nothing is allocated) or measured at two small batches and extended exactly along the line through them (FLOPs and
saved activations are linear in the batch, the contrastive loss's b x b logits are measured alone at the full batch,
state is constant). No real pass runs over more than a rank's batch (Roth et al. 2024, arXiv 2408.14471, Sec. 3;
docs/BENCHMARK.md §Budgets)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fomo_ray.maths.memory_saving import block_ledger

log = logging.getLogger(__name__)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that nn.MultiheadAttention uses on
# CPU; the same formulas apply (they only read the q/k/v shapes), so CPU and GPU counts agree.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class BudgetError(ValueError):
    """A budget that cannot be met (fewer than one step per task) or an unusable measurement; names the method."""


# --------------------------------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class StepMeasure:
    """One training step of one prepared model.

    ``peak_bytes`` combines a batch-independent part ``state_bytes`` and a part ``batch_bytes`` that grows with the
    batch: ``cpu_analytic`` memory is their sum (parameters and buffers + gradients + AdamW state + method state;
    tensors saved for backward), ``cuda_max_allocated`` memory their maximum (the optimizer step's allocator peak; the
    forward + backward peak). ``loss_input`` is what the contrastive loss was given: (feature dimension, feature
    dtype, which of its terms need a gradient: image and text features, scale[, bias]), so that the loss alone can
    be measured at another batch."""

    gflops: float          # counted by FlopCounterMode over forward + backward + optimizer step
    peak_bytes: int        # see memory_kind
    memory_kind: str       # "cpu_analytic" | "cuda_max_allocated"
    trainable_params: int
    total_params: int
    flops: int = 0         # the exact count behind gflops
    state_bytes: int = 0
    batch_bytes: int = 0
    loss_input: tuple[int, str, tuple[bool, ...]] | None = None
    #: ``batch_bytes`` as it would be with ``backbone.grad_checkpointing`` (``memory_saving.block_ledger`` over the
    #: same count: saved outside the blocks + every block's input + one block's saved tensors); CPU only, 0 on CUDA
    checkpointed_bytes: int = 0


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    # the storage itself (shared by every view of it), not its data pointer: fake tensors have no data
    return (str(t.device), t.untyped_storage()._cdata)


def _unique_bytes(tensors, skip: set | None = None) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        key = _storage_key(t)
        if skip is None or key not in skip:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def clip_batch(batch_size: int, image_size: int, context_length: int, vocab_size: int, device: torch.device):
    """A fixed synthetic batch: FLOPs and memory do not depend on the values, only on the shapes (under a
    ``FakeTensorMode`` the batch is fake too: shapes without data)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, vocab_size - 1, (batch_size, context_length), generator=g)
    tokens[:, -1] = vocab_size - 1  # the end-of-text token (largest id) is where open_clip pools the text
    return images.to(device), tokens.to(device)


def _loss_terms(out) -> tuple:
    """(image features, text features, scale[, bias]) of the model output (open_clip's tuple or dict form)."""
    if isinstance(out, dict):
        bias = out.get("logit_bias")
        return (out["image_features"], out["text_features"], out["logit_scale"], *(() if bias is None else (bias,)))
    return tuple(out[:4])


def clip_loss(out) -> torch.Tensor:
    """The loop's training loss (``losses.contrastive_loss``: InfoNCE, or SigLIP's sigmoid loss for a model with a
    ``logit_bias``) on the model output (open_clip's tuple or dict form)."""
    from fomo_ray.maths.losses import contrastive_loss

    return contrastive_loss(*_loss_terms(out))


def _fake_mode(tensors: Sequence[torch.Tensor]):
    """The ``FakeTensorMode`` of fake (shape-only) tensors, or None for real ones."""
    return next((t.fake_mode for t in tensors if hasattr(t, "fake_mode")), None)


def measure_step(model: nn.Module, trainable_params: Sequence[nn.Parameter], batch_size: int, image_size: int,
                 context_length: int, extra_loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", *, method_state: Sequence[torch.Tensor] = (),
                 autocast_dtype: torch.dtype | None = None) -> StepMeasure:
    """Run one real training step of ``model`` (CLIP loss + ``extra_loss_fn`` forward/backward, AdamW step over
    ``trainable_params``) and return its FLOPs and peak memory. The model is trained by one step: pass a copy.

    ``method_state``: tensors the method keeps during training (e.g. EWC's Fisher and anchor), counted in the CPU
    memory figure (on CUDA they are part of the allocated memory anyway).

    A model whose parameters are fake (:func:`fake_model`: shapes without data) is *counted*, not run: the same
    forward and backward dispatch through ``FakeTensorMode``, so FlopCounterMode and the saved-tensor hooks see the
    same operations and shapes at no memory and almost no time, at any batch size (the AdamW step, matmul-free and
    counted analytically anyway, is left out; it needs real step counters).
    """
    device = torch.device(device)
    trainable = list(trainable_params)
    if not trainable:
        raise BudgetError("measure_step: no trainable parameter, nothing to train")
    fake = _fake_mode(trainable)
    model.train()
    for p in trainable:
        p.grad = None  # a model measured before (another batch size) starts from the same state
    vocab = int(getattr(model, "vocab_size", 0) or 49408)
    # parameters and method state are counted once below, not again when autograd saves them
    counted_keys = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *method_state]}
    saved: dict[tuple[str, int], int] = {}
    alive: list[torch.Tensor] = []  # hold every saved tensor until the count is done: a freed storage's address
    # can be reused by a later tensor (seen with DoRA's dropped graph branches), which made the dedup undercount
    cuda = device.type == "cuda" and fake is None
    # the model is measured without checkpointing; the ledger says what checkpointing would keep of the same count
    ledger = contextlib.nullcontext(None) if cuda else block_ledger(model)
    loss_input: list[tuple[int, str, tuple[bool, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not cuda:  # on CUDA the allocator's peak is the figure; holding tensors would inflate it
            alive.append(t)
        key = _storage_key(t)
        if key not in counted_keys and key not in saved and t.device.type != "meta":
            saved[key] = t.untyped_storage().nbytes()
            if blocks is not None:
                blocks.add(saved[key])
        return t

    def recorded_loss(out) -> torch.Tensor:  # the loop's loss, noting what it was given
        terms = _loss_terms(out)
        loss_input.append((int(terms[0].shape[-1]), str(terms[0].dtype).removeprefix("torch."),
                           tuple(bool(t.requires_grad) for t in terms)))
        return clip_loss(out)

    fwd_bwd_peak = 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with fake if fake is not None else contextlib.nullcontext(), \
            _CpuKernelDtypes() if fake is not None else contextlib.nullcontext(), ledger as blocks:
        images, tokens = clip_batch(batch_size, image_size, context_length, vocab, device)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5) if fake is None else None
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                loss = recorded_loss(model(images, tokens))
                extra = extra_loss_fn(model) if extra_loss_fn is not None else None
                if extra is not None:
                    loss = loss + extra
            loss.backward()
            if cuda:  # the forward + backward peak grows with the batch, the optimizer step's does not
                torch.cuda.synchronize(device)
                fwd_bwd_peak = int(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            if optimizer is not None:
                optimizer.step()
    if fake is None and not torch.isfinite(loss.detach()):
        raise BudgetError(f"measure_step: the measured step's loss is not finite ({float(loss)})")
    if cuda:
        torch.cuda.synchronize(device)
        state, batch, kind = int(torch.cuda.max_memory_allocated(device)), fwd_bwd_peak, "cuda_max_allocated"
        peak = max(state, batch)
    else:
        model_bytes = _unique_bytes(list(model.parameters()) + list(model.buffers()))
        trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
        # params + grads + AdamW (exp_avg, exp_avg_sq) + method state; activations saved for backward
        state = model_bytes + 3 * trainable_bytes + _unique_bytes(method_state)
        batch, kind = sum(saved.values()), "cpu_analytic"
        peak = state + batch
    for p in trainable:
        p.grad = None
    flops = int(counter.get_total_flops())
    return StepMeasure(gflops=flops / 1e9, peak_bytes=peak, memory_kind=kind,
                       trainable_params=sum(p.numel() for p in trainable),
                       total_params=sum(p.numel() for p in model.parameters()), flops=flops, state_bytes=state,
                       batch_bytes=batch, loss_input=loss_input[0] if loss_input else None,
                       checkpointed_bytes=int(blocks.checkpointed_bytes()) if blocks is not None else 0)


class _CpuKernelDtypes(TorchDispatchMode):
    """Under a count on fake tensors: output dtypes as the real CPU kernels give them where the fake (meta) kernel's
    differ, so that saved tensors are counted at their real size. Layer and batch norm of a bf16/fp16 input with
    float32 parameters (autocast) keep the mean and inverse standard deviation they save for backward in float32;
    their meta kernels return them in the input's dtype (torch 2.14; ``tests/test_budget_scaling.py`` compares
    counts with real steps)."""

    NORMS = ("native_layer_norm", "native_batch_norm", "_native_batch_norm_legit", "_batch_norm_with_update")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.NORMS and isinstance(out, tuple) and len(out) >= 3:
            param = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)  # weight (or running mean)
            reduced = (torch.bfloat16, torch.float16)
            if param is not None and param.dtype == torch.float32 and args[0].dtype in reduced:
                out = (out[0], *(t.float() if t.dtype in reduced else t for t in out[1:3]), *out[3:])
        return out


def measure_loss(batch_size: int, loss_input: tuple[int, str, tuple[bool, ...]], device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(FLOPs, bytes saved for backward) of the contrastive loss alone, forward + backward, on ``batch_size`` rows of
    features as the model gives them (``StepMeasure.loss_input``). Its ``b x b`` logits make it the one part of a
    step that is not linear in the batch; every data-parallel rank computes it over the whole gathered batch, so
    measuring it at the global batch runs nothing larger than a rank does (a few MB at b = 512)."""
    from fomo_ray.maths.losses import contrastive_loss

    device = torch.device(device)
    dim, dtype, grads = loss_input
    g = torch.Generator().manual_seed(0)
    features = [torch.nn.functional.normalize(torch.randn(batch_size, dim, generator=g), dim=-1)
                .to(device=device, dtype=getattr(torch, dtype)) for _ in range(2)]
    terms = [*features, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)][:len(grads)]
    for t, grad in zip(terms, grads):  # a frozen tower's features need no gradient, and the loss computes none
        t.requires_grad_(grad)
    saved: dict[tuple[str, int], int] = {}
    alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        alive.append(t)
        saved[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                loss = contrastive_loss(*terms)
            loss.backward()
    return int(counter.get_total_flops()), sum(saved.values())


def _on_line(b1: int, v1: int, b2: int, v2: int, b: int) -> int:
    """The value at ``b`` on the line through (b1, v1) and (b2, v2), exact in integers (per-sample FLOPs and bytes are
    whole numbers, so the slope divides; rounded to the nearest integer if a measurement was not exactly linear)."""
    return v2 + round(Fraction((v2 - v1) * (b - b2), b2 - b1))


def scale_step(points: Mapping[int, StepMeasure], batch_size: int, device: str | torch.device = "cpu",
               autocast_dtype: torch.dtype | None = None) -> StepMeasure:
    """The step at ``batch_size`` from real steps at two small batches (``points``: batch -> measure).

    Exact on the analytic (CPU) figures: a step's FLOPs and saved activations are the model's, linear in the batch
    (every matmul, convolution, attention and saved tensor has the batch dimension; parameter-shaped work does
    not), plus the loss's, which is not (its ``b x b`` logits). So the loss alone is measured at each batch
    (:func:`measure_loss`), the rest is extended along the line through the two points, and the loss at
    ``batch_size`` is added back. Parameter, gradient, optimizer and method state do not depend on the batch.

    On CUDA the allocator's forward + backward peak is extended along the same line (activations dominate it; it is
    only as linear as the allocator's rounding, and the loss's logits, a few MB at b = 512, are left in the line)
    and the optimizer step's peak is taken as it is; the figure is their maximum."""
    (b1, m1), (b2, m2) = sorted(points.items())[:2]
    if m1.loss_input != m2.loss_input or m1.memory_kind != m2.memory_kind:
        raise BudgetError(f"scale_step: the steps at b={b1} and b={b2} differ in kind ({m1.memory_kind}, "
                          f"{m1.loss_input} vs {m2.memory_kind}, {m2.loss_input})")
    loss = {b: measure_loss(b, m2.loss_input, device, autocast_dtype) for b in {b1, b2, batch_size}}
    flops = _on_line(b1, m1.flops - loss[b1][0], b2, m2.flops - loss[b2][0], batch_size) + loss[batch_size][0]
    if m2.memory_kind == "cpu_analytic":
        if m1.state_bytes != m2.state_bytes:
            raise BudgetError(f"scale_step: the batch-independent memory differs between b={b1} and b={b2} "
                              f"({m1.state_bytes} vs {m2.state_bytes} bytes)")
        batch = (_on_line(b1, m1.batch_bytes - loss[b1][1], b2, m2.batch_bytes - loss[b2][1], batch_size)
                 + loss[batch_size][1])
        # the loss's saved tensors lie outside every block, so they are in the checkpointed figure too
        ckpt = (_on_line(b1, m1.checkpointed_bytes - loss[b1][1], b2, m2.checkpointed_bytes - loss[b2][1],
                         batch_size) + loss[batch_size][1])
        state, peak = m2.state_bytes, m2.state_bytes + batch
    else:
        batch = _on_line(b1, m1.batch_bytes, b2, m2.batch_bytes, batch_size)
        ckpt = 0
        state = max(m1.state_bytes, m2.state_bytes)
        peak = max(state, batch)
    return dataclasses.replace(m2, gflops=flops / 1e9, flops=flops, peak_bytes=peak, state_bytes=state,
                               batch_bytes=batch, checkpointed_bytes=ckpt)


def unfilled(factory: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """``factory()``'s model on ``device`` with its weights left unfilled: built on the meta device, so none of its
    initialisers run (a ViT-B/16's random fills alone take seconds per model on a CPU, and a sweep's estimate builds
    one per method), then given empty storage. Only for a model made fake at once (:func:`fake_model`): its values
    are garbage. A build the meta device cannot run is built as usual."""
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # noqa: BLE001 - e.g. a constructor that reads a value back (.item()): build it for real
        return factory().to(device)
    return model.to_empty(device=device)


def fake_model(model: nn.Module) -> nn.Module:
    """Replace ``model``'s parameters and buffers, in place, by fake tensors of the same shapes, dtypes and devices
    (``torch._subclasses.FakeTensorMode``: metadata without data), so that :func:`measure_step` counts a step
    without allocating or computing. The real tensors are released; tied parameters stay tied."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # one mode per model: a model made fake again (after a method added real adapters to it) keeps its mode;
    # real tensors a method keeps beside the model are converted on use
    mode = _fake_mode([*model.parameters(), *model.buffers()]) or FakeTensorMode(allow_non_fake_inputs=True)
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and not hasattr(p, "fake_mode"):
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
                module._parameters[key] = params[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None and not hasattr(b, "fake_mode"):
                module._buffers[key] = mode.from_tensor(b)
    return model
