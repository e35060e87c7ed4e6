"""Context-parallel plans (diffusers ``ContextParallelModelPlan``) for the families whose diffusers
class carries none, and the model facts a gang needs (heads, the lengths a plan splits).

diffusers 0.42.1: ``FluxTransformer2DModel`` and ``WanTransformer3DModel`` carry ``_cp_plan``;
``HunyuanVideoTransformer3DModel`` does not, so :data:`HUNYUAN_VIDEO_CP_PLAN` supplies one. DiT and
PixArt cannot run context-parallel in diffusers at all: their ``BasicTransformerBlock`` attention
uses ``AttnProcessor2_0``, which calls SDPA itself instead of diffusers' attention dispatcher, so no
plan can make their attention see the whole sequence (and at 256 tokens there is nothing to split).

**HunyuanVideo under context parallelism** (each of the gang's ``n`` ranks holds ``1/n`` of the
video tokens *and* ``1/n`` of the text tokens):

* RoPE: ``rope`` computes ``(cos, sin)`` ``[video tokens, head_dim]`` from the *whole* latent shape;
  both are split on dim 0, in the same (frame, row, column) order as the patch embedding's tokens,
  so each rank rotates its own tokens with their own positions. Text tokens carry no RoPE.
* Video stream: split after ``x_embedder`` (``[B, N, C]``, dim 1). The model input stays whole
  (the RoPE grid and the final unpatchify read its shape).
* Text stream: the token refiner (``context_embedder``) runs on the whole prompt with its mask — its
  attention uses ``AttnProcessor2_0``, untouched by diffusers' parallel config — and its output is
  split on dim 1. Text must be split too: joint attention concatenates ``[video, text]`` on every
  rank, and a text copy on every rank would make each text key count ``n`` times in the softmax.
* Attention mask: the model builds ``[B, 1, 1, N_local]`` from its *local* lengths and the prompt's
  valid-token count, which is wrong on every rank but the first once the text is split (a local
  text token ``j`` on rank ``r`` is valid iff ``r·L/n + j < valid``, not ``j < valid``).
  :class:`HunyuanVideoMaskHook` replaces it in every block with ``[ones(video_local), mask chunk r]``;
  Ulysses attention all-gathers such a local mask into the layout of its all-to-all'd keys
  (diffusers ``TemplatedUlyssesAttention``). Ring attention applies one mask to every key block, so
  with ``ring_degree > 1`` a padded prompt is refused (an unpadded one needs no mask).
* Output: ``proj_out``'s tokens are gathered (dim 1) before the unpatchify.
* ``image_condition_type="token_replace"`` (image-to-video) is refused: its blocks treat the first
  ``frame tokens`` of the *local* sequence as the first frame.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from torch import nn

HUNYUAN_VIDEO_CP_PLAN: dict[str, Any] = {
    "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "rope": {
        0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
    },
    "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
"""diffusers context-parallel plan of ``HunyuanVideoTransformer3DModel`` (see the module doc);
used together with :func:`apply_hunyuan_video_mask`."""

_MODEL_HOOK = "specdist_cp_text_mask"
_BLOCK_HOOK = "specdist_cp_block_mask"
_MASK_ARG = ("attention_mask", 3)  # every HunyuanVideo block: (hidden, encoder_hidden, temb, attention_mask, ...)


class _LocalMask:
    """The joint-attention mask of this rank for the model call in progress (``None`` outside one)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, 1, 1, video_local + text_local] bool


class HunyuanVideoMaskHook(ModelHook):
    """On the transformer: computes this rank's local joint mask from ``encoder_attention_mask``.

    Args:
        cp_config: the model's (set-up) diffusers ``ContextParallelConfig``.
        state: shared with the block hooks, which substitute the mask.
    """

    def __init__(self, cp_config: Any, state: _LocalMask) -> None:
        super().__init__()
        self.cp, self.state = cp_config, state

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text_mask = kwargs["encoder_attention_mask"] if "encoder_attention_mask" in kwargs else args[3]
        group = self.cp._flattened_mesh.get_group()
        n, rank = dist.get_world_size(group), dist.get_rank(group)  # the plan's sharding rank
        valid = text_mask.bool()
        if self.cp.ring_degree > 1 and not bool(valid.all()):
            raise ValueError("HunyuanVideo with ring_degree > 1 needs prompts without padding (diffusers' ring "
                             "attention applies one mask to every key block); use ulysses_degree = gang_size")
        cfg = module.config
        b, _, f, h, w = latents.shape
        video = (f // cfg.patch_size_t) * (h // cfg.patch_size) * (w // cfg.patch_size)
        ones = torch.ones(b, video // n, dtype=torch.bool, device=latents.device)
        text = valid.to(latents.device).chunk(n, dim=1)[rank]
        self.state.mask = torch.cat([ones, text], dim=1)[:, None, None, :]
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.state.mask = None
        return output


class _BlockMaskHook(ModelHook):
    """On each block: replaces the model-built ``attention_mask`` by the rank's correct local mask."""

    def __init__(self, state: _LocalMask) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        if self.state.mask is None:
            return args, kwargs
        name, pos = _MASK_ARG
        if name in kwargs or pos >= len(args):
            kwargs = {**kwargs, name: self.state.mask}
        else:
            args = (*args[:pos], self.state.mask, *args[pos + 1:])
        return args, kwargs


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def apply_hunyuan_video_mask(model: nn.Module, cp_config: Any) -> None:
    """Register the mask hooks (after ``enable_parallelism`` set ``cp_config`` up)."""
    state = _LocalMask()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(HunyuanVideoMaskHook(cp_config, state), _MODEL_HOOK)
    for block in _blocks(model):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockMaskHook(state), _BLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def remove_hunyuan_video_mask(model: nn.Module) -> None:
    """Remove the hooks of :func:`apply_hunyuan_video_mask`."""
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(_MODEL_HOOK, recurse=False)
    for block in _blocks(model):
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(_BLOCK_HOOK, recurse=False)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


__all__ = ["HUNYUAN_VIDEO_CP_PLAN", "HunyuanVideoMaskHook", "apply_hunyuan_video_mask", "remove_hunyuan_video_mask"]
