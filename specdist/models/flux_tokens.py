"""FLUX's attention with queries from selected tokens only (``cache.granularity: token``).

The arithmetic of diffusers' ``FluxAttnProcessor`` (projections, the RMS norms over the heads,
RoPE over the joint ``[text, image]`` positions, the attention backend and the output
projections), except that queries — and everything after the attention — are computed for the
selected rows only, while keys and values come from every token. Dual-stream blocks attend over
``[text, image]`` built from their two streams; single-stream blocks get that sequence joined by
the block (the ``joint_text_first`` stream). With every token selected the result is
bit-identical to the processor's. Pure tensor code on the module's own layers.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..errors import UnsupportedError
from .base import gather_rows
from .hunyuan_tokens import rotary_rows


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


def _check(attn: nn.Module, mask: torch.Tensor | None) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if not isinstance(attn.processor, FluxAttnProcessor) or getattr(attn, "fused_projections", False):
        raise UnsupportedError(f"FLUX token level: attention processor {type(attn.processor).__name__} "
                                  "(IP-adapter or fused projections) is not supported; use 'block'")
    if mask is not None and (mask.ndim != 4 or mask.shape[-2] != 1):
        raise UnsupportedError("FLUX token level: only key masks ([B, 1, 1, S]) can be used with a query subset")


def _attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            rope: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Heads' output ``[B, k, H·d]`` of queries at joint positions ``rows [B, k]`` over every key."""
    if rope is not None:
        query = rotary_rows(query, rope, rows)
        key = apply_rotary_emb(key, rope, sequence_dim=1)
    processor = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=processor._attention_backend,
                                parallel_config=processor._parallel_config)
    return out.flatten(2, 3).to(query.dtype)


def dual_attention_subset(attn: nn.Module, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
                          rope: tuple[torch.Tensor, torch.Tensor] | None, image_index: torch.Tensor,
                          text_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``([B, ki, D], [B, kt, D])`` of the selected image and text tokens of a dual-stream
    block's joint attention (``image [B, N, D]``, ``text [B, T, D]`` its normalised inputs; indices
    ``[B, ki]`` / ``[B, kt]`` sorted; ``rope`` over ``[text, image]``)."""
    _check(attn, mask)
    b, kt = image.shape[0], text_index.shape[1]
    if image_index.shape[1] + kt == 0:
        return image.new_zeros((b, 0, attn.to_out[0].out_features)), text.new_zeros((b, 0, attn.to_add_out.out_features))
    query = attn.norm_q(_heads(attn, attn.to_q(gather_rows(image, image_index))))
    key = attn.norm_k(_heads(attn, attn.to_k(image)))
    value = _heads(attn, attn.to_v(image))
    text_query = attn.norm_added_q(_heads(attn, attn.add_q_proj(gather_rows(text, text_index))))
    text_key = attn.norm_added_k(_heads(attn, attn.add_k_proj(text)))
    text_value = _heads(attn, attn.add_v_proj(text))
    rows = torch.cat([text_index, image_index + text.shape[1]], dim=1)
    out = _attend(attn, torch.cat([text_query, query], 1), torch.cat([text_key, key], 1),
                  torch.cat([text_value, value], 1), rope, rows, mask)
    out_text, out_image = out[:, :kt], out[:, kt:]
    out_image = attn.to_out[1](attn.to_out[0](out_image.contiguous()))
    return out_image, attn.to_add_out(out_text.contiguous())


def single_attention_subset(attn: nn.Module, joint: torch.Tensor, mask: torch.Tensor | None,
                            rope: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor) -> torch.Tensor:
    """Heads' output ``[B, k, D]`` of the selected rows ``rows [B, k]`` (sorted positions in
    ``[text, image]``) of a single-stream block's attention on ``joint [B, T + N, D]``."""
    _check(attn, mask)
    if rows.shape[1] == 0:
        return joint.new_zeros((joint.shape[0], 0, attn.to_q.out_features))
    query = attn.norm_q(_heads(attn, attn.to_q(gather_rows(joint, rows))))
    key = attn.norm_k(_heads(attn, attn.to_k(joint)))
    return _attend(attn, query, key, _heads(attn, attn.to_v(joint)), rope, rows, mask)
