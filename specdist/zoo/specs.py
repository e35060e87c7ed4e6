"""Architectures and training recipes of the shipped zoo models (one entry per model).

Sizing (DESIGN §5): measured on this project's 2-core CPU machine with one thread per trainer,
a training sample costs ~35 ms for ``dit-shapes`` (64 tokens, 20 blocks of width 64) and ~330 ms
for ``hunyuan-shapes-video`` (512 tokens, 16 blocks of width 64). Both are thin and deep so a
one-block probe costs 1/20 and 1/16 of a step. The video patch is 1×4×4: each token then carries
48 output values, fewer than the width, so ``proj_out`` can reach every one (with 2×4×4 it could
not reach 32 of 96, and that part of the initial noise was never removed).

``wan-shapes`` (64 tokens, 16 Wan blocks of width 64, 48 output values per token) costs ~11 ms a
sample at batch 32 (0.36 s a step alone on the machine; 0.56 s on average while the other core was
busy). It is held out of every tuning decision: specdist's methods are only checked on it
(DESIGN §6, "tune on one model, report on another"). Its sampler's ``shift`` 3.0 is Wan 2.1's
480p default, not a tuned value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data import COLOURS, DIRECTIONS, SHAPE_CLASSES, VIDEO_SHAPES


@dataclass(frozen=True)
class ZooSpec:
    """Everything needed to build, train and describe one zoo model."""

    name: str
    family: str  # adapter family key, e.g. "dit" or "hunyuan_video"
    description: str
    transformer_class: str  # diffusers class name
    transformer_config: dict[str, Any]
    objective: str  # "v_prediction" (DDPM noise schedule) or "flow_matching"
    scheduler_class: str  # scheduler used for sampling
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, ...]  # per-sample pixel shape, channels first
    text_encoder_config: dict[str, Any] | None = None
    class_names: tuple[str, ...] = ()
    default_prompts: tuple[str, ...] = ()  # prompts of a job that names none (text models)
    default_guidance: float = 1.0
    train: dict[str, Any] = field(default_factory=dict)


VIDEO_VOCAB = sorted({*COLOURS, *VIDEO_SHAPES, *DIRECTIONS, "moving"})
IMAGE_VOCAB = sorted({*COLOURS, *(w for s in SHAPE_CLASSES for w in s.split())})
# One prompt per shape class, the colours in turn.
IMAGE_PROMPTS = tuple(f"{c} {s}" for c, s in zip([*COLOURS] * 2, SHAPE_CLASSES))

ZOO_SPECS: dict[str, ZooSpec] = {
    "dit-shapes": ZooSpec(
        name="dit-shapes",
        family="dit",
        description="class-conditional 32x32 RGB shapes (8 classes), DDIM, v-prediction",
        transformer_class="DiTTransformer2DModel",
        transformer_config=dict(
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=3,
            out_channels=3,
            num_layers=20,
            sample_size=32,
            patch_size=4,
            num_embeds_ada_norm=len(SHAPE_CLASSES),
            norm_num_groups=1,
        ),
        objective="v_prediction",
        scheduler_class="DDIMScheduler",
        scheduler_config=dict(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="trailing",
        ),
        sample_shape=(3, 32, 32),
        class_names=SHAPE_CLASSES,
        default_guidance=4.0,
        train=dict(batch_size=32, lr=1e-3, warmup=200, ema_decay=0.999),
    ),
    "hunyuan-shapes-video": ZooSpec(
        name="hunyuan-shapes-video",
        family="hunyuan_video",
        description="text-to-video 8x32x32 RGB moving shapes ('red square moving right'), flow matching",
        transformer_class="HunyuanVideoTransformer3DModel",
        transformer_config=dict(
            in_channels=3,
            out_channels=3,
            num_attention_heads=2,
            attention_head_dim=32,
            num_layers=2,
            num_single_layers=14,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=4,
            patch_size_t=1,
            guidance_embeds=False,
            text_embed_dim=32,
            pooled_projection_dim=32,
            rope_axes_dim=(8, 12, 12),
        ),
        objective="flow_matching",
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_config=dict(num_train_timesteps=1000, shift=2.0),
        sample_shape=(3, 8, 32, 32),
        text_encoder_config=dict(vocab=VIDEO_VOCAB, max_length=6, embed_dim=32, pooled_dim=32),
        default_guidance=3.0,
        train=dict(batch_size=16, lr=1e-3, warmup=200, ema_decay=0.998),
    ),
    "wan-shapes": ZooSpec(
        name="wan-shapes",
        family="wan",
        description="text-to-image 32x32 RGB shapes as one-frame Wan video ('red circle', 'blue vertical stripes'), "
                    "flow matching; held out of every tuning decision",
        transformer_class="WanTransformer3DModel",
        transformer_config=dict(
            patch_size=(1, 4, 4),
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=3,
            out_channels=3,
            text_dim=32,
            freq_dim=256,
            ffn_dim=128,
            num_layers=16,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        ),
        objective="flow_matching",
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_config=dict(num_train_timesteps=1000, shift=3.0),
        sample_shape=(3, 1, 32, 32),
        text_encoder_config=dict(vocab=IMAGE_VOCAB, max_length=6, embed_dim=32, pooled_dim=None),
        default_prompts=IMAGE_PROMPTS,
        default_guidance=3.5,
        train=dict(batch_size=32, lr=1e-3, warmup=200, ema_decay=0.999),
    ),
}
