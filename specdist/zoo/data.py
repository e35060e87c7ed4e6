"""Seeded synthetic datasets the zoo models are trained on.

The generators draw everything from an explicit ``torch.Generator`` so a dataset is a pure
function of its seed: the training data can be regenerated bit for bit on any machine.

* :func:`shape_images` — 32×32 RGB images of one of eight shape classes (class-conditional DiT).
* :func:`prompted_shape_images` — the same images with a text prompt naming colour and class,
  such as ``"red circle"`` or ``"blue vertical stripes"`` (text-conditional Wan).
* :func:`moving_shape_videos` — short RGB clips of a coloured shape moving in one direction,
  each with a text prompt such as ``"red square moving right"`` (text-conditional HunyuanVideo).

Pixels are in ``[-1, 1]`` (the convention of diffusers' image processors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.25),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
VIDEO_SHAPES: tuple[str, ...] = ("square", "circle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
}


def image_prompts() -> list[str]:
    """All prompts of the prompted image dataset, in a fixed order (colour × shape class)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPE_CLASSES]


def video_prompts() -> list[str]:
    """All prompts of the video dataset, in a fixed order (colour × shape × direction)."""
    return [
        f"{c} {s} moving {d}" for c in COLOURS for s in VIDEO_SHAPES for d in DIRECTIONS
    ]


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy, xx


