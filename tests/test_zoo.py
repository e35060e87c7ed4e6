"""The shipped zoo: checkpoints load, reproduce their committed reference outputs, and the
training data is a pure function of its seed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from specdist.loading import load_model
from specdist.zoo import ZOO_SPECS, checkpoint_path, zoo_listing
from specdist.zoo.data import moving_shape_videos, shape_images, video_prompts


def _reference_module(repo_root):
    spec = importlib.util.spec_from_file_location("make_zoo_reference", repo_root / "scripts" / "make_zoo_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(ZOO_SPECS))
def test_checkpoint_reproduces_committed_reference(name, repo_root, tmp_path):
    reference = load_file(str(repo_root / "tests" / "data" / "zoo_reference.safetensors"))[name]
    latents = _reference_module(repo_root).reference_latents(name, tmp_path / name)
    assert latents.shape == reference.shape
    torch.testing.assert_close(latents, reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ZOO_SPECS))
def test_checkpoint_metadata_records_training(name):
    meta = json.loads((checkpoint_path(name) / "specdist_model.json").read_text())
    training = meta["training"]
    assert training["command"].startswith("python -m specdist.zoo.train")
    assert training["steps"] > 0 and training["wall_s"] > 0 and training["final_loss_ema"] > 0
    bundle = load_model(name, device="cpu")
    assert sum(p.numel() for p in bundle.transformer.parameters()) + sum(
        p.numel() for p in (bundle.text_encoder.parameters() if bundle.text_encoder else [])) == meta["parameters"]
    assert bundle.transformer.dtype == torch.float32  # fp16 on disk, fp32 compute by default


def test_zoo_size_budget():
    total = sum(f.stat().st_size for name in ZOO_SPECS for f in checkpoint_path(name).rglob("*") if f.is_file())
    assert total <= 20 * 2**20
    assert all(row["available"] for row in zoo_listing())


def test_datasets_are_pure_functions_of_the_seed():
    a = shape_images(6, torch.Generator().manual_seed(3))
    b = shape_images(6, torch.Generator().manual_seed(3))
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels)
    assert a.pixels.min() >= -1 and a.pixels.max() <= 1
    v = moving_shape_videos(4, torch.Generator().manual_seed(3))
    w = moving_shape_videos(4, torch.Generator().manual_seed(3))
    assert torch.equal(v.pixels, w.pixels) and v.prompts == w.prompts
    assert set(v.prompts) <= set(video_prompts())


def test_video_motion_matches_the_prompt():
    clips = moving_shape_videos(16, torch.Generator().manual_seed(0))
    for pixels, prompt in zip(clips.pixels, clips.prompts):
        brightness = (pixels.mean(dim=0) + 1)  # [F, H, W]
        mass = brightness - brightness.amin(dim=(1, 2), keepdim=True)
        ys = torch.arange(32.0).view(1, 32, 1)
        xs = torch.arange(32.0).view(1, 1, 32)
        cy = (mass * ys).sum(dim=(1, 2)) / mass.sum(dim=(1, 2))
        cx = (mass * xs).sum(dim=(1, 2)) / mass.sum(dim=(1, 2))
        direction = prompt.split()[-1]
        dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        moved = {"right": dx, "left": -dx, "down": dy, "up": -dy}[direction]
        assert moved > 5.0, (prompt, dx, dy)
