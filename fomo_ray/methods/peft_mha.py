"""A numerically identical swap of ``nn.MultiheadAttention`` for attention built from four ``nn.Linear`` layers.

Why: open_clip's blocks hold ``nn.MultiheadAttention`` (MHA), which keeps q/k/v in one packed ``in_proj_weight``
Parameter and reads ``out_proj.weight`` directly inside ``F.multi_head_attention_forward``. peft therefore cannot
reach attention properly: DoRA and VeRA accept ``nn.Linear`` only, and LoRA on ``attn.out_proj`` alone is a silent
no-op (the adapter's forward is never called). :class:`LinearAttention` computes exactly what MHA computes, but with
``q_proj``/``k_proj``/``v_proj``/``out_proj`` as ordinary ``nn.Linear`` modules that every peft tuner can wrap.

``swap_attention(model)`` replaces every MHA (self-attention, equal q/k/v dims) in place, copying the weights;
``unswap_attention(model)`` restores open_clip's layout (e.g. to export a checkpoint ``create_backbone`` can load).
The swap is proven exact (fp32 tolerance, incl. the text tower's causal mask) in ``tests/test_attention_swap.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out ``nn.Linear`` layers; a drop-in for MHA's call signature.

    Computes ``softmax(q k^T / sqrt(d_head) + mask) v`` per head via ``F.scaled_dot_product_attention``, the same
    kernel MHA uses, so outputs agree with MHA to fp32 rounding.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "LinearAttention":
        """A LinearAttention holding copies of ``mha``'s weights (same device and dtype)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only plain self-attention MHA (kdim == vdim == embed_dim, no bias_k/zero_attn) "
                             "can be swapped; this one has a different layout")
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, bias=has_bias, dropout=mha.dropout, batch_first=mha.batch_first)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for i, lin in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
                lin.weight.copy_(mha.in_proj_weight[rows])
                if has_bias:
                    lin.bias.copy_(mha.in_proj_bias[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def to_mha(self) -> nn.MultiheadAttention:
        """The inverse of :meth:`from_mha` (peft adapters must be merged/unloaded first)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if type(lin) is not nn.Linear:
                raise ValueError(f"cannot unswap: {type(lin).__name__} is not a plain nn.Linear "
                                 "(merge_and_unload the peft adapters first)")
        w = self.q_proj.weight
        has_bias = self.q_proj.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.train(self.training)
        return mha

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape  # [N, L, E] -> [N, heads, L, head_dim]
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """Same arguments and mask semantics as ``nn.MultiheadAttention.forward`` (bool masks: True = blocked;
        float masks are added); returns ``(output, None)`` because attention weights are never materialised."""
        if need_weights:
            raise ValueError("LinearAttention does not return attention weights (need_weights=True)")
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:  # MHA's seq-first layout [L, N, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _combine_masks(attn_mask, key_padding_mask, n, self.num_heads, length, k.shape[2], q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MHA semantics: a bool mask marks blocked positions (True); a float mask is added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _combine_masks(attn_mask, key_padding_mask, n, heads, length, src_len, dtype):
    """One additive mask broadcastable to [N, heads, L, S] from MHA's 2-D/3-D attn_mask and [N, S] padding mask."""
    mask = None
    if attn_mask is not None:
        mask = _as_additive(attn_mask, dtype)
        if mask.dim() == 3:  # MHA's [N*heads, L, S]
            mask = mask.view(n, heads, length, src_len)
    if key_padding_mask is not None:
        pad = _as_additive(key_padding_mask, dtype).view(n, 1, 1, src_len)
        mask = pad if mask is None else mask + pad
    return mask


def swap_attention(model: nn.Module) -> int:
    """Replace every self-attention ``nn.MultiheadAttention`` in ``model`` by a :class:`LinearAttention` with the
    same weights, in place. Returns how many were swapped (0 when already swapped: the call is idempotent)."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LinearAttention.from_mha(mha))
    return len(targets)


def unswap_attention(model: nn.Module) -> int:
    """Restore ``nn.MultiheadAttention`` everywhere :func:`swap_attention` put a :class:`LinearAttention`."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LinearAttention)]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, lin.to_mha())
    return len(targets)
