"""Tiny random-weight diffusers pipelines for tests (no downloads, no text encoders: prompts go in
as ready-made embeddings). Each constructor seeds torch itself, so a pipeline is the same every time."""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel,
                       UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)

SEEDS = [3, 7]


def gens() -> list[torch.Generator]:
    """One generator per sample, seeded with :data:`SEEDS`."""
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def text(batch: int, length: int, dim: int, seed: int) -> torch.Tensor:
    """Random prompt embeddings ``[batch, length, dim]``."""
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


def image_vae(latent_channels: int, **kw) -> AutoencoderKL:
    """Tiny 2-level image VAE (spatial factor 2)."""
    torch.manual_seed(10)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, **kw).eval()


def flux_pipe(num_layers: int = 1, num_single_layers: int = 1) -> FluxPipeline:
    """Guidance-distilled FLUX (``guidance_embeds``), 16 latent channels, VAE factor 2."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers,
                                   num_single_layers=num_single_layers, attention_head_dim=8, num_attention_heads=2,
                                   joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                                   axes_dims_rope=[2, 2, 4]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=image_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_video_pipe(num_layers: int = 1, num_single_layers: int = 1) -> HunyuanVideoPipeline:
    """Guidance-distilled HunyuanVideo, 4 latent channels, VAE factors 8 (space) and 4 (time)."""
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=num_layers, num_single_layers=num_single_layers,
                                           num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                                           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()
    torch.manual_seed(11)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, spatial_compression_ratio=8,
                                    temporal_compression_ratio=4).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipe() -> WanPipeline:
    """Wan 2.1 (true CFG), 4 latent channels, no VAE (latent output only)."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2,
                                  rope_max_seq_len=32).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe
