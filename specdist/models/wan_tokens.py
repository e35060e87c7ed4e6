"""Wan's self-attention with queries from selected tokens only (``cache.granularity: token``).

The arithmetic of diffusers' ``WanAttnProcessor`` for a text-to-video self-attention (no image
context): projections, the RMS norms over the heads, Wan's interleaved RoPE, the backend and the
output projection — with the queries and everything after the attention on the selected rows, the
keys and values on every token. Bit-identical to the processor when every token is selected.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..errors import UnsupportedError
from .base import gather_rows


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def self_attention_subset(attn: nn.Module, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                          index: torch.Tensor) -> torch.Tensor:
    """``[B, k, D]`` output of the selected tokens ``index [B, k]`` of Wan's ``attn1`` on ``x [B, N, D]``;
    ``rotary`` = (cos, sin) each ``[1, N, 1, d]``."""
    if attn.add_k_proj is not None or attn.fused_projections:
        raise UnsupportedError("Wan token level: image-conditioned or fused attention is not supported")
    query = attn.norm_q(attn.to_q(gather_rows(x, index)))
    key, value = attn.norm_k(attn.to_k(x)), attn.to_v(x)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if rotary is not None:
        cos, sin = rotary
        pick = lambda f: f[0][index.to(f.device)]  # [B, k, 1, d]
        query = _rope(query, pick(cos), pick(sin))
        key = _rope(key, cos, sin)
    processor = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=processor._attention_backend, parallel_config=processor._parallel_config)
    out = out.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))
