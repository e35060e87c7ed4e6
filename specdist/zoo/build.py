"""Build zoo models, schedulers and text encoders from their :class:`~specdist.zoo.specs.ZooSpec`."""

from __future__ import annotations

import diffusers
import torch

from .specs import ZooSpec
from .text_encoder import PromptEncoder


def build_transformer(spec: ZooSpec) -> torch.nn.Module:
    """A freshly initialised diffusers transformer with the spec's architecture."""
    cls = getattr(diffusers, spec.transformer_class)
    return cls(**spec.transformer_config)


def build_scheduler(spec: ZooSpec):
    """The sampling scheduler of the spec (a diffusers scheduler instance)."""
    cls = getattr(diffusers, spec.scheduler_class)
    return cls(**spec.scheduler_config)


def build_text_encoder(spec: ZooSpec) -> PromptEncoder | None:
    """The spec's learned prompt encoder, or ``None`` for class-conditional models."""
    if spec.text_encoder_config is None:
        return None
    return PromptEncoder(**spec.text_encoder_config)
