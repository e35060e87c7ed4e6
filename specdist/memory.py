"""Memory controls of a loaded model: compute dtype, weight offloading, VAE tiling and slicing.

* ``dtype: auto`` — ``bfloat16`` for diffusers checkpoints (pipelines and bare transformers) on
  CUDA, ``float32`` otherwise (the zoo models are trained and reported in float32; CPU kernels are
  fastest and exact in float32).
* ``offload`` (CUDA only; on a CPU the weights are already in host memory):

  - ``none``: every component on the device.
  - ``model``: a pipeline's text encoders and VAE wait in CPU memory and go to the device only
    for their one use per job (encoding the prompts, decoding the result); the transformer stays
    on the device. This is what diffusers' ``enable_model_cpu_offload`` achieves for a pipeline
    call, done here by explicit moves around the two phases (specdist calls the transformer
    itself, so accelerate's per-call hooks would only add a device guess).
  - ``group``: diffusers' own group offloading (``diffusers.hooks.apply_group_offloading``, which
    moves tensors with accelerate's ``send_to_device``, so it needs ``accelerate``): the
    transformer's weights live in (pinned) CPU memory and each block is copied in on a CUDA stream
    while the previous one runs (``block_level``, one block per group); text encoders and VAE the
    same at ``leaf_level``. For GPUs too small for the weights; costs PCIe time every step.
    specdist's speculation hooks wrap the offloading hooks, so a block that speculation skips is
    not copied in.

* ``vae.tiling`` / ``vae.slicing`` (``auto`` | ``true`` | ``false``): diffusers'
  ``vae.enable_tiling()`` decodes in overlapping spatial tiles, ``vae.enable_slicing()`` one sample
  at a time. ``auto`` turns tiling on when the latents are larger than the VAE's own tile (the
  only case where tiling changes anything: HunyuanVideo's VAE tiles at 256×256 pixels, so 544p and
  720p decode tiled) and slicing on when such a large output has more than one sample. A model
  without a VAE (the pixel-space zoo, a bare transformer) records ``auto`` as not applicable and
  refuses ``true`` in one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: `import specdist` (configs, CLI) stays light
    import torch
    from torch import nn

OFFLOADS = ("none", "model", "group")
VAE_MODES = ("auto", True, False)


def resolve_dtype(dtype: str, kind: str, device: torch.device) -> str:
    """The compute dtype name for ``dtype`` (``auto`` resolved: see the module doc); ``kind`` is
    the checkpoint kind (``zoo``, ``pipeline``, ``transformer``)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" and kind != "zoo" else "float32"


def _side_components(pipe: Any) -> dict[str, nn.Module]:
    """A pipeline's modules other than the transformer (text encoders, VAE, image encoders)."""
    from torch import nn

    return {name: c for name, c in (getattr(pipe, "components", {}) or {}).items()
            if isinstance(c, nn.Module) and name != "transformer"}


def check_offload(offload: str, device: torch.device, kind: str, key: str = "offload") -> None:
    """Refuse an ``offload`` that cannot apply (one line naming ``key``)."""
    if offload not in OFFLOADS:
        raise ConfigError(f"invalid value for '{key}': {offload!r} (allowed: one of {list(OFFLOADS)})")
    if offload != "none" and device.type != "cuda":
        raise ConfigError(f"invalid value for '{key}': {offload!r} (allowed: none on {device.type}: offloading moves "
                          f"weights between CPU memory and a CUDA device)")
    if offload == "model" and kind != "pipeline":
        raise ConfigError(f"invalid value for '{key}': 'model' (allowed: none or group for a {kind} checkpoint: "
                          f"model offload moves a diffusers pipeline's text encoders and VAE)")
    if offload == "group":
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ConfigError(f"invalid value for '{key}': 'group' (diffusers' group offloading needs the accelerate "
                              f"package: pip install accelerate, or pip install specdist[gpu])")


