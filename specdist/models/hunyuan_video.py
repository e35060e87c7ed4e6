"""Adapter for diffusers ``HunyuanVideoTransformer3DModel`` (HunyuanVideo, Kong et al. 2024)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedError
from .base import (Conditioning, DualStreamAdapter, EncodedPrompts, StreamSpec, TokenBranch, TokenSpec,
                   timestep_batch)
from .context_parallel import HUNYUAN_VIDEO_CP_PLAN, apply_hunyuan_video_mask

_STREAMS = StreamSpec(inputs=(("hidden_states", 0), ("encoder_hidden_states", 1)), outputs=(0, 1))


class HunyuanVideoAdapter(DualStreamAdapter):
    """HunyuanVideo: dual-stream ``transformer_blocks`` then single-stream ``single_transformer_blocks``.

    Calls follow ``HunyuanVideoPipeline``: latents ``[B, C, F, H, W]``, ``timestep = t`` (sigma ×
    1000), flow-matching sigmas ``linspace(1, 0, N + 1)[:-1]``, and for guidance-distilled
    checkpoints (``guidance_embeds``) an embedded guidance of ``scale × 1000`` passed as
    ``extra["embedded_guidance"]``. True classifier-free guidance (the pipeline's
    ``true_cfg_scale``) runs conditional and unconditional prompts in one batch.
    """

    family = "hunyuan_video"
    model_class = "HunyuanVideoTransformer3DModel"
    is_video = True
    attention_mask = True  # a key padding mask over [video, text] tokens in every block's attention

    def stream_spec(self, model: nn.Module, index: int) -> StreamSpec:
        # Every block (dual and single stream) takes and returns (hidden_states, encoder_hidden_states).
        return _STREAMS

    def token_spec(self, model: nn.Module, index: int) -> TokenSpec:
        # Video and text tokens may both be refreshed, each stream with its own count. Dual-stream
        # blocks: joint attention, then row-wise ff (video) and ff_context (text). Single-stream
        # blocks: proj_mlp (rows of [video, text]), the attention's selected rows and the MLP's meet
        # in proj_out, which runs on the selected rows only and is scattered into its forecast.
        if model.config.image_condition_type == "token_replace":
            raise UnsupportedError("HunyuanVideo with image_condition_type='token_replace': token-level caching "
                                      "is not supported (its blocks treat the first frame's tokens apart)")
        both = ("video", "text")
        if index < len(model.transformer_blocks):
            return TokenSpec(both, {"attn": TokenBranch("attention", both), "ff": TokenBranch("rows", ("video",)),
                                    "ff_context": TokenBranch("rows", ("text",))},
                             kv={"attn.to_k": "video", "attn.to_v": "video", "attn.add_k_proj": "text",
                                 "attn.add_v_proj": "text"})
        return TokenSpec(both, {"attn": TokenBranch("attention", both), "proj_mlp": TokenBranch("rows", ("joint",)),
                                "act_mlp": TokenBranch("pass", ("joint",)),
                                "proj_out": TokenBranch("gathered", ("joint",))},
                         kv={"attn.to_k": "joint", "attn.to_v": "joint"})

    def token_attention(self, module, run, args, kwargs, index) -> tuple[torch.Tensor, ...]:
        from .hunyuan_tokens import joint_attention_subset

        return joint_attention_subset(module, kwargs["hidden_states"], kwargs["encoder_hidden_states"],
                                      kwargs.get("attention_mask"), kwargs.get("image_rotary_emb"),
                                      index["video"], index["text"])

    def latent_shape(self, model, height, width, frames) -> tuple[int, ...]:
        return (model.config.in_channels, frames, height, width)

    def token_counts(self, model, latent_shape, cond) -> tuple[int, int]:
        p, pt = model.config.patch_size, model.config.patch_size_t
        video = (latent_shape[1] // pt) * (latent_shape[2] // p) * (latent_shape[3] // p)
        text = 0 if cond is None else int(cond.kwargs["encoder_hidden_states"].shape[1])
        return video, text

    def set_timesteps(self, scheduler, steps, latent_shape, device) -> None:
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas, device=device)

    def forward(self, model, latents, timestep, kwargs, extra) -> torch.Tensor:
        b = latents.shape[0]
        t = timestep_batch(timestep, b, latents.device, latents.dtype)
        guidance = None
        if model.config.guidance_embeds:
            scale = extra.get("embedded_guidance", 6.0)
            guidance = torch.full((b,), scale * 1000.0, device=latents.device, dtype=latents.dtype)
        return model(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=kwargs["encoder_hidden_states"],
            encoder_attention_mask=kwargs["encoder_attention_mask"],
            pooled_projections=kwargs["pooled_projections"],
            guidance=guidance,
            return_dict=False,
        )[0]

    @staticmethod
    def conditioning(states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                     uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     guidance_scale: float = 1.0, embedded_guidance: float | None = None) -> Conditioning:
        """Conditioning from encoded prompts (``states [B, L, D]``, ``mask [B, L]``, ``pooled [B, P]``)."""
        pack = lambda s, m, p: {"encoder_hidden_states": s, "encoder_attention_mask": m, "pooled_projections": p}
        extra = {} if embedded_guidance is None else {"embedded_guidance": embedded_guidance}
        return Conditioning(pack(states, mask, pooled), None if uncond is None else pack(*uncond),
                            guidance_scale, extra)

    def prompt_conditioning(self, encoded: EncodedPrompts, uncond: EncodedPrompts | None = None,
                            guidance_scale: float = 1.0) -> Conditioning:
        """States, their mask and the pooled vector, as encoded (the mask goes to the model)."""
        return self.conditioning(*encoded, uncond=uncond, guidance_scale=guidance_scale)

    def random_conditioning(self, model, batch, generator, guidance_scale=1.0) -> Conditioning:
        length = 6
        def draw():
            states = torch.randn(batch, length, model.config.text_embed_dim, generator=generator)
            mask = torch.ones(batch, length, dtype=torch.bool)
            mask[:, length - 2:] = False
            pooled = torch.randn(batch, model.config.pooled_projection_dim, generator=generator)
            return states, mask, pooled
        uncond = draw() if guidance_scale > 1.0 else None
        return self.conditioning(*draw(), uncond=uncond, guidance_scale=guidance_scale)

    # ----- context parallelism (specdist.models.context_parallel) ----------------------------
    def context_parallel_unsupported(self, model: nn.Module) -> str | None:
        if model.config.image_condition_type == "token_replace":
            return ("HunyuanVideo with image_condition_type='token_replace' cannot run context-parallel (its "
                    "blocks read the first frame's tokens from the local sequence)")
        return None

    def context_parallel_plan(self, model: nn.Module) -> dict[str, Any]:
        reason = self.context_parallel_unsupported(model)
        if reason:
            raise ValueError(reason)
        return HUNYUAN_VIDEO_CP_PLAN

    def context_parallel_lengths(self, model, latent_shape, cond) -> dict[str, int]:
        video, text = self.token_counts(model, latent_shape, cond)
        return {"video tokens": video, **({"text tokens": text} if cond is not None else {})}

    def apply_context_parallel_hooks(self, model: nn.Module, cp_config: Any) -> None:
        apply_hunyuan_video_mask(model, cp_config)

    # ----- diffusers pipelines ---------------------------------------------------------------
    def pipeline_latent_size(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
        s, st = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        return height // s, width // s, (frames - 1) // st + 1

    def pipeline_conditioning(self, pipe: Any, prompts: list[str], class_labels: list[int],
                              guidance_scale: float, device: torch.device) -> Conditioning:
        """Guidance-distilled checkpoints: ``guidance_scale`` is the embedded guidance (as
        ``HunyuanVideoPipeline(guidance_scale=...)``); otherwise ``> 1`` means true CFG against ``""``."""
        seq = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        dtype = pipe.transformer.dtype

        def enc(p: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            states, pooled, mask = pipe.encode_prompt(prompt=p, prompt_2=None, num_videos_per_prompt=1,
                                                      device=device, max_sequence_length=seq)
            return states.to(dtype), mask.to(dtype), pooled.to(dtype)
        if pipe.transformer.config.guidance_embeds:
            return self.conditioning(*enc(prompts), embedded_guidance=guidance_scale)
        uncond = enc([""] * len(prompts)) if guidance_scale > 1.0 else None
        return self.conditioning(*enc(prompts), uncond=uncond, guidance_scale=guidance_scale)

    def pipeline_decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)
