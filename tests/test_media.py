"""Media writers: PNG grids, MP4 clips, contact sheets, GIFs; atomic writes and shape checks."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from specdist import media


def _no_temp_files(d: Path) -> bool:
    return not [p for p in d.iterdir() if ".tmp" in p.name]


def test_image_grid_png_size_and_values(tmp_path: Path) -> None:
    px = torch.full((3, 3, 8, 10), -1.0)
    px[0] = 1.0  # first tile white, the rest black
    out = media.save_image_grid(px, tmp_path / "sub" / "grid.png", nrow=2, scale=2)
    img = iio.imread(out)
    # 2 columns x 2 rows of 16x20 tiles with 2 px gaps
    assert img.shape == (2 * 16 + 2, 2 * 20 + 2, 3) and img.dtype == np.uint8
    assert (img[:16, :20] == 255).all() and (img[:16, 22:] == 0).all()
    assert _no_temp_files(out.parent) and [p.name for p in out.parent.iterdir()] == ["grid.png"]


def test_image_grid_default_scale_reaches_256(tmp_path: Path) -> None:
    out = media.save_image_grid(torch.zeros(4, 3, 16, 16), tmp_path / "g.png")
    h, w, _ = iio.imread(out).shape
    assert w >= 256 and h == w  # 2x2 grid of square tiles
    assert iio.imread(out)[0, 0].tolist() == [128, 128, 128]  # 0.0 -> mid grey


def test_video_mp4_frames_and_size(tmp_path: Path) -> None:
    t = torch.linspace(-1, 1, 5)
    px = t.view(1, 1, 5, 1, 1).expand(2, 3, 5, 12, 12).contiguous()
    out = media.save_video(px, tmp_path / "v.mp4", fps=4, scale=3)
    frames = np.stack(list(iio.imiter(out)))  # read back through imageio
    assert frames.shape[0] == 5
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    reader.close()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 4.0
    # 2 samples side by side: 36 + 2 + 36 = 74 -> padded to 80; height 36 -> 48
    assert frames.shape[1:] == (48, 80, 3)
    means = frames[:, :36, :36].reshape(5, -1).mean(axis=1)
    assert np.all(np.diff(means) > 20)  # brightness ramps over time
    assert _no_temp_files(tmp_path)


def test_video_grid_png_rows_are_samples(tmp_path: Path) -> None:
    px = -torch.ones(2, 3, 20, 8, 8)
    px[1] = 1.0
    out = media.save_video_grid_png(px, tmp_path / "frames.png", scale=1, max_frames=4)
    img = iio.imread(out)
    assert img.shape == (2 * 8 + 2, 4 * 8 + 3 * 2, 3)
    assert (img[:8] == 0).all() and (img[10:, :8] == 255).all() and (img[10:, 8:10] == 0).all()


def test_gif(tmp_path: Path) -> None:
    px = torch.linspace(-1, 1, 3).view(1, 1, 3, 1, 1).expand(1, 3, 3, 8, 8)  # distinct frames (Pillow merges repeats)
    out = media.save_gif(px, tmp_path / "a.gif", scale=2)
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (3, 16, 16) and _no_temp_files(tmp_path)


@pytest.mark.parametrize(("fn", "bad"), [
    (media.save_image_grid, torch.zeros(3, 8, 8)),
    (media.save_image_grid, torch.zeros(1, 4, 8, 8)),
    (media.save_video, torch.zeros(1, 3, 8, 8)),
    (media.save_video_grid_png, torch.zeros(2, 3, 4, 8)),
])
def test_bad_shape_raises(tmp_path: Path, fn: object, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected pixels of shape \[B, 3, "):
        fn(bad, tmp_path / "x.out")  # type: ignore[operator]
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")

    def boom(*args: object, **kwargs: object) -> None:
        Path(args[0]).write_bytes(b"half")  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr(media.iio, "imwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        media.save_image_grid(torch.zeros(1, 3, 4, 4), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
