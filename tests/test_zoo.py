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
from specdist.zoo.data import image_prompts, moving_shape_videos, prompted_shape_images, shape_images, video_prompts


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
    p = prompted_shape_images(12, torch.Generator().manual_seed(3))
    q = prompted_shape_images(12, torch.Generator().manual_seed(3))
    assert torch.equal(p.pixels, q.pixels) and p.prompts == q.prompts
    assert set(p.prompts) <= set(image_prompts()) and len(set(image_prompts())) == 32
    assert p.pixels.min() >= -1 and p.pixels.max() <= 1


def test_prompted_images_are_the_shape_images_named_by_colour_and_class():
    """Same draws as the class-conditional stream: the prompt names the image's class and its colour."""
    from specdist.zoo.data import COLOURS, SHAPE_CLASSES

    images = shape_images(24, torch.Generator().manual_seed(5))
    prompted = prompted_shape_images(24, torch.Generator().manual_seed(5))
    assert torch.equal(images.pixels, prompted.pixels)
    for label, pixels, prompt in zip(images.labels.tolist(), prompted.pixels, prompted.prompts):
        colour, shape = prompt.split(" ", 1)
        assert shape == SHAPE_CLASSES[label]
        rgb = ((pixels + 1) / 2).flatten(1)
        brightest = rgb[:, rgb.sum(dim=0).argmax()]  # the foreground is brighter than any background
        assert torch.allclose(brightest, torch.tensor(COLOURS[colour]), atol=0.02), prompt


@pytest.mark.parametrize("name", sorted(ZOO_SPECS))
def test_training_step_runs_for_every_spec(name):
    """One loss and backward pass of each zoo recipe on a fresh model (batch 2)."""
    from specdist.zoo.build import build_text_encoder, build_transformer
    from specdist.zoo.train import _batch, _loss

    spec = ZOO_SPECS[name]
    gen = torch.Generator().manual_seed(0)
    model, text_encoder = build_transformer(spec), build_text_encoder(spec)
    noise_sched = None
    if spec.objective == "v_prediction":
        from diffusers import DDPMScheduler

        noise_sched = DDPMScheduler(beta_schedule=spec.scheduler_config["beta_schedule"], prediction_type="v_prediction")
    x0, cond = _batch(spec, 2, gen)
    assert tuple(x0.shape) == (2, *spec.sample_shape)
    loss = _loss(spec, model, text_encoder, noise_sched, x0, cond, gen, cfg_drop=0.5, sigma_sampling="mixed")
    loss.backward()
    assert torch.isfinite(loss)
    trained = [model] + ([text_encoder] if text_encoder is not None else [])
    assert all(p.grad is not None for m in trained for p in m.parameters()), "a parameter the loss never reaches"


def test_wan_zoo_conditioning_is_zero_padded_states_only():
    """Wan takes per-token states zeroed after the prompt (as WanPipeline pads), no mask, no pooled vector;
    the empty prompt (guidance) is the one <null> token."""
    bundle = load_model("wan-shapes", device="cpu")
    cond = bundle.encode(["red circle", "blue vertical stripes"], [], 3.5, 0)
    assert set(cond.kwargs) == {"encoder_hidden_states"} and set(cond.uncond_kwargs) == {"encoder_hidden_states"}
    states, null = cond.kwargs["encoder_hidden_states"], cond.uncond_kwargs["encoder_hidden_states"]
    assert states.shape == null.shape == (2, bundle.text_encoder.config.max_length, bundle.transformer.config.text_dim)
    for row, words in enumerate((2, 3)):
        assert (states[row, :words].abs().sum(dim=-1) > 0).all() and not states[row, words:].any()
    assert (null[:, 0].abs().sum(dim=-1) > 0).all() and not null[:, 1:].any()
    assert bundle.encode(["red circle"], [], 1.0, 0).uncond_kwargs is None


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


def test_init_from_maps_a_two_frame_patch_onto_one_frame():
    """``--init-from`` across a temporal patch change: a static clip embeds as before, and the head's
    one frame slot is the mean of the old two."""
    import torch

    from specdist.zoo.build import build_transformer
    from specdist.zoo.specs import ZOO_SPECS
    from specdist.zoo.train import _adapt_patch_t

    model = build_transformer(ZOO_SPECS["hunyuan-shapes-video"])  # patch 1x4x4
    gen = torch.Generator().manual_seed(0)
    old = {"x_embedder.proj.weight": torch.randn(64, 3, 2, 4, 4, generator=gen),
           "proj_out.weight": torch.randn(96, 64, generator=gen), "proj_out.bias": torch.randn(96, generator=gen)}
    state = dict(old)
    assert sorted(_adapt_patch_t(state, model)) == ["proj_out.bias", "proj_out.weight", "x_embedder.proj.weight"]
    frame = torch.randn(1, 3, 1, 4, 4, generator=gen)
    two = torch.cat([frame, frame], dim=2)
    assert torch.allclose((old["x_embedder.proj.weight"][None] * two[:, None]).sum(dim=(2, 3, 4, 5)),
                          (state["x_embedder.proj.weight"][None] * frame[:, None]).sum(dim=(2, 3, 4, 5)), atol=1e-5)
    rows = old["proj_out.weight"].view(3, 2, 16, 64)
    assert torch.allclose(state["proj_out.weight"], rows.mean(dim=1).reshape(48, 64))
    assert state["proj_out.weight"].shape == model.proj_out.weight.shape
