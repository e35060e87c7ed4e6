"""Adapter for diffusers ``DiTTransformer2DModel`` (class-conditional DiT, Peebles & Xie 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import BasicBlocksAdapter, Conditioning, timestep_batch


class DiTAdapter(BasicBlocksAdapter):
    """DiT: blocks in ``transformer_blocks``; the class label conditions every block's adaLN-Zero.

    The null class (for guidance) is ``num_embeds_ada_norm`` (1000 for ImageNet DiT, as in
    diffusers' ``DiTPipeline``). With learned variance (``out_channels == 2 * in_channels``) the
    second half of the output channels is dropped. ``DiTPipeline`` applies guidance to the eps
    channels only and steps both halves; on the conditional half that equals the generic
    :meth:`ModelAdapter.predict`.
    """

    family = "dit"
    model_class = "DiTTransformer2DModel"

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["norm_out", "proj_out_1", "proj_out_2"]

    def latent_shape(self, model: nn.Module, height: int, width: int, frames: int) -> tuple[int, ...]:
        return (model.config.in_channels, height, width)

    def token_counts(self, model, latent_shape, cond) -> tuple[int, int]:
        p = model.config.patch_size
        return (latent_shape[-2] // p) * (latent_shape[-1] // p), 0

    def forward(self, model, latents, timestep, kwargs, extra) -> torch.Tensor:
        t = timestep_batch(timestep, latents.shape[0], latents.device)
        out = model(latents, timestep=t, class_labels=kwargs["class_labels"]).sample
        channels = latents.shape[1]
        return out[:, :channels] if model.config.out_channels == 2 * channels else out

    def conditioning(self, model: nn.Module, labels: torch.Tensor, guidance_scale: float) -> Conditioning:
        """Conditioning for class ids ``labels`` (``[B]`` int64)."""
        null = torch.full_like(labels, model.config.num_embeds_ada_norm)
        uncond = {"class_labels": null} if guidance_scale > 1.0 else None
        return Conditioning({"class_labels": labels}, uncond, guidance_scale)

    def random_conditioning(self, model, batch, generator, guidance_scale=1.0) -> Conditioning:
        labels = torch.randint(model.config.num_embeds_ada_norm, (batch,), generator=generator)
        return self.conditioning(model, labels, guidance_scale)

    # ----- diffusers pipelines ---------------------------------------------------------------
    def pipeline_latent_size(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return height // factor, width // factor, 1

    def pipeline_conditioning(self, pipe: Any, prompts: list[str], class_labels: list[int],
                              guidance_scale: float, device: torch.device) -> Conditioning:
        """Class ids ``class_labels``, or ImageNet label names ``prompts`` (``pipe.get_label_ids``)."""
        labels = list(class_labels) if class_labels else pipe.get_label_ids(list(prompts))
        return self.conditioning(pipe.transformer, torch.tensor(labels, device=device).reshape(-1), guidance_scale)

    def pipeline_decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = 1 / vae.config.scaling_factor * latents.to(device=vae.device, dtype=vae.dtype)
        return vae.decode(z).sample.clamp(-1, 1)
