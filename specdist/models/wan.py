"""Adapter for diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2 text-to-video, Wan team 2025)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedError
from .base import (BranchSpec, Conditioning, EncodedPrompts, ModelAdapter, TokenBranch, TokenSpec,
                   timestep_batch)


class WanAdapter(ModelAdapter):
    """Wan: one list of ``blocks``; UMT5 text tokens enter every block by cross-attention.

    Calls follow ``WanPipeline``: latents ``[B, C, F, H, W]``, ``timestep = t`` broadcast to the
    batch (or, for Wan 2.2 TI2V with ``extra["expand_timesteps"]``, to ``[B, tokens]``),
    ``encoder_hidden_states`` (zero-padded to the pipeline's ``max_sequence_length``). Timesteps:
    the default ``scheduler.set_timesteps(N)`` (the shift lives in the scheduler's config).
    Classifier-free guidance against the negative prompt runs both halves in one batch. Wan 2.2's
    two-expert setup (``transformer_2``/``boundary_ratio``) and image conditioning are not covered.
    """

    family = "wan"
    model_class = "WanTransformer3DModel"
    is_video = True

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["blocks"]

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["norm_out", "proj_out"]  # plus the ``scale_shift_table`` parameter

    def branch_spec(self, model: nn.Module, index: int) -> BranchSpec:
        # self-attention (gate_msa), cross-attention (ungated), FFN (c_gate_msa)
        return BranchSpec(cached=("attn1", "attn2", "ffn"))

    def token_spec(self, model: nn.Module, index: int) -> TokenSpec:
        # one video stream; self-attention on selected queries; cross-attention and FFN row-wise;
        # the text (block argument 1) is attended to and never refreshed
        if model.config.added_kv_proj_dim is not None:
            raise UnsupportedError("Wan I2V (image cross-attention): token-level caching is not supported")
        return TokenSpec(("video",), {"attn1": TokenBranch("attention"), "attn2": TokenBranch("rows"),
                                      "ffn": TokenBranch("rows")}, context=("encoder_hidden_states", 1),
                         kv={"attn1.to_k": "video", "attn1.to_v": "video"})

    def token_attention(self, module, run, args, kwargs, index) -> tuple[torch.Tensor, ...]:
        from .wan_tokens import self_attention_subset

        x = args[0] if args else kwargs["hidden_states"]
        rotary = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
        return (self_attention_subset(module, x, rotary, index["video"]),)

    def latent_shape(self, model: nn.Module, height: int, width: int, frames: int) -> tuple[int, ...]:
        return (model.config.in_channels, frames, height, width)

    def _video_tokens(self, model: nn.Module, latent_shape: tuple[int, ...]) -> int:
        pt, ph, pw = model.config.patch_size
        return (latent_shape[-3] // pt) * (latent_shape[-2] // ph) * (latent_shape[-1] // pw)

    def token_counts(self, model: nn.Module, latent_shape: tuple[int, ...], cond: Conditioning | None) -> tuple[int, int]:
        text = 0 if cond is None else int(cond.kwargs["encoder_hidden_states"].shape[1])
        return self._video_tokens(model, latent_shape), text

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                kwargs: dict[str, torch.Tensor], extra: dict[str, Any]) -> torch.Tensor:
        b = latents.shape[0]
        t = timestep_batch(timestep, b, latents.device)
        if extra.get("expand_timesteps", False):  # Wan 2.2 TI2V: one timestep per video token
            t = t[:, None].expand(b, self._video_tokens(model, tuple(latents.shape[1:])))
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                     return_dict=False)[0]

    @staticmethod
    def conditioning(states: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                     expand_timesteps: bool = False) -> Conditioning:
        """Conditioning from encoded prompts (``states [B, L, D]``) and negative prompts ``uncond``."""
        use_uncond = uncond is not None and guidance_scale > 1.0
        extra = {"expand_timesteps": True} if expand_timesteps else {}
        return Conditioning({"encoder_hidden_states": states},
                            {"encoder_hidden_states": uncond} if use_uncond else None, guidance_scale, extra)

    @staticmethod
    def prompt_states(encoded: EncodedPrompts) -> torch.Tensor:
        """Per-token states with every position after the prompt zeroed, as ``WanPipeline`` pads
        its UMT5 states (Wan takes no mask and no pooled vector)."""
        states, mask, _ = encoded
        return states * mask[..., None].to(states.dtype)

    def prompt_conditioning(self, encoded: EncodedPrompts, uncond: EncodedPrompts | None = None,
                            guidance_scale: float = 1.0) -> Conditioning:
        return self.conditioning(self.prompt_states(encoded), None if uncond is None else self.prompt_states(uncond),
                                 guidance_scale)

    def random_conditioning(self, model: nn.Module, batch: int, generator: torch.Generator,
                            guidance_scale: float = 1.0) -> Conditioning:
        def draw() -> torch.Tensor:
            states = torch.randn(batch, 6, model.config.text_dim, generator=generator)
            states[:, 4:] = 0.0  # zero padding after the prompt, as WanPipeline pads
            return states
        uncond = draw() if guidance_scale > 1.0 else None
        return self.conditioning(draw(), uncond, guidance_scale)

    def context_parallel_lengths(self, model: nn.Module, latent_shape: tuple[int, ...],
                                 cond: Conditioning | None) -> dict[str, int]:
        # diffusers' Wan _cp_plan splits the video tokens (rope, blocks.0, expanded timesteps);
        # the text enters by cross-attention and stays whole on every rank
        return {"video tokens": self._video_tokens(model, latent_shape)}

    # ----- diffusers pipelines ---------------------------------------------------------------
    def pipeline_latent_size(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
        s, st = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        return height // s, width // s, (frames - 1) // st + 1

    def pipeline_conditioning(self, pipe: Any, prompts: list[str], class_labels: list[int],
                              guidance_scale: float, device: torch.device) -> Conditioning:
        cfg = guidance_scale > 1.0
        seq = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        states, neg = pipe.encode_prompt(prompt=prompts, negative_prompt="", do_classifier_free_guidance=cfg,
                                         num_videos_per_prompt=1, max_sequence_length=seq, device=device)
        return self.conditioning(states, neg if cfg else None, guidance_scale,
                                 bool(pipe.config.get("expand_timesteps", False)))

    def pipeline_decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z / (1.0 / std) + mean  # as WanPipeline: latents / (1 / std) + mean
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)
