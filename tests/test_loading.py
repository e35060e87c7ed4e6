"""Model loading: local checkpoints in each supported layout, and clear errors for bad paths."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from specdist.errors import CheckpointError, ConfigError
from specdist.loading import load_model


def _tiny_dit(path):
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    model.save_pretrained(path)
    return model


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError) as info:
        load_model(str(missing), device="cpu")
    assert str(missing) in str(info.value) and "model_index.json" in str(info.value)


def test_unknown_zoo_like_name_is_a_missing_path():
    with pytest.raises(CheckpointError, match="model path not found: dit-shapez"):
        load_model("dit-shapez", device="cpu")


def test_directory_without_model_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=f"not a model directory: {tmp_path}"):
        load_model(str(tmp_path), device="cpu")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_model(str(f), device="cpu")


def test_bare_transformer_loads_with_named_scheduler(tmp_path):
    original = _tiny_dit(tmp_path / "dit")
    bundle = load_model(str(tmp_path / "dit"), device="cpu", scheduler="DDIMScheduler")
    assert bundle.source == "transformer" and isinstance(bundle.scheduler, DDIMScheduler)
    for a, b in zip(original.state_dict().values(), bundle.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert bundle.latent_shape(None, None, None) == (4, 8, 8)


def test_bare_transformer_needs_a_scheduler(tmp_path):
    _tiny_dit(tmp_path / "dit")
    with pytest.raises(ConfigError, match="invalid value for 'scheduler': None"):
        load_model(str(tmp_path / "dit"), device="cpu")
    with pytest.raises(ConfigError, match="'NotAScheduler'"):
        load_model(str(tmp_path / "dit"), device="cpu", scheduler="NotAScheduler")


def test_malformed_checkpoints_name_the_path(tmp_path):
    _tiny_dit(tmp_path / "dit")
    (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"could not load transformer checkpoint at {tmp_path / 'dit'}"):
        load_model(str(tmp_path / "dit"), device="cpu", scheduler="DDIMScheduler")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="no specdist adapter for UNet2DModel"):
        load_model(str(odd), device="cpu", scheduler="DDIMScheduler")


def test_cuda_without_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_model("dit-shapes", device="cuda")


def test_bare_transformer_samples_with_its_saved_scheduler_config(tmp_path):
    """A v-prediction checkpoint saved with ``scheduler/`` samples as its pipeline would, not with the
    class defaults (epsilon): same latents as the zoo model it was copied from."""
    from specdist.sampling import initial_noise, sample_full

    zoo = load_model("dit-shapes", device="cpu")
    bare = tmp_path / "dit"
    zoo.transformer.save_pretrained(bare)
    zoo.scheduler.save_pretrained(bare / "scheduler")
    bundle = load_model(str(bare), device="cpu")  # no `scheduler` needed: it is saved beside the weights
    assert bundle.source == "transformer" and type(bundle.scheduler) is type(zoo.scheduler)
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    cond = zoo.encode([], ["circle"], 1.0, 0)
    noise = initial_noise(zoo.latent_shape(None, None, None), [0])
    ref = sample_full(zoo.transformer, zoo.adapter, zoo.scheduler, cond, noise, 4, progress=False)
    got = sample_full(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, 4, progress=False)
    assert torch.equal(ref.latents, got.latents)
    # the saved config beside the weights (no subfolder) is found too; the job may override its keys
    (bare / "scheduler" / "scheduler_config.json").rename(bare / "scheduler_config.json")
    eps = load_model(str(bare), device="cpu", scheduler_config={"prediction_type": "epsilon"})
    assert eps.scheduler.config.prediction_type == "epsilon" and eps.scheduler.config.timestep_spacing == "trailing"
    wrong = sample_full(eps.transformer, eps.adapter, eps.scheduler, cond, noise, 4, progress=False)
    assert not torch.equal(ref.latents, wrong.latents)


def test_scheduler_swap_and_bad_scheduler_keys():
    from diffusers import DDPMScheduler

    bundle = load_model("dit-shapes", device="cpu", scheduler="DDPMScheduler")
    assert isinstance(bundle.scheduler, DDPMScheduler)
    assert bundle.scheduler.config.prediction_type == "v_prediction"  # the model's own keys carry over
    with pytest.raises(ConfigError, match=r"unknown config key 'scheduler_config.bogus' for DDIMScheduler \(allowed: "):
        load_model("dit-shapes", device="cpu", scheduler_config={"bogus": 1})
    with pytest.raises(ConfigError, match="invalid value for 'scheduler': 'Foo'"):
        load_model("dit-shapes", device="cpu", scheduler="Foo")


def test_bare_wan_transformer_loads_without_accelerate(tmp_path):
    """Wan keeps some modules in fp32, which diffusers loads only through accelerate; specdist loads it
    either way, with the same weights and the same fp32 modules under a lower-precision dtype."""
    from diffusers import WanTransformer3DModel

    original = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2)
    original.save_pretrained(tmp_path / "wan")
    bundle = load_model(str(tmp_path / "wan"), device="cpu", scheduler="FlowMatchEulerDiscreteScheduler")
    assert bundle.adapter.family == "wan" and bundle.transformer.dtype == torch.float32
    loaded = bundle.transformer.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in original.state_dict().items())
    half = load_model(str(tmp_path / "wan"), device="cpu", dtype="bfloat16", scheduler="FlowMatchEulerDiscreteScheduler")
    dtypes = {n: p.dtype for n, p in half.transformer.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["scale_shift_table"] == torch.float32


def test_pipeline_directory_is_loaded_from_disk_and_generates(tmp_path):
    """A diffusers pipeline saved to a directory (``model_index.json``: transformer, VAE, scheduler)
    is loaded by its path: the same weights and sampler as before saving, the pipeline's own label
    table (``id2label``, several names per id, names not sorted by id), and ``specdist generate``
    decodes with its VAE."""
    from diffusers import DiTPipeline

    from specdist.cli import main
    from specdist.sampling import initial_noise, sample_full
    from tiny_pipelines import image_vae

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    pipe = DiTPipeline(transformer=model, vae=image_vae(4), scheduler=scheduler)
    path = tmp_path / "pipe"
    pipe.save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {"0": "dog", "1": "cat, kitty"}  # as DiT pipelines on the Hub carry it
    (path / "model_index.json").write_text(json.dumps(index))

    bundle = load_model(str(path), device="cpu")
    assert bundle.source == "pipeline" and bundle.conditioning == "class"
    assert bundle.class_ids(["cat", "kitty", "dog", "3"]) == [1, 1, 0, 3]
    assert bundle.scheduler.config.timestep_spacing == "trailing"
    cond = bundle.encode([], ["cat"], 4.0, 0)
    noise = initial_noise(bundle.latent_shape(None, None, None), [0])
    want = sample_full(model, bundle.adapter, scheduler, cond, noise, 3, progress=False)
    got = sample_full(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, 3, progress=False)
    assert torch.equal(want.latents, got.latents)

    out = tmp_path / "out"
    assert main(["generate", "--quiet", "--set", f"model={path}", "--set", "steps=3", "--set", "num_samples=2",
                 "--set", "class_labels=[kitty, dog]", "--set", "method=taylorseer", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model_source"] == "pipeline" and report["conditioning"] == "class"
    assert report["class_labels"] == ["kitty", "dog"] and report["media"] == ["grid.png"]
    assert (out / "grid.png").stat().st_size > 0  # decoded by the pipeline's VAE
    assert report["reference"]["pixels"] is not None


def test_bare_text_transformer_reports_random_conditioning(tmp_path):
    """A text-conditioned transformer without a text encoder samples from random conditioning, and
    the report says so (the prompts are not used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    from specdist.cli import main

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(2, 2, 4))
    model.save_pretrained(tmp_path / "bare")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "bare" / "scheduler")
    out = tmp_path / "out"
    assert main(["generate", "--quiet", "--set", f"model={tmp_path / 'bare'}", "--set", "steps=2",
                 "--set", "num_samples=1", "--set", "height=8", "--set", "width=8", "--set", "frames=2",
                 "--set", "prompt=[red square moving right]", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model_source"] == "transformer" and report["conditioning"] == "random"
    assert "random conditioning" in report["conditioning_note"] and "prompts are not used" in report["conditioning_note"]
    assert report["media"] == [] and (out / "latents.safetensors").is_file()  # latents only


@pytest.mark.parametrize("refresh,exact", [(1.0, True), (0.25, False)])
def test_bare_flux_transformer_runs_specdiff_from_the_cli(tmp_path, refresh, exact):
    """``specdist generate`` on a local FLUX transformer directory runs token-level specdiff:
    refreshing every token reproduces the full-compute reference bit for bit, a partial refresh does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from specdist.cli import main

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    model.save_pretrained(tmp_path / "flux")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(tmp_path / "flux" / "scheduler")
    out = tmp_path / "out"
    assert main(["generate", "--quiet", "--set", f"model={tmp_path / 'flux'}", "--set", "method=specdiff",
                 "--set", "steps=7", "--set", "num_samples=2", "--set", "height=8", "--set", "width=8",
                 "--set", "cache.interval=3", "--set", f"cache.token_refresh={refresh}", "--set", "reference=true",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "specdiff" and report["family"] == "flux"
    assert "A" in report["decisions"][0]  # token steps ran
    assert (report["output_sha256"] == report["reference"]["output_sha256_full"]) == exact
