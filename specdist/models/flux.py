"""Adapter for diffusers ``FluxTransformer2DModel`` (FLUX.1, Black Forest Labs 2024)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Conditioning, DualStreamAdapter, StreamSpec, TokenBranch, TokenSpec, timestep_batch

# Both block kinds take (hidden_states, encoder_hidden_states, ...) and return (encoder_hidden_states, hidden_states).
_STREAMS = StreamSpec(inputs=(("hidden_states", 0), ("encoder_hidden_states", 1)), outputs=(1, 0))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, (H/2)(W/2), 4C]`` tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latent size ``height × width``, as ``FluxPipeline._unpack_latents``."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[(H/2)(W/2), 3]`` RoPE positions of the packed image tokens (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def calculate_shift(seq_len: int, base_seq: int = 256, max_seq: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift ``mu`` (``diffusers.pipelines.flux.pipeline_flux.calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + (base_shift - m * base_seq)


class FluxAdapter(DualStreamAdapter):
    """FLUX: dual-stream ``transformer_blocks`` then single-stream ``single_transformer_blocks``.

    **Latent layout: unpacked** ``[B, C, H, W]`` with ``C = in_channels / 4`` (the VAE's latent
    channels) and ``H, W`` even latent sizes. :meth:`forward` packs 2×2 patches into
    ``(H/2)(W/2)`` tokens the way ``FluxPipeline`` does, calls the model and unpacks the output, so
    a sample's noise is exactly the pipeline's ``randn_tensor`` draw and every state is a
    permutation of the pipeline's packed state (the Euler step is elementwise).

    Calls follow ``FluxPipeline``: ``timestep = t / 1000`` (the model multiplies by 1000 again),
    ``img_ids``/``txt_ids`` built from the sizes, and for guidance-distilled checkpoints
    (``guidance_embeds``, FLUX.1-dev) ``guidance = extra["embedded_guidance"]`` (default 3.5; the
    model multiplies it by 1000 itself). ``Conditioning.guidance_scale > 1`` is the pipeline's
    *true* CFG (``true_cfg_scale`` with a negative prompt). Timesteps: sigmas
    ``linspace(1, 1/N, N)`` shifted by ``mu = calculate_shift(image tokens, ...)`` from the
    scheduler's config.
    """

    family = "flux"
    model_class = "FluxTransformer2DModel"
    call_timestep_scale = 1000.0

    def stream_spec(self, model: nn.Module, index: int) -> StreamSpec:
        return _STREAMS

    def token_spec(self, model: nn.Module, index: int) -> TokenSpec:
        # Image and text tokens may both be refreshed, each stream with its own count. Dual-stream
        # blocks: joint attention over [text, image], then row-wise ff (image) and ff_context (text).
        # Single-stream blocks join [text, image] themselves: proj_mlp runs on the selected rows of
        # that sequence, the attention's selected rows and the MLP's meet in proj_out, which runs on
        # the selected rows only and is scattered into its forecast.
        both, joint = ("video", "text"), ("joint_text_first",)
        if index < len(model.transformer_blocks):
            return TokenSpec(both, {"attn": TokenBranch("attention", both), "ff": TokenBranch("rows", ("video",)),
                                    "ff_context": TokenBranch("rows", ("text",))},
                             kv={"attn.to_k": "video", "attn.to_v": "video", "attn.add_k_proj": "text",
                                 "attn.add_v_proj": "text"})
        return TokenSpec(both, {"attn": TokenBranch("attention", joint), "proj_mlp": TokenBranch("rows", joint),
                                "act_mlp": TokenBranch("pass", joint), "proj_out": TokenBranch("gathered", joint)},
                         kv={"attn.to_k": "joint_text_first", "attn.to_v": "joint_text_first"})

    def token_attention(self, module, run, args, kwargs, index) -> tuple[torch.Tensor, ...]:
        from .flux_tokens import dual_attention_subset, single_attention_subset

        if args:
            raise ValueError("FLUX token level: attention called with positional arguments")
        mask, rope = kwargs.get("attention_mask"), kwargs.get("image_rotary_emb")
        if kwargs.get("encoder_hidden_states") is None:  # single-stream: [text, image] joined by the block
            return (single_attention_subset(module, kwargs["hidden_states"], mask, rope, index["joint_text_first"]),)
        return dual_attention_subset(module, kwargs["hidden_states"], kwargs["encoder_hidden_states"], mask, rope,
                                     index["video"], index["text"])

    def latent_shape(self, model: nn.Module, height: int, width: int, frames: int) -> tuple[int, ...]:
        return (model.config.in_channels // 4, height, width)

    def token_counts(self, model: nn.Module, latent_shape: tuple[int, ...], cond: Conditioning | None) -> tuple[int, int]:
        text = 0 if cond is None else int(cond.kwargs["encoder_hidden_states"].shape[1])
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2), text

    def set_timesteps(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...], device: torch.device) -> None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        c = scheduler.config
        mu = calculate_shift((latent_shape[-2] // 2) * (latent_shape[-1] // 2), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if sigmas is None:  # as retrieve_timesteps
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                kwargs: dict[str, torch.Tensor], extra: dict[str, Any]) -> torch.Tensor:
        b, _, h, w = latents.shape
        t = timestep_batch(timestep, b, latents.device, latents.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((b,), float(extra.get("embedded_guidance", 3.5)), device=latents.device,
                                  dtype=torch.float32)
        text = kwargs["encoder_hidden_states"]
        out = model(
            hidden_states=pack(latents),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=kwargs["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=image_ids(h, w, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    @staticmethod
    def conditioning(states: torch.Tensor, pooled: torch.Tensor,
                     uncond: tuple[torch.Tensor, torch.Tensor] | None = None, guidance_scale: float = 1.0,
                     embedded_guidance: float | None = None) -> Conditioning:
        """Conditioning from encoded prompts (T5 ``states [B, L, D]``, CLIP ``pooled [B, P]``)."""
        pk = lambda s, p: {"encoder_hidden_states": s, "pooled_projections": p}
        use_uncond = uncond is not None and guidance_scale > 1.0
        extra = {} if embedded_guidance is None else {"embedded_guidance": embedded_guidance}
        return Conditioning(pk(states, pooled), pk(*uncond) if use_uncond else None, guidance_scale, extra)

    def random_conditioning(self, model: nn.Module, batch: int, generator: torch.Generator,
                            guidance_scale: float = 1.0) -> Conditioning:
        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.randn(batch, 6, model.config.joint_attention_dim, generator=generator),
                    torch.randn(batch, model.config.pooled_projection_dim, generator=generator))
        uncond = draw() if guidance_scale > 1.0 else None
        return self.conditioning(*draw(), uncond=uncond, guidance_scale=guidance_scale)

    def context_parallel_lengths(self, model: nn.Module, latent_shape: tuple[int, ...],
                                 cond: Conditioning | None) -> dict[str, int]:
        # diffusers' FLUX _cp_plan splits hidden_states, encoder_hidden_states, img_ids and txt_ids
        image, text = self.token_counts(model, latent_shape, cond)
        return {"image tokens": image, **({"text tokens": text} if cond is not None else {})}

    # ----- diffusers pipelines ---------------------------------------------------------------
    def pipeline_latent_size(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor * 2  # the VAE's factor and 2×2 packing
        return 2 * (height // f), 2 * (width // f), 1

    def pipeline_conditioning(self, pipe: Any, prompts: list[str], class_labels: list[int],
                              guidance_scale: float, device: torch.device) -> Conditioning:
        """Guidance-distilled checkpoints: ``guidance_scale`` is the embedded guidance (as
        ``FluxPipeline(guidance_scale=...)``); otherwise ``> 1`` means true CFG against ``""``."""
        seq = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        enc = lambda p: pipe.encode_prompt(prompt=p, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=seq)[:2]
        states, pooled = enc(prompts)
        if pipe.transformer.config.guidance_embeds:
            return self.conditioning(states, pooled, embedded_guidance=guidance_scale)
        uncond = enc([""] * len(prompts)) if guidance_scale > 1.0 else None
        return self.conditioning(states, pooled, uncond, guidance_scale)

    def pipeline_decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)
