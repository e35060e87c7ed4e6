"""Attention backends, VAE tiling/slicing, weight offloading and worker loading (CPU, tiny pipelines).

``native`` must reproduce today's output bit for bit (it is diffusers' default kernel, now named
explicitly on every dispatching processor); a backend that cannot run here fails in one line that
says why and what can; VAE tiling changes a decode by less than diffusers' own test tolerance (0.5)
and really tiles; diffusers' group offloading composes with specdist's speculation hooks; workers
load only the transformer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_pipelines import flux_pipe, gens, hunyuan_video_pipe, text, wan_pipe

import specdist
from specdist.attention import apply_attention_backend, unavailable
from specdist.engine.config import CacheConfig
from specdist.engine.pipeline import last_stats
from specdist.engine.speculative import sample_cached
from specdist.errors import CheckpointError, ConfigError, SpecdistError
from specdist.memory import apply_group_offload, check_offload, configure_vae, resolve_dtype
from specdist.models import adapter_for
from specdist.sampling import initial_noise, model_device, sample_full

CPU = torch.device("cpu")


def _call(name: str, pipe) -> torch.Tensor:
    """Three steps of the stock pipeline, latent output, fixed inputs."""
    if name == "flux":
        return pipe(prompt_embeds=text(2, 4, 16, 1), pooled_prompt_embeds=text(1, 2, 8, 2)[0], height=16, width=16,
                    num_inference_steps=3, generator=gens(), output_type="latent").images
    if name == "hunyuan_video":
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, 4:] = 0
        return pipe(prompt_embeds=text(2, 6, 16, 1), pooled_prompt_embeds=text(1, 2, 8, 2)[0],
                    prompt_attention_mask=mask, height=16, width=16, num_frames=5, num_inference_steps=3,
                    generator=gens(), output_type="latent").frames
    return pipe(prompt_embeds=text(2, 6, 16, 1), negative_prompt_embeds=text(2, 6, 16, 2), height=32, width=32,
                num_frames=5, guidance_scale=5.0, num_inference_steps=3, generator=gens(), output_type="latent").frames


PIPES = {"flux": flux_pipe, "hunyuan_video": hunyuan_video_pipe, "wan": wan_pipe}


@pytest.mark.parametrize("name", list(PIPES))
def test_native_backend_reproduces_todays_output(name):
    today = _call(name, PIPES[name]())
    pipe = PIPES[name]()
    record = apply_attention_backend(pipe.transformer, adapter_for(pipe.transformer), "native")
    assert record["backend"] == "native" and record["set_on_processors"] == ["native"]
    assert record["processors_dispatched"] > 0
    assert torch.equal(_call(name, pipe), today)
    auto = PIPES[name]()
    assert apply_attention_backend(auto.transformer, adapter_for(auto.transformer), "auto")["backend"] == "native"
    assert torch.equal(_call(name, auto), today)


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])
def test_enable_sets_the_backend_and_speculates_as_before(name):
    cfg = CacheConfig(granularity="block", tau0=0.3, beta=1.0, max_run=3)
    plain = PIPES[name]()
    specdist.enable(plain, "speca", cfg)
    before = _call(name, plain)
    decisions = last_stats(plain)["cond"].decisions
    pipe = PIPES[name]()
    record = specdist.enable(pipe, "speca", cfg, attention_backend="native")
    assert record["backend"] == "native"
    assert torch.equal(_call(name, pipe), before) and last_stats(pipe)["cond"].decisions == decisions
    specdist.disable(pipe)
    with pytest.raises(SpecdistError, match=r"^specdist.enable: invalid value for 'attention_backend': 'flash'"):
        specdist.enable(PIPES[name](), "speca", cfg, attention_backend="flash")


def test_unusable_backends_are_one_line_naming_the_reason():
    flux, hv = flux_pipe().transformer, hunyuan_video_pipe().transformer
    for backend in ("flash", "flash3", "xformers", "sage"):
        with pytest.raises(ConfigError) as info:
            apply_attention_backend(flux, adapter_for(flux), backend)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"invalid value for 'attention_backend': {backend!r} (")
        assert "not usable because of missing package" in msg and msg.endswith("usable here: native)")
    # model facts come before packages: HunyuanVideo's key padding mask rules out flash and xformers anywhere
    assert "passes an attention mask" in unavailable("flash", hv, adapter_for(hv), CPU, torch.bfloat16)
    assert "dense [batch, heads, tokens, tokens]" in unavailable("xformers", hv, adapter_for(hv), CPU, torch.bfloat16)
    assert "context parallelism" in unavailable("flash_varlen", flux, adapter_for(flux), CPU, torch.bfloat16,
                                                 context_parallel=True)
    assert unavailable("native", flux, adapter_for(flux), CPU, torch.float32, context_parallel=True) is None
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(ConfigError, match="call SDPA themselves .* only 'native' applies; usable here: native"):
        apply_attention_backend(dit, adapter_for(dit), "flash_varlen")
    assert apply_attention_backend(dit, adapter_for(dit), "auto")["processors_sdpa"] == 1


def test_cli_refuses_an_uninstalled_backend_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "specdist", "generate", "--set", "model=dit-shapes", "--set",
                           "steps=2", "--set", "attention_backend=xformers", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid value for 'attention_backend': 'xformers'" in proc.stderr
    assert not (tmp_path / "o").exists()


def _decoder_calls(vae) -> list:
    calls: list = []
    vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("name", ["hunyuan_video", "flux"])
def test_vae_tiling_matches_untiled_decoding_within_diffusers_tolerance(name):
    pipe = PIPES[name]()
    adapter, vae = adapter_for(pipe.transformer), pipe.vae
    if name == "hunyuan_video":  # tiles of 160 px (20 latents) every 96 px: 2 x 2 tiles over 24 x 24 latents
        vae.enable_tiling(tile_sample_min_height=160, tile_sample_min_width=160, tile_sample_stride_height=96,
                          tile_sample_stride_width=96)
        latents = torch.randn(1, 4, 2, 24, 24, generator=torch.Generator().manual_seed(0))
    else:  # AutoencoderKL: tiles of its sample_size (32 px = 16 latents), 2 samples
        latents = torch.randn(2, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    small = latents[..., :2, :2]
    assert configure_vae(pipe, "auto", "auto", tuple(small.shape[1:]), 2, name)["tiling"] is False
    calls = _decoder_calls(vae)
    with torch.no_grad():
        untiled = adapter.pipeline_decode(pipe, latents)
        plain_calls = len(calls)
        record = configure_vae(pipe, "auto", "auto", tuple(latents.shape[1:]), 2, name)
        assert record["tiling"] is True and record["slicing"] is True and record["applies"]
        assert vae.use_tiling and vae.use_slicing
        calls.clear()
        tiled = adapter.pipeline_decode(pipe, latents)
    assert len(calls) >= 4 * plain_calls  # really decoded tile by tile (and sample by sample)
    diff = (tiled - untiled).abs().max()
    # diffusers' tiling tests allow a max difference of 0.5 (pixels in [-1, 1]); random-weight VAEs
    # need tiles of realistic size for that (GroupNorm statistics are taken per tile)
    assert 0 < diff < 0.5
    assert configure_vae(pipe, False, False, tuple(latents.shape[1:]), 2, name)["tiling"] is False
    assert vae.use_tiling is False and vae.use_slicing is False


def test_vae_settings_on_a_model_without_vae():
    assert configure_vae(None, "auto", "auto", (3, 8, 32, 32), 4, "hunyuan-shapes-video") == {
        "tiling": False, "slicing": False, "applies": False, "note": "hunyuan-shapes-video has no VAE"}
    with pytest.raises(ConfigError, match=r"^invalid value for 'vae.tiling': True \(allowed: auto or false; "
                                          r"hunyuan-shapes-video has no VAE"):
        configure_vae(None, True, "auto", (3, 8, 32, 32), 4, "hunyuan-shapes-video")


def test_dtype_auto_and_offload_checks():
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", "pipeline", cuda) == resolve_dtype("auto", "transformer", cuda) == "bfloat16"
    assert resolve_dtype("auto", "zoo", cuda) == resolve_dtype("auto", "pipeline", CPU) == "float32"
    assert resolve_dtype("float16", "zoo", CPU) == "float16"
    with pytest.raises(ConfigError, match=r"^invalid value for 'offload': 'group' \(allowed: none on cpu"):
        check_offload("group", CPU, "pipeline")
    with pytest.raises(ConfigError, match="'model' .* a zoo checkpoint"):
        check_offload("model", cuda, "zoo")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="group offloading needs the accelerate package"):
            check_offload("group", cuda, "zoo")
    else:
        check_offload("group", cuda, "zoo")


def test_group_offloading_composes_with_block_level_speculation():
    """diffusers' group offloading hooks (onload = offload = CPU here: the same hooks, no copies) under
    specdist's: τ = 0 is still full compute, and a speculating run gives the same bits. diffusers'
    group offloading needs accelerate (an optional dependency: the gpu extra)."""
    pytest.importorskip("accelerate")
    from test_adapters import FAMILIES, _setup

    model, adapter, shape, cond, _ = _setup("hunyuan_video")
    sched, noise = FAMILIES["hunyuan_video"][3](), initial_noise(shape, [0, 1])
    cfg = CacheConfig(granularity="block", tau0=0.3, beta=1.0, max_run=3)
    ref_full = sample_full(model, adapter, sched, cond, noise, 6, progress=False)
    ref_spec = sample_cached(model, adapter, sched, cond, noise, 6, "speca", cfg, progress=False)
    fresh = type(model).from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    apply_group_offload(fresh, CPU)
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    assert _is_group_offload_enabled(fresh) and model_device(fresh) == CPU
    exact = sample_cached(fresh, adapter, sched, cond, noise, 6, "speca", cfg, progress=False,
                          threshold_fn=lambda i: 0.0)
    assert torch.equal(exact.latents, ref_full.latents)
    spec = sample_cached(fresh, adapter, sched, cond, noise, 6, "speca", cfg, progress=False)
    assert spec.stats.decisions == ref_spec.stats.decisions and "A" in "".join(spec.stats.decisions[0])
    assert torch.equal(spec.latents, ref_spec.latents)


def test_workers_load_only_the_transformer_of_a_pipeline(tmp_path):
    from specdist.loading import load_model
    from specdist.runtime.jobs import WorkerSpec
    from specdist.runtime.worker import StepWorker, load_worker_model

    pipe = hunyuan_video_pipe()  # no text encoders: the saved pipeline cannot be loaded whole ...
    pipe.save_pretrained(tmp_path / "hv")
    with pytest.raises(CheckpointError, match=f"could not load pipeline checkpoint at {tmp_path / 'hv'}: Pipeline"):
        load_model(str(tmp_path / "hv"), device="cpu")
    spec = WorkerSpec(model=str(tmp_path / "hv"), device="cpu", dtype="auto", scheduler=None, scheduler_config={},
                      prompts=("a",), labels=(), guidance=6.0, seed=0, steps=2, method="full", cache={}, peer={})
    bundle = load_worker_model(spec)  # ... but a worker loads only what it computes with
    assert bundle.pipeline is None and bundle.text_encoder is None and bundle.setup["components"] == "transformer"
    assert bundle.setup["attention"]["backend"] == "native" and bundle.setup["dtype"] == "float32"
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
    assert json.dumps(public(bundle.scheduler.config)) == json.dumps(public(pipe.scheduler.config))
    for a, b in zip(pipe.transformer.state_dict().values(), bundle.transformer.state_dict().values()):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(0)
    cond = bundle.adapter.random_conditioning(bundle.transformer, 1, gen)
    worker = StepWorker.from_spec(spec, cond)
    assert worker.cond.kwargs["encoder_hidden_states"].shape == cond.kwargs["encoder_hidden_states"].shape
    worker.close()


def test_report_records_backend_dtype_vae_offload_and_cache_memory(tmp_path):
    from specdist.config import load_config
    from specdist.generate import run_generate

    cfg = load_config(None, ["steps=6", "num_samples=1", "method=speca", "cache.granularity=block",
                             "cache.storage_dtype=bfloat16", "cache.host_offload=true", "reference=false",
                             f"output.dir={tmp_path / 'o'}"])
    report = run_generate(cfg, progress=False, log=lambda m: None)
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["attention"] == report["attention"] and saved["attention"]["backend"] == "native"
    assert saved["attention"]["requested"] == "auto" and saved["dtype"] == "float32"
    assert saved["vae"]["applies"] is False and saved["offload"]["offload"] == "none"
    mem = saved["memory"]
    assert mem["cache_host_bytes"] == mem["cache_bytes"] == saved["cache_bytes"] > 0 and mem["cache_device_bytes"] == 0
    assert "no CUDA device" in mem["note"] and mem["torch_max_memory_allocated_mib"] is None
    assert saved["config"]["cache"]["storage_dtype"] == "bfloat16" and saved["config"]["attention_backend"] == "auto"


@pytest.mark.parametrize("name", ["hunyuan-video-720p", "hunyuan-video-720p-8gpu"])
def test_the_gpu_configs_validate(name):
    from specdist.config import load_config

    cfg = load_config(f"configs/{name}.yaml", ["model=/models/HunyuanVideo"])
    assert (cfg.height, cfg.width, cfg.frames, cfg.device, cfg.dtype) == (720, 1280, 129, "cuda", "auto")
    if name.endswith("8gpu"):
        assert cfg.runtime.mode == "latency" and cfg.runtime.workers == 8
        with pytest.raises(ConfigError, match="'cache.storage_dtype': 'float8_e4m3fn' .* runtime.mode=latency"):
            load_config(f"configs/{name}.yaml", ["cache.storage_dtype=float8_e4m3fn"])
    else:
        assert cfg.cache.host_offload and cfg.cache.granularity == "block"
