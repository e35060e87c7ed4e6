"""Write generated pixels as PNG grids, MP4 clips and GIFs, atomically.

Inputs are float tensors in ``[-1, 1]``: images ``[B, 3, H, W]``, videos ``[B, 3, F, H, W]``
(1-channel inputs are repeated to RGB). Values are clamped, NaNs become 0 (mid-grey).
Every file is written to a temporary name in the destination directory and moved into place
with ``os.replace``, so an interrupted run never leaves a half-written file under the final name.
Upscaling is nearest-neighbour by an integer factor; by default the smallest factor that makes
the output at least ``MIN_WIDTH`` (256) pixels wide, capped at ``MAX_AUTO_SCALE`` (16).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch

__all__ = ["save_gif", "save_image_grid", "save_video", "save_video_grid_png", "to_uint8"]

MIN_WIDTH = 256
MAX_AUTO_SCALE = 16
_PAD = 2  # pixels of black between tiles


def _check(pixels: torch.Tensor, ndim: int, expected: str) -> torch.Tensor:
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != ndim or pixels.shape[1] not in (1, 3) \
            or pixels.shape[0] < 1 or any(s < 1 for s in pixels.shape[2:]):
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"expected pixels of shape {expected} in [-1, 1], got {got}")
    return pixels if pixels.shape[1] == 3 else pixels.expand(-1, 3, *pixels.shape[2:])


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Map ``[-1, 1]`` floats to ``uint8`` (same shape, channels unchanged) as a numpy array."""
    x = torch.nan_to_num(pixels.detach().to(device="cpu", dtype=torch.float32), nan=0.0)
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).numpy()


def _auto_scale(width: int, scale: int | None) -> int:
    if scale is None:
        return max(1, min(MAX_AUTO_SCALE, math.ceil(MIN_WIDTH / max(width, 1))))
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of ``[..., H, W, C]`` by ``scale``."""
    if scale == 1:
        return arr
    return arr.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _tile(tiles: np.ndarray, nrow: int) -> np.ndarray:
    """Tile ``[N, H, W, C]`` into rows of ``nrow`` with ``_PAD`` px of black between tiles."""
    n, h, w, c = tiles.shape
    rows = math.ceil(n / nrow)
    out = np.zeros((rows * h + (rows - 1) * _PAD, nrow * w + (nrow - 1) * _PAD, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[r * (h + _PAD): r * (h + _PAD) + h, k * (w + _PAD): k * (w + _PAD) + w] = tiles[i]
    return out


def _atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file next to ``path`` (same suffix), then ``os.replace`` it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _write_png(arr: np.ndarray, path: str | os.PathLike[str]) -> Path:
    return _atomic(path, lambda tmp: iio.imwrite(tmp, arr, extension=".png"))


def save_image_grid(pixels: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None,
                    scale: int | None = None) -> Path:
    """Save images ``[B, 3, H, W]`` in ``[-1, 1]`` as one PNG grid; returns the path.

    ``nrow``: images per row (default ``ceil(sqrt(B))``). ``scale``: integer nearest-neighbour
    upscaling (default: smallest making the grid at least 256 px wide).
    """
    x = _check(pixels, 4, "[B, 3, H, W]")
    b, _, _, w = x.shape
    nrow = int(nrow) if nrow is not None else math.ceil(math.sqrt(b))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    nrow = min(nrow, b)
    s = _auto_scale(nrow * w, scale)
    tiles = _upscale(to_uint8(x).transpose(0, 2, 3, 1), s)
    return _write_png(_tile(tiles, nrow), path)


def _video_frames(pixels: torch.Tensor, scale: int | None) -> np.ndarray:
    """``[B, 3, F, H, W]`` -> ``[F, H', W', 3]`` uint8 with the batch side by side."""
    x = _check(pixels, 5, "[B, 3, F, H, W]")
    b, _, f, h, w = x.shape
    s = _auto_scale(b * w, scale)
    arr = _upscale(to_uint8(x).transpose(2, 0, 3, 4, 1), s)  # [F, B, H, W, 3]
    return np.stack([_tile(arr[i], b) for i in range(f)])


def save_video(pixels: torch.Tensor, path: str | os.PathLike[str], fps: int = 8,
               scale: int | None = None) -> Path:
    """Save videos ``[B, 3, F, H, W]`` in ``[-1, 1]`` as one H.264/yuv420p MP4, samples side by side.

    Frames are upscaled by ``scale`` (default: to at least 256 px wide) and padded with black
    to multiples of 16 px (what H.264/yuv420p players expect). Returns the path.
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    frames = _video_frames(pixels, scale)
    _, h, w, _ = frames.shape
    h16, w16 = -(-h // 16) * 16, -(-w // 16) * 16
    if (h16, w16) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, h16 - h), (0, w16 - w), (0, 0)))

    def write(tmp: Path) -> None:
        gen = imageio_ffmpeg.write_frames(str(tmp), (w16, h16), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                          quality=8, macro_block_size=16, ffmpeg_log_level="error",
                                          output_params=["-movflags", "+faststart"])
        gen.send(None)
        try:
            for frame in frames:
                gen.send(np.ascontiguousarray(frame))
        finally:
            gen.close()

    return _atomic(path, write)


def save_video_grid_png(pixels: torch.Tensor, path: str | os.PathLike[str], scale: int | None = None,
                        max_frames: int | None = 16) -> Path:
    """Save videos ``[B, 3, F, H, W]`` as a PNG contact sheet: one row per sample, one column per frame.

    At most ``max_frames`` evenly spaced frames (first and last included) are shown; ``None``
    shows all. ``scale`` as in :func:`save_image_grid`. Returns the path.
    """
    x = _check(pixels, 5, "[B, 3, F, H, W]")
    b, _, f, _, w = x.shape
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames!r}")
    cols = f if max_frames is None else min(f, max_frames)
    idx = np.unique(np.linspace(0, f - 1, cols).round().astype(int)) if cols < f else np.arange(f)
    s = _auto_scale(len(idx) * w, scale)
    arr = _upscale(to_uint8(x[:, :, torch.as_tensor(idx)]).transpose(0, 2, 3, 4, 1), s)  # [B, F', H, W, 3]
    return _write_png(_tile(arr.reshape(-1, *arr.shape[2:]), len(idx)), path)


def save_gif(pixels: torch.Tensor, path: str | os.PathLike[str], fps: int = 8, scale: int | None = None) -> Path:
    """Save videos ``[B, 3, F, H, W]`` as a looping GIF, samples side by side. Returns the path."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    frames = _video_frames(pixels, scale)
    return _atomic(path, lambda tmp: iio.imwrite(tmp, frames, extension=".gif", duration=1000.0 / fps, loop=0))
