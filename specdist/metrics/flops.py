"""Analytic FLOPs of one transformer forward (batch 1) for the supported diffusers families.

Conventions: one multiply-add = 2 FLOPs. Only matrix products are counted -- linear layers,
the convolutions that embed patches, and the two attention matmuls (``Q K^T`` and ``P V``);
norms, activations, softmax, RoPE, gating and residual adds are O(N·D) and ignored. This is what
``torch.utils.flop_counter.FlopCounterMode`` counts (with the math SDPA backend), so the two agree.

Notation: ``N`` image/video tokens after patchify, ``T`` text tokens, ``D = heads * head_dim``,
``lin(n, a, b) = 2 n a b``, ``attn(q, k) = 4 q k D``, ``mlp(n, a, h, b) = lin(n, a, h) + lin(n, h, b)``,
``temb(f) = mlp(1, f, D, D)`` (a per-sample ``TimestepEmbedding``, ``f = 256`` unless noted).

DiT (``BasicTransformerBlock``, ada_norm_zero; every block embeds the timestep itself)::

    block = temb(256) + lin(1, D, 6D) + 4 lin(N, D, D) + attn(N, N) + lin(N, D, gF) + lin(N, F, D)
    extra = lin(N, C p^2, D) [patch conv] + temb(256) + lin(1, D, 2D) + lin(N, D, p^2 C_out)

``F`` = ``ff_inner_dim`` or 4D; ``g`` = 2 for GEGLU/SwiGLU feed-forwards, else 1.

PixArt (``BasicTransformerBlock``, ada_norm_single: modulation is a table, no per-block linear)::

    block = 4 lin(N, D, D) + attn(N, N)                            # self-attention
          + 2 lin(N, D, D) + 2 lin(T, Dc, D) + attn(N, T)          # cross: q, out on N; k, v on T
          + lin(N, D, gF) + lin(N, F, D)
    extra = lin(N, C p^2, D) + temb(256) [+ size embeddings] + lin(1, D, 6D)
          + mlp(T, Cc, D, D) [caption projection] + lin(N, D, p^2 C_out)

FLUX and HunyuanVideo, dual-stream (MM-DiT) block, ``S = N + T``::

    block = 2 lin(1, D, 6D) + 4 lin(N, D, D) + 4 lin(T, D, D) + attn(S, S)
          + mlp(N, D, M, D) + mlp(T, D, M, D)

single-stream block (fused qkv+MLP input, no separate attention out-projection)::

    block = lin(1, D, 3D) + 3 lin(S, D, D) + lin(S, D, M) + attn(S, S) + lin(S, D + M, D)

``M = mlp_ratio * D`` (4D for FLUX). FLUX extra: ``lin(N, C_in, D) + lin(T, C_txt, D) + temb(256)
[+ guidance temb] + mlp(1, C_pool, D, D) + lin(1, D, 2D) + lin(N, D, p^2 C_out)``. HunyuanVideo
extra: ``lin(N, C pt p^2, D)`` patch conv, the text token refiner (``lin(T, C_txt, D)``; per refiner
layer ``4 lin(T, D, D) + attn(T, T) + mlp(T, D, 4D, D) + lin(1, D, 2D)``; plus ``temb(256) +
mlp(1, C_txt, D, D)``), the condition embedding ``temb(256) [+ guidance temb] + mlp(1, C_pool, D, D)``,
and the head ``lin(1, D, 2D) + lin(N, D, pt p^2 C_out)``. (The per-sample extras of the
``token_replace`` variant are ignored.)

Wan (self-attention, cross-attention to text [and, for I2V, ``I`` CLIP image tokens], FFN)::

    block = 4 lin(N, D, D) + attn(N, N) + 2 lin(N, D, D) + 2 lin(T, D, D) + attn(N, T)
          [+ 2 lin(I, Di, D) + attn(N, I)] + mlp(N, D, F, D)
    extra = lin(N, C prod(p), D) + temb(freq_dim) + lin(1, D, 6D) + mlp(T, C_txt, D, D)
          [+ mlp(I, Ci, Ci, D)] + lin(N, D, prod(p) C_out)

``F = ffn_dim``; ``I`` defaults to 257 (Wan 2.1 I2V) when the model has image cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["SUPPORTED_MODELS", "block_flops", "flops_breakdown", "forward_flops", "token_block_flops"]

_WAN_I2V_IMAGE_TOKENS = 257
_Counts = tuple[list[int], int]


def _lin(n: int, a: int, b: int) -> int:
    return 2 * n * a * b


def _attn(q: int, k: int, d: int) -> int:
    return 4 * q * k * d


def _mlp(n: int, a: int, h: int, b: int) -> int:
    return _lin(n, a, h) + _lin(n, h, b)


def _temb(d: int, f: int = 256) -> int:
    return _mlp(1, f, d, d)


def _ff(n: int, d: int, inner: int, activation: str) -> int:
    gate = 2 if activation in ("geglu", "swiglu") else 1
    return _lin(n, d, gate * inner) + _lin(n, inner, d)


def _dit(model: Any, n: int, t: int, _img: int | None) -> _Counts:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    c_out = c.out_channels or c.in_channels
    block = (_temb(d) + _lin(1, d, 6 * d) + 4 * _lin(n, d, d) + _attn(n, n, d)
             + _ff(n, d, 4 * d, c.activation_fn))
    extra = (_lin(n, c.in_channels * c.patch_size**2, d) + _temb(d) + _lin(1, d, 2 * d)
             + _lin(n, d, c.patch_size**2 * c_out))
    return [block] * c.num_layers, extra


def _pixart(model: Any, n: int, t: int, _img: int | None) -> _Counts:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    c_out = c.out_channels or c.in_channels
    block = 4 * _lin(n, d, d) + _attn(n, n, d) + _ff(n, d, 4 * d, c.activation_fn)
    if c.cross_attention_dim is not None:
        block += 2 * _lin(n, d, d) + 2 * _lin(t, c.cross_attention_dim, d) + _attn(n, t, d)
    extra = _lin(n, c.in_channels * c.patch_size**2, d) + _temb(d) + _lin(1, d, 6 * d)
    if getattr(model, "use_additional_conditions", False):
        s = d // 3
        extra += 3 * _temb(s)  # resolution (2 values) + aspect ratio (1 value), TimestepEmbedding(256 -> s -> s)
    if c.caption_channels is not None:
        extra += _mlp(t, c.caption_channels, d, d)
    extra += _lin(n, d, c.patch_size**2 * c_out)
    return [block] * c.num_layers, extra


def _dual(n: int, t: int, d: int, m: int) -> int:
    s = n + t
    return (2 * _lin(1, d, 6 * d) + 4 * _lin(n, d, d) + 4 * _lin(t, d, d) + _attn(s, s, d)
            + _mlp(n, d, m, d) + _mlp(t, d, m, d))


def _single(n: int, t: int, d: int, m: int) -> int:
    s = n + t
    return _lin(1, d, 3 * d) + 3 * _lin(s, d, d) + _lin(s, d, m) + _attn(s, s, d) + _lin(s, d + m, d)


def _flux(model: Any, n: int, t: int, _img: int | None) -> _Counts:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    c_out = c.out_channels or c.in_channels
    blocks = [_dual(n, t, d, 4 * d)] * c.num_layers + [_single(n, t, d, int(d * 4.0))] * c.num_single_layers
    extra = (_lin(n, c.in_channels, d) + _lin(t, c.joint_attention_dim, d) + _temb(d)
             + (_temb(d) if c.guidance_embeds else 0) + _mlp(1, c.pooled_projection_dim, d, d)
             + _lin(1, d, 2 * d) + _lin(n, d, c.patch_size**2 * c_out))
    return blocks, extra


def _hunyuan_video(model: Any, n: int, t: int, _img: int | None) -> _Counts:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    m = int(d * c.mlp_ratio)
    patch = c.patch_size_t * c.patch_size**2
    c_out = c.out_channels or c.in_channels
    blocks = [_dual(n, t, d, m)] * c.num_layers + [_single(n, t, d, m)] * c.num_single_layers
    refiner_layer = 4 * _lin(t, d, d) + _attn(t, t, d) + _mlp(t, d, 4 * d, d) + _lin(1, d, 2 * d)
    refiner = (_lin(t, c.text_embed_dim, d) + c.num_refiner_layers * refiner_layer
               + _temb(d) + _mlp(1, c.text_embed_dim, d, d))
    condition = _temb(d) + (_temb(d) if c.guidance_embeds else 0) + _mlp(1, c.pooled_projection_dim, d, d)
    extra = (_lin(n, c.in_channels * patch, d) + refiner + condition
             + _lin(1, d, 2 * d) + _lin(n, d, patch * c_out))
    return blocks, extra


def _wan(model: Any, n: int, t: int, image_tokens: int | None) -> _Counts:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    patch = math.prod(c.patch_size)
    c_out = c.out_channels or c.in_channels
    i2v = c.added_kv_proj_dim is not None
    img = (image_tokens if image_tokens is not None else _WAN_I2V_IMAGE_TOKENS) if i2v else 0
    block = (4 * _lin(n, d, d) + _attn(n, n, d) + 2 * _lin(n, d, d) + 2 * _lin(t, d, d) + _attn(n, t, d)
             + _mlp(n, d, c.ffn_dim, d))
    if i2v:
        block += 2 * _lin(img, c.added_kv_proj_dim, d) + _attn(n, img, d)
    extra = (_lin(n, c.in_channels * patch, d) + _temb(d, c.freq_dim) + _lin(1, d, 6 * d)
             + _mlp(t, c.text_dim, d, d) + _lin(n, d, patch * c_out))
    if i2v and c.image_dim is not None:
        extra += _mlp(img, c.image_dim, c.image_dim, d)
    return [block] * c.num_layers, extra


_FAMILIES: Mapping[str, Callable[[Any, int, int, int | None], _Counts]] = MappingProxyType({
    "DiTTransformer2DModel": _dit,
    "PixArtTransformer2DModel": _pixart,
    "FluxTransformer2DModel": _flux,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "WanTransformer3DModel": _wan,
})

SUPPORTED_MODELS: tuple[str, ...] = tuple(_FAMILIES)
"""Class names (``type(model).__name__``) that this module can count."""


def _counts(model: Any, video_tokens: int, text_tokens: int, image_tokens: int | None) -> _Counts:
    name = type(model).__name__
    fn = _FAMILIES.get(name)
    if fn is None:
        raise ValueError(f"no FLOPs formula for model class {name!r}; supported: {', '.join(SUPPORTED_MODELS)}")
    for label, value in (("video_tokens", video_tokens), ("text_tokens", text_tokens)):
        if int(value) != value or value < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
    if image_tokens is not None and (int(image_tokens) != image_tokens or image_tokens < 0):
        raise ValueError(f"image_tokens must be a non-negative integer or None, got {image_tokens!r}")
    blocks, extra = fn(model, int(video_tokens), int(text_tokens), image_tokens)
    return [int(b) for b in blocks], int(extra)


def block_flops(model: Any, video_tokens: int, text_tokens: int, *, image_tokens: int | None = None) -> list[int]:
    """FLOPs of each transformer block, in execution order, for one sample.

    For FLUX and HunyuanVideo the dual-stream blocks come first, then the single-stream ones.
    ``video_tokens`` counts image/video tokens after patchify, ``text_tokens`` the text tokens
    seen by the blocks (0 for DiT). ``image_tokens`` is only used by Wan I2V (default 257).
    Raises ``ValueError`` for an unsupported model class.
    """
    return _counts(model, video_tokens, text_tokens, image_tokens)[0]


def forward_flops(model: Any, video_tokens: int, text_tokens: int, *, image_tokens: int | None = None) -> int:
    """FLOPs of one full forward for one sample: all blocks plus embeddings and output head.

    See the module docstring for the formulas; multiply by the batch size (and by 2 for
    classifier-free guidance run as two passes) yourself.
    """
    blocks, extra = _counts(model, video_tokens, text_tokens, image_tokens)
    return sum(blocks) + extra


def flops_breakdown(model: Any, video_tokens: int, text_tokens: int, *,
                    image_tokens: int | None = None) -> dict[str, Any]:
    """JSON-ready split of :func:`forward_flops`: ``blocks``, ``embed_and_head``, ``total``, ``per_block``."""
    blocks, extra = _counts(model, video_tokens, text_tokens, image_tokens)
    return {"blocks": sum(blocks), "embed_and_head": extra, "total": sum(blocks) + extra, "per_block": blocks}


# ----- token level (cache.granularity: token) ---------------------------------------------------
# A block on k selected tokens (of N, and kt of T text tokens): queries, attention output and MLP
# on the selected rows; keys and values on every token (skipped with the attention when no token
# of the block is selected; with cache.token_kv=forecast on the selected tokens only, N -> k and
# T -> kt in the key/value terms); the per-sample modulation always runs:
#
#   DiT          temb(256) + lin(1, D, 6D) + [2 lin(k, D, D) + 2 lin(N, D, D) + attn(k, N)] + ff(k)
#   PixArt       the same self-attention, cross-attention [2 lin(k, D, D) + 2 lin(T, Dc, D) + attn(k, T)], ff(k)
#   dual-stream  2 lin(1, D, 6D) + [2 lin(k, D, D) + 2 lin(kt, D, D) + 2 lin(N, D, D) + 2 lin(T, D, D)
#                + attn(k + kt, S)] + mlp(k, D, M, D) + mlp(kt, D, M, D)
#   Wan          [2 lin(k, D, D) + 2 lin(N, D, D) + attn(k, N) + 2 lin(k, D, D) + 2 lin(T, D, D) + attn(k, T)]
#                + mlp(k, D, F, D)   (text-to-video; the modulation is a table)
#   single       lin(1, D, 3D) + [lin(s, D, D) + 2 lin(S, D, D) + attn(s, S)] + lin(s, D, M) + lin(s, D + M, D),
#                s = k + kt


def _dit_tokens(model: Any, n: int, t: int, k: int, kt: int, kn: int, ktn: int) -> list[int]:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    block = _temb(d) + _lin(1, d, 6 * d) + _ff(k, d, 4 * d, c.activation_fn)
    if k:
        block += 2 * _lin(k, d, d) + 2 * _lin(kn, d, d) + _attn(k, n, d)
    return [block] * c.num_layers


def _pixart_tokens(model: Any, n: int, t: int, k: int, kt: int, kn: int, ktn: int) -> list[int]:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    block = _ff(k, d, 4 * d, c.activation_fn)
    if k:
        block += 2 * _lin(k, d, d) + 2 * _lin(kn, d, d) + _attn(k, n, d)
        if c.cross_attention_dim is not None:
            block += 2 * _lin(k, d, d) + 2 * _lin(t, c.cross_attention_dim, d) + _attn(k, t, d)
    return [block] * c.num_layers


def _dual_tokens(n: int, t: int, k: int, kt: int, kn: int, ktn: int, d: int, m: int) -> int:
    block = 2 * _lin(1, d, 6 * d) + _mlp(k, d, m, d) + _mlp(kt, d, m, d)
    if k + kt:
        block += (2 * _lin(k, d, d) + 2 * _lin(kt, d, d) + 2 * _lin(kn, d, d) + 2 * _lin(ktn, d, d)
                  + _attn(k + kt, n + t, d))
    return block


def _single_tokens(n: int, t: int, k: int, kt: int, kn: int, ktn: int, d: int, m: int) -> int:
    s, sel = n + t, k + kt
    block = _lin(1, d, 3 * d) + _lin(sel, d, m) + _lin(sel, d + m, d)
    if sel:
        block += _lin(sel, d, d) + 2 * _lin(kn + ktn, d, d) + _attn(sel, s, d)
    return block


def _dual_stream_tokens(model: Any, n: int, t: int, k: int, kt: int, kn: int, ktn: int, mlp_ratio: float) -> list[int]:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    m = int(d * mlp_ratio)
    return ([_dual_tokens(n, t, k, kt, kn, ktn, d, m)] * c.num_layers
            + [_single_tokens(n, t, k, kt, kn, ktn, d, m)] * c.num_single_layers)


def _wan_tokens(model: Any, n: int, t: int, k: int, kt: int, kn: int, ktn: int) -> list[int]:
    c = model.config
    d = c.num_attention_heads * c.attention_head_dim
    block = _mlp(k, d, c.ffn_dim, d)
    if k:
        block += (2 * _lin(k, d, d) + 2 * _lin(kn, d, d) + _attn(k, n, d)
                  + 2 * _lin(k, d, d) + 2 * _lin(t, d, d) + _attn(k, t, d))
    return [block] * c.num_layers


_TOKEN_FAMILIES: Mapping[str, Callable[..., list[int]]] = MappingProxyType({
    "DiTTransformer2DModel": _dit_tokens,
    "PixArtTransformer2DModel": _pixart_tokens,
    "WanTransformer3DModel": _wan_tokens,
    "HunyuanVideoTransformer3DModel": lambda m, *counts: _dual_stream_tokens(m, *counts, m.config.mlp_ratio),
    "FluxTransformer2DModel": lambda m, *counts: _dual_stream_tokens(m, *counts, 4.0),
})


def token_block_flops(model: Any, video_tokens: int, text_tokens: int, video_selected: int,
                      text_selected: int = 0, *, kv_forecast: bool = False) -> list[int]:
    """FLOPs of each block run at token level for one sample: ``video_selected`` of
    ``video_tokens`` and ``text_selected`` of ``text_tokens`` recomputed (formulas above; with
    ``kv_forecast`` — ``cache.token_kv: forecast`` — the key and value projections of the
    self-/joint attention run on the selected tokens only: ``N`` → ``k``, ``T`` → ``kt`` in their
    terms). With every token selected this equals :func:`block_flops`. Raises ``ValueError`` for a
    class without token-level support."""
    fn = _TOKEN_FAMILIES.get(type(model).__name__)
    if fn is None:
        raise ValueError(f"no token-level FLOPs formula for {type(model).__name__!r}; supported: "
                         f"{', '.join(_TOKEN_FAMILIES)}")
    if not (0 <= video_selected <= video_tokens and 0 <= text_selected <= text_tokens):
        raise ValueError(f"selected tokens ({video_selected}, {text_selected}) out of range "
                         f"({video_tokens}, {text_tokens})")
    n, t, k, kt = int(video_tokens), int(text_tokens), int(video_selected), int(text_selected)
    return [int(b) for b in fn(model, n, t, k, kt, k if kv_forecast else n, kt if kv_forecast else t)]
