"""Adapter for diffusers ``PixArtTransformer2DModel`` (PixArt-α / PixArt-Σ, Chen et al. 2023/2024)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .base import BasicBlocksAdapter, Conditioning, timestep_batch


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """Default of ``pipe.__call__``'s argument ``name`` (e.g. the pipeline's ``max_sequence_length``)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


class PixArtAdapter(BasicBlocksAdapter):
    """PixArt: blocks in ``transformer_blocks``; T5 text tokens enter every block by cross-attention.

    Calls follow ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``: latents ``[B, C, H, W]``,
    integer ``timestep``, ``encoder_hidden_states`` with its ``encoder_attention_mask`` and
    ``added_cond_kwargs``. Micro-conditions (PixArt-α 1024px, ``model.use_additional_conditions``)
    are the pixel resolution ``(H, W) × vae_scale_factor`` (``extra["vae_scale_factor"]``, default 8)
    and aspect ratio ``H / W``, derived from the latents as the pipeline does (resolution binning
    is not applied). With learned variance (``out_channels == 2 * in_channels``) the variance
    channels are dropped. Scheduler timesteps: the default ``scheduler.set_timesteps(N)``.
    """

    family = "pixart"
    model_class = "PixArtTransformer2DModel"

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["norm_out", "proj_out"]  # plus the ``scale_shift_table`` parameter

    def latent_shape(self, model: nn.Module, height: int, width: int, frames: int) -> tuple[int, ...]:
        return (model.config.in_channels, height, width)

    def token_counts(self, model: nn.Module, latent_shape: tuple[int, ...], cond: Conditioning | None) -> tuple[int, int]:
        p = model.config.patch_size
        text = 0 if cond is None else int(cond.kwargs["encoder_hidden_states"].shape[1])
        return (latent_shape[-2] // p) * (latent_shape[-1] // p), text

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                kwargs: dict[str, torch.Tensor], extra: dict[str, Any]) -> torch.Tensor:
        b, channels, h, w = latents.shape
        t = timestep_batch(timestep, b, latents.device)
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            scale = extra.get("vae_scale_factor", 8)
            res = torch.tensor([h * scale, w * scale], dtype=latents.dtype, device=latents.device)
            added = {"resolution": res.repeat(b, 1),
                     "aspect_ratio": torch.tensor([[float(h / w)]], dtype=latents.dtype, device=latents.device).repeat(b, 1)}
        out = model(latents, encoder_hidden_states=kwargs["encoder_hidden_states"],
                    encoder_attention_mask=kwargs["encoder_attention_mask"], timestep=t,
                    added_cond_kwargs=added, return_dict=False)[0]
        return out[:, :channels] if model.config.out_channels // 2 == channels else out

    @staticmethod
    def conditioning(states: torch.Tensor, mask: torch.Tensor,
                     uncond: tuple[torch.Tensor, torch.Tensor] | None = None, guidance_scale: float = 1.0,
                     vae_scale_factor: int = 8) -> Conditioning:
        """Conditioning from encoded prompts (``states [B, L, D]``, ``mask [B, L]``); ``uncond`` likewise."""
        pack = lambda s, m: {"encoder_hidden_states": s, "encoder_attention_mask": m}
        use_uncond = uncond is not None and guidance_scale > 1.0
        return Conditioning(pack(states, mask), pack(*uncond) if use_uncond else None, guidance_scale,
                            {"vae_scale_factor": vae_scale_factor})

    def random_conditioning(self, model: nn.Module, batch: int, generator: torch.Generator,
                            guidance_scale: float = 1.0) -> Conditioning:
        length = 6

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            states = torch.randn(batch, length, model.config.caption_channels, generator=generator)
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[:, length - 2:] = 0
            return states, mask
        uncond = draw() if guidance_scale > 1.0 else None
        return self.conditioning(*draw(), uncond=uncond, guidance_scale=guidance_scale)

    # ----- diffusers pipelines ---------------------------------------------------------------
    def pipeline_latent_size(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
        return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor, 1

    def pipeline_conditioning(self, pipe: Any, prompts: list[str], class_labels: list[int],
                              guidance_scale: float, device: torch.device) -> Conditioning:
        cfg = guidance_scale > 1.0
        states, mask, neg_states, neg_mask = pipe.encode_prompt(
            prompts, cfg, negative_prompt="", num_images_per_prompt=1, device=device,
            clean_caption=_call_default(pipe, "clean_caption", False),
            max_sequence_length=_call_default(pipe, "max_sequence_length", 120))
        uncond = (neg_states, neg_mask) if cfg else None
        return self.conditioning(states, mask, uncond, guidance_scale, pipe.vae_scale_factor)

    def pipeline_decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)
