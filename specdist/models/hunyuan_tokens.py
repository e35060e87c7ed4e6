"""HunyuanVideo's joint attention with queries from selected tokens only (``cache.granularity: token``).

The same arithmetic as diffusers' ``HunyuanVideoAttnProcessor2_0`` (projections, QK norms, RoPE
on the video stream, the key padding mask, the attention backend and the output projections),
except that queries — and everything after the attention — are computed for the selected rows
only, while keys and values come from every token. With every token selected the result is
bit-identical to the processor's. Pure tensor code on the module's own layers.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .base import gather_rows


def rotary_rows(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_emb(x, rope, sequence_dim=1)`` for rows at token positions ``index [B, k]``:
    ``x [B, k, H, d]``, ``rope`` = (cos, sin) each ``[N, d]`` over every position."""
    cos, sin = (f.to(x.device)[index.to(x.device)][:, :, None, :] for f in rope)  # [B, k, 1, d]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(2, (attn.heads, -1))


def _normed(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, or ``x`` when the attention has no such norm."""
    return x if norm is None else norm(x)


def joint_attention_subset(attn: nn.Module, video: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
                           rope: tuple[torch.Tensor, torch.Tensor] | None, video_index: torch.Tensor,
                           text_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``([B, kv, D], [B, kt, D])`` of the selected video and text tokens of one joint
    attention call (``video [B, N, D]``, ``text [B, T, D]`` normalised inputs; ``mask`` the
    model's ``[B, 1, 1, N + T]`` key mask; indices ``[B, kv]`` / ``[B, kt]`` sorted). Dual-stream
    blocks (``attn.add_q_proj``) project text with the added projections and apply the output
    projections; single-stream blocks project ``[video, text]`` together and return the heads'
    output (their ``proj_out`` follows in the block)."""
    processor = attn.processor
    b, n = video.shape[:2]
    kv, kt = video_index.shape[1], text_index.shape[1]
    dual = attn.add_q_proj is not None
    if kv + kt == 0:
        width_v = attn.to_out[0].out_features if dual else attn.to_q.out_features
        width_t = attn.to_add_out.out_features if dual else attn.to_q.out_features
        return video.new_zeros((b, 0, width_v)), text.new_zeros((b, 0, width_t))
    if dual:
        query = _heads(attn, attn.to_q(gather_rows(video, video_index)))
        key, value = _heads(attn, attn.to_k(video)), _heads(attn, attn.to_v(video))
    else:
        joint = torch.cat([video, text], dim=1)
        rows = torch.cat([video_index, text_index + n], dim=1)
        query = _heads(attn, attn.to_q(gather_rows(joint, rows)))
        key, value = _heads(attn, attn.to_k(joint)), _heads(attn, attn.to_v(joint))
    query, key = _normed(attn.norm_q, query), _normed(attn.norm_k, key)
    if rope is not None:
        if dual:
            query = rotary_rows(query, rope, video_index)
            key = apply_rotary_emb(key, rope, sequence_dim=1)
        else:
            query = torch.cat([rotary_rows(query[:, :kv], rope, video_index), query[:, kv:]], dim=1)
            key = torch.cat([apply_rotary_emb(key[:, :n], rope, sequence_dim=1), key[:, n:]], dim=1)
    if dual:
        eq = _heads(attn, attn.add_q_proj(gather_rows(text, text_index)))
        ek, ev = _heads(attn, attn.add_k_proj(text)), _heads(attn, attn.add_v_proj(text))
        eq, ek = _normed(attn.norm_added_q, eq), _normed(attn.norm_added_k, ek)
        query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=processor._attention_backend, parallel_config=processor._parallel_config)
    out = out.flatten(2, 3).to(query.dtype)
    out_video, out_text = out[:, :kv], out[:, kv:]
    if getattr(attn, "to_out", None) is not None:
        out_video = attn.to_out[1](attn.to_out[0](out_video))
    if getattr(attn, "to_add_out", None) is not None:
        out_text = attn.to_add_out(out_text)
    return out_video, out_text