def apply_group_offload(module: nn.Module, onload: torch.device, offload: torch.device | None = None, *,
                        level: str = "block_level") -> None:
    """diffusers' group offloading of ``module``: weights in ``offload`` memory (default: the CPU),
    copied to ``onload`` per block (``block_level``, one block per group) or per leaf
    (``leaf_level``), on a CUDA stream when ``onload`` is CUDA (else synchronously: the same hooks,
    used by the CPU tests)."""
    import torch
    from diffusers.hooks import apply_group_offloading

    offload = torch.device("cpu") if offload is None else offload

    stream = onload.type == "cuda"
    apply_group_offloading(module, onload_device=onload, offload_device=offload, offload_type=level,
                           num_blocks_per_group=1 if level == "block_level" else None, use_stream=stream,
                           record_stream=stream)


def apply_offload(offload: str, transformer: nn.Module, pipe: Any, device: torch.device) -> dict[str, Any]:
    """Place the weights as ``offload`` asks (after :func:`check_offload`); the transformer and the
    pipeline are still on the CPU. Returns the record for ``report.json``."""
    side = _side_components(pipe) if pipe is not None else {}
    if offload == "group":
        apply_group_offload(transformer, device)
        for c in side.values():
            apply_group_offload(c, device, level="leaf_level")
        where = {"transformer": "cpu (group offload, block level)",
                 **{n: "cpu (group offload, leaf level)" for n in side}}
    else:
        transformer.to(device)
        keep = offload == "model"
        for c in side.values():
            if not keep:
                c.to(device)
        where = {"transformer": str(device), **{n: ("cpu (to the device for its use)" if keep else str(device))
                                                for n in side}}
    return {"offload": offload, "weights": where}


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device: torch.device, active: bool) -> Iterator[None]:
    """``offload: model``: move ``modules`` to ``device`` for the block, back to the CPU after it."""
    if not active:
        yield
        return
    import torch

    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _tile_latent_min(vae: nn.Module) -> tuple[int, int] | None:
    """The latent (height, width) above which the VAE's tiled decode splits the input."""
    if hasattr(vae, "tile_latent_min_size"):  # AutoencoderKL and relatives
        return int(vae.tile_latent_min_size), int(vae.tile_latent_min_size)
    ratio = getattr(vae, "spatial_compression_ratio", None)
    h, w = getattr(vae, "tile_sample_min_height", None), getattr(vae, "tile_sample_min_width", None)
    if ratio and h and w:  # HunyuanVideo, Wan and other video VAEs
        return int(h) // int(ratio), int(w) // int(ratio)
    return None


def configure_vae(pipe: Any, tiling: bool | str, slicing: bool | str, latent_shape: tuple[int, ...], samples: int,
                  model: str) -> dict[str, Any]:
    """Turn the pipeline VAE's tiling and slicing on or off as asked (``auto``: see the module doc)
    for decoding ``samples`` latents of ``latent_shape``; returns the record for ``report.json``.

    Raises:
        ConfigError: ``true`` for a model without a VAE, or a VAE without that feature.
    """
    vae = getattr(pipe, "vae", None) if pipe is not None else None
    if vae is None:
        for key, value in (("vae.tiling", tiling), ("vae.slicing", slicing)):
            if value is True:
                raise ConfigError(f"invalid value for '{key}': True (allowed: auto or false; {model} has no VAE: "
                                  f"it generates in pixel space or is a bare transformer)")
        return {"tiling": False, "slicing": False, "applies": False, "note": f"{model} has no VAE"}
    record: dict[str, Any] = {"applies": True, "vae": type(vae).__name__}
    tile = _tile_latent_min(vae)
    large = tile is not None and (latent_shape[-2] > tile[0] or latent_shape[-1] > tile[1])
    record["tile_latent_min"] = list(tile) if tile else None
    for key, value, feature, auto in (("tiling", tiling, "tiling", large), ("slicing", slicing, "slicing",
                                                                             large and samples > 1)):
        supported = hasattr(vae, f"enable_{feature}")
        if value is True and not supported:
            raise ConfigError(f"invalid value for 'vae.{key}': True (allowed: auto or false; {type(vae).__name__} "
                              f"has no {feature})")
        on = supported and (auto if value == "auto" else bool(value))
        if supported:
            getattr(vae, f"{'enable' if on else 'disable'}_{feature}")()
        record[key] = on
        record[f"{key}_requested"] = value
    return record
