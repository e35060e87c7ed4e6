"""Model adapters (one per diffusers transformer class) and model loading."""

from __future__ import annotations

from torch import nn

from .base import Conditioning, ModelAdapter
from .dit import DiTAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .pixart import PixArtAdapter
from .wan import WanAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.model_class: cls for cls in (DiTAdapter, PixArtAdapter, FluxAdapter, HunyuanVideoAdapter, WanAdapter)
}


def adapter_for(model: nn.Module | str) -> ModelAdapter:
    """The adapter for a transformer instance or a diffusers class name."""
    name = model if isinstance(model, str) else type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no specdist adapter for {name} (supported: {', '.join(sorted(ADAPTERS))})")
    return ADAPTERS[name]()


__all__ = ["ADAPTERS", "Conditioning", "ModelAdapter", "adapter_for"]