def _soft(mask_dist: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased occupancy from a signed distance (negative inside), one pixel wide edge."""
    return torch.clamp(0.5 - mask_dist * size, 0.0, 1.0)


def _shape_mask(
    kind: str, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor, phase: torch.Tensor, size: int
) -> torch.Tensor:
    """Occupancy maps ``[N, size, size]`` in [0, 1] for a batch of shapes of one kind."""
    yy, xx = _grid(size)
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    rr = r[:, None, None]
    if kind == "circle":
        dist = torch.sqrt(dx**2 + dy**2) - rr
    elif kind == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - rr * 0.85
    elif kind == "triangle":
        # Upward triangle: inside the base line and two slanted edges.
        e1 = dy - rr * 0.8
        e2 = (-dy * 0.5 + dx * 0.866) - rr * 0.55
        e3 = (-dy * 0.5 - dx * 0.866) - rr * 0.55
        dist = torch.maximum(torch.maximum(e1, e2), e3)
    elif kind == "cross":
        arm = rr * 0.3
        d1 = torch.maximum(dx.abs() - arm, dy.abs() - rr)
        d2 = torch.maximum(dy.abs() - arm, dx.abs() - rr)
        dist = torch.minimum(d1, d2)
    elif kind == "ring":
        dist = (torch.sqrt(dx**2 + dy**2) - rr * 0.8).abs() - rr * 0.22
    elif kind.endswith("stripes"):
        period = 0.25 + 0.1 * r[:, None, None]
        coord = {"horizontal stripes": yy[None], "vertical stripes": xx[None]}.get(
            kind, (xx[None] + yy[None]) / math.sqrt(2.0)
        )
        wave = torch.sin(2 * math.pi * (coord / period + phase[:, None, None]))
        return torch.sigmoid(wave * 6.0)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return _soft(dist, size)


def _palette(idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    return table[idx]


@dataclass(frozen=True)
class ImageBatch:
    """A batch of class-conditional images."""

    pixels: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    labels: torch.Tensor  # [N] int64 class ids into SHAPE_CLASSES


def _draw_shapes(n: int, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels ``[N, 3, H, W]`` in [-1, 1], class ids ``[N]`` and colour ids ``[N]`` of ``n`` random shapes."""
    labels = torch.randint(len(SHAPE_CLASSES), (n,), generator=generator)
    colours = torch.randint(len(COLOURS), (n,), generator=generator)
    fg = _palette(colours)
    bg_level = 0.05 + 0.2 * torch.rand(n, generator=generator)
    cy = 0.3 + 0.4 * torch.rand(n, generator=generator)
    cx = 0.3 + 0.4 * torch.rand(n, generator=generator)
    r = 0.18 + 0.1 * torch.rand(n, generator=generator)
    phase = torch.rand(n, generator=generator)
    out = torch.empty(n, 3, size, size)
    for k, kind in enumerate(SHAPE_CLASSES):
        sel = (labels == k).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        mask = _shape_mask(kind, cy[sel], cx[sel], r[sel], phase[sel], size)[:, None]
        bg = bg_level[sel][:, None, None, None].expand(-1, 3, size, size)
        out[sel] = bg * (1 - mask) + fg[sel][:, :, None, None] * mask
    return out * 2 - 1, labels, colours


def shape_images(n: int, generator: torch.Generator, size: int = 32) -> ImageBatch:
    """Draw ``n`` images of random shape classes with random colours, positions and sizes."""
    pixels, labels, _ = _draw_shapes(n, generator, size)
    return ImageBatch(pixels=pixels, labels=labels)


@dataclass(frozen=True)
class PromptedImageBatch:
    """A batch of prompted images."""

    pixels: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    prompts: list[str]  # N prompts from image_prompts()


def prompted_shape_images(n: int, generator: torch.Generator, size: int = 32) -> PromptedImageBatch:
    """Draw ``n`` images as :func:`shape_images` does (same draws for the same generator state),
    each with the prompt ``"<colour> <shape class>"``."""
    pixels, labels, colours = _draw_shapes(n, generator, size)
    names = list(COLOURS)
    prompts = [f"{names[c]} {SHAPE_CLASSES[k]}" for k, c in zip(labels.tolist(), colours.tolist())]
    return PromptedImageBatch(pixels=pixels, prompts=prompts)


@dataclass(frozen=True)
class VideoBatch:
    """A batch of prompted videos."""

    pixels: torch.Tensor  # [N, 3, F, H, W] in [-1, 1]
    prompts: list[str]  # N prompts from video_prompts()


def moving_shape_videos(
    n: int, generator: torch.Generator, frames: int = 8, size: int = 32
) -> VideoBatch:
    """Draw ``n`` clips: one coloured shape moving at constant speed on a dark background."""
    colour_names = list(COLOURS)
    dir_names = list(DIRECTIONS)
    ci = torch.randint(len(colour_names), (n,), generator=generator)
    si = torch.randint(len(VIDEO_SHAPES), (n,), generator=generator)
    di = torch.randint(len(dir_names), (n,), generator=generator)
    speed = (0.06 + 0.015 * torch.rand(n, generator=generator)) * (8 / frames)
    r = 0.12 + 0.04 * torch.rand(n, generator=generator)
    travel = speed * (frames - 1)
    # Start so the whole path stays inside the frame along the motion axis.
    lo, hi = 0.15, 0.85
    start_along = lo + (hi - lo - travel).clamp(min=0) * torch.rand(n, generator=generator)
    across = 0.3 + 0.4 * torch.rand(n, generator=generator)
    vec = torch.tensor([DIRECTIONS[d] for d in dir_names])[di]  # [N, 2] (dx, dy)
    bg_level = 0.05 + 0.1 * torch.rand(n, generator=generator)
    fg = _palette(ci)
    pixels = torch.empty(n, 3, frames, size, size)
    zero = torch.zeros(n)
    for f in range(frames):
        along = start_along + speed * f
        # Moving in a negative direction runs the path backwards.
        neg = (vec.sum(dim=1) < 0).float()
        pos_along = neg * (1 - along) + (1 - neg) * along
        horizontal = vec[:, 0] != 0
        cx = torch.where(horizontal, pos_along, across)
        cy = torch.where(horizontal, across, pos_along)
        for k, kind in enumerate(VIDEO_SHAPES):
            sel = (si == k).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            mask = _shape_mask(kind, cy[sel], cx[sel], r[sel], zero[sel], size)[:, None]
            bg = bg_level[sel][:, None, None, None].expand(-1, 3, size, size)
            pixels[sel, :, f] = bg * (1 - mask) + fg[sel][:, :, None, None] * mask
    prompts = [
        f"{colour_names[c]} {VIDEO_SHAPES[s]} moving {dir_names[d]}"
        for c, s, d in zip(ci.tolist(), si.tolist(), di.tolist())
    ]
    return VideoBatch(pixels=pixels * 2 - 1, prompts=prompts)
