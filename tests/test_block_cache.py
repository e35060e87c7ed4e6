"""Block-level caching (``cache.granularity: block``) on all five families, tiny random weights.

The mechanics are checked where they must be exact: a speculative call fed the branches recorded
at the same state reproduces the full call bit for bit (so every gate, norm and skipped submodule
is wired right), also with an uncached prefix (``start > 0``); a speculative call runs no
attention or MLP outside the probe; and the modulation really is the current step's (changing only
the timestep changes the output although the branches are the same).
"""

from __future__ import annotations

import pytest
import torch
from forecast_check import Tap, assert_accepted_are_extrapolations
from test_adapters import FAMILIES, T, _setup

from specdist.engine.config import CacheConfig
from specdist.engine.hooks import HOOK_NAME, SpeculationHooks
from specdist.engine.speculative import fit_region, sample_cached
from specdist.errors import ConfigError
from specdist.sampling import initial_noise, sample_full


def _call(adapter, model, latents, cond, t=T):
    with torch.inference_mode():
        return adapter.forward(model, latents, t, cond.kwargs, cond.extra)


def _record(hooks, adapter, model, latents, cond, start=0):
    plan = hooks.plan("record", start=start)
    out = _call(adapter, model, latents, cond)
    return out, {name: plan.recorded[name] for name in hooks.feature_names(start)}


def _linear_calls(block) -> tuple[list, list]:
    calls, handles = [], []
    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(k in name for k in ("norm", "linear", "emb")):
            handles.append(mod.register_forward_hook(lambda m, i, o, name=name: calls.append(name)))
    return calls, handles


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("start", [0, 1])
def test_speculating_with_the_recorded_branches_reproduces_the_full_call(family, start):
    model, adapter, _, cond, latents = _setup(family)
    hooks = SpeculationHooks(model, adapter, granularity="block")
    try:
        full, feats = _record(hooks, adapter, model, latents, cond, start)
        for verify in (False, True):
            hooks.plan("speculate", verify=verify, forecast=feats, start=start)
            spec = _call(adapter, model, latents, cond)
            assert torch.equal(spec, full), (family, start, verify)
    finally:
        hooks.remove()
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or HOOK_NAME not in registry.hooks
    assert torch.equal(_call(adapter, model, latents, cond), full)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_speculative_call_computes_only_the_probe_and_regates_with_the_current_step(family):
    model, adapter, _, cond, latents = _setup(family)
    blocks = adapter.blocks(model)
    hooks = SpeculationHooks(model, adapter, granularity="block")
    watched = [_linear_calls(b) for b in blocks]
    try:
        _, feats = _record(hooks, adapter, model, latents, cond)
        for calls, _ in watched:
            calls.clear()
        hooks.plan("speculate", verify=True, forecast=feats)
        same_branches_later = _call(adapter, model, latents, cond, t=torch.tensor(200))
        assert all(not calls for calls, _ in watched[:-1])  # no attention/MLP matmul before the probe
        assert watched[-1][0]  # the probe (last block) ran
        hooks.plan("off")
        assert not torch.equal(same_branches_later, _call(adapter, model, latents, cond))
    finally:
        for _, handles in watched:
            for h in handles:
                h.remove()
        hooks.remove()


def test_fit_region_keeps_the_order_then_shrinks_the_region_then_lowers_the_order():
    sizes = [100, 80, 60, 40, 20]  # bytes of the region starting at block i
    assert fit_region(2, lambda s: sizes[s], 4, 0) == (2, 0)
    assert fit_region(2, lambda s: sizes[s], 4, 300) == (2, 0)
    assert fit_region(2, lambda s: sizes[s], 4, 200) == (2, 2)
    assert fit_region(2, lambda s: sizes[s], 4, 50) == (1, 4)
    assert fit_region(2, lambda s: sizes[s], 2, 150) == (1, 2)  # last_start bounds the region
    with pytest.raises(ConfigError, match="cache.max_cache_bytes"):
        fit_region(2, lambda s: sizes[s], 4, 10)


def _tiny_video(samples: int = 2):
    model, adapter, shape, cond, _ = _setup("hunyuan_video", batch=samples)
    sched = FAMILIES["hunyuan_video"][3]()
    noise = initial_noise(shape, list(range(samples)))
    return model, adapter, sched, cond, noise


def test_block_level_speca_tau_zero_is_full_and_huge_tau_accepts():
    model, adapter, sched, cond, noise = _tiny_video()
    ref = sample_full(model, adapter, sched, cond, noise, 8, progress=False)
    cfg = CacheConfig(granularity="block", order=1, max_run=3)
    exact = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False,
                          threshold_fn=lambda i: 0.0)
    assert torch.equal(exact.latents, ref.latents)
    ff = Tap(adapter.blocks(model)[0].ff)  # a branch of a block before the probe: forecast, never run
    try:
        loose = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False,
                              threshold_fn=lambda i: float("inf"))
    finally:
        ff.remove()
    assert {r["decisions"] for r in loose.stats.per_sample()} == {"FFFAAAFA"}
    assert loose.stats.extra["cached_blocks"] == 2
    assert assert_accepted_are_extrapolations(ff.values, "FFFAAAFA", order=1) == 4
    assert not torch.equal(loose.latents, ref.latents)


def test_block_level_rollback_and_batch_independence():
    model, adapter, sched, cond, noise = _tiny_video(3)
    cfg = CacheConfig(granularity="block", max_run=8)
    rejected = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False,
                             threshold_fn=lambda i: 0.0 if i == 4 else float("inf"))
    pinned = sample_cached(model, adapter, sched, cond, noise, 8, "speca",
                           CacheConfig(granularity="block", max_run=8, full_steps=[4]), progress=False,
                           threshold_fn=lambda i: float("inf"))
    assert {r["decisions"] for r in rejected.stats.per_sample()} == {"FFFARAAA"}
    assert torch.equal(rejected.latents, pinned.latents)
    mixed = CacheConfig(granularity="block", tau0=0.2, beta=0.5)
    batch = sample_cached(model, adapter, sched, cond, noise, 8, "speca", mixed, progress=False)
    idx = torch.tensor([2])
    alone = sample_cached(model, adapter, sched, cond.select(idx), noise[idx], 8, "speca", mixed, progress=False)
    assert alone.stats.per_sample()[0]["decisions"] == batch.stats.per_sample()[2]["decisions"]
    torch.testing.assert_close(alone.latents[0], batch.latents[2], atol=1e-5, rtol=1e-4)


def test_block_level_cap_shrinks_the_cached_region():
    model, adapter, sched, cond, noise = _tiny_video()
    whole = sample_cached(model, adapter, sched, cond, noise, 6, "taylorseer",
                          CacheConfig(granularity="block", order=1, max_cache_bytes=0), progress=False)
    assert whole.stats.extra["cached_blocks"] == 2 and whole.stats.effective_order == 1
    capped = sample_cached(model, adapter, sched, cond, noise, 6, "taylorseer",
                           CacheConfig(granularity="block", order=1, max_cache_bytes=whole.stats.cache_bytes - 1),
                           progress=False)
    assert capped.stats.extra["cached_blocks"] == 1 and capped.stats.effective_order == 1
    assert capped.stats.cache_bytes < whole.stats.cache_bytes
    assert torch.isfinite(capped.latents).all()


def test_block_level_needs_a_branch_spec():
    from torch import nn

    from specdist.models.base import ModelAdapter

    class NoBranches(ModelAdapter):
        family, model_class = "x", "X"
        block_lists = lambda self, m: ["blocks"]
        head_modules = latent_shape = token_counts = forward = random_conditioning = lambda *a: None

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(NotImplementedError, match="cache.granularity: block"):
        SpeculationHooks(model, NoBranches(), granularity="block")
    left = {name: list(m._diffusers_hook.hooks) for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")}
    assert not any(left.values()), left  # a failed constructor leaves no hook behind


def test_min_run_accepts_without_running_the_probe():
    model, adapter, sched, cond, noise = _tiny_video()
    cfg = CacheConfig(granularity="block", min_run=2, max_run=3)
    probe_calls = []
    handle = adapter.blocks(model)[-1].attn.to_q.register_forward_hook(lambda *a: probe_calls.append(1))
    try:
        loose = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False,
                              threshold_fn=lambda i: float("inf"))
    finally:
        handle.remove()
    assert {r["decisions"] for r in loose.stats.per_sample()} == {"FFFAAAFA"}
    assert loose.stats.probed == [1, 1]  # only the third forecast of the run was checked
    assert len(probe_calls) == 4 + 1  # 4 full calls, and the probe's attention on that one checked forecast
    strict = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False,
                           threshold_fn=lambda i: 0.0)
    assert {r["decisions"] for r in strict.stats.per_sample()} == {"FFFAARAA"}


def _hunyuan_video_720p_sizes():
    """HunyuanVideo (12.8B, built on the meta device — no memory, no weights) at 720×1280×129f in bf16
    without CFG: its block-level hooks and the bytes per row a measuring call records (one hidden
    state of 118,800 video + 256 text tokens × 3072 is 731.5 MB)."""
    from diffusers import HunyuanVideoTransformer3DModel

    from specdist.models import adapter_for

    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=24,
                                               attention_head_dim=128, num_layers=20, num_single_layers=40,
                                               num_refiner_layers=2, patch_size=2, patch_size_t=1,
                                               text_embed_dim=4096, pooled_projection_dim=768,
                                               rope_axes_dim=(16, 56, 56))
    hooks = SpeculationHooks(model, adapter_for(model), granularity="block")
    video, text, width, bf16 = 33 * 45 * 80, 256, 3072, 2
    hidden, context = video * width * bf16, text * width * bf16
    sizes = {}
    for k in range(60):
        sizes[f"input.{k}"] = hidden + context
        for name in hooks.branches[k]:
            sizes[f"branch.{k}.{name}"] = {"attn": hidden + context, "ff": hidden, "ff_context": context,
                                           "proj_out": hidden + context}[name]
    return hooks, sizes


def test_default_budget_fits_block_level_hunyuan_video_720p():
    """The documented sizing (see :func:`_hunyuan_video_720p_sizes`)."""
    hooks, sizes = _hunyuan_video_720p_sizes()
    try:
        cap = CacheConfig().max_cache_bytes
        order, start = fit_region(1, lambda st: hooks.region_bytes(sizes, st), 59, cap)
        assert (order, 60 - start) == (1, 10)  # order 1 on the last 10 single-stream blocks
        assert 2 * hooks.region_bytes(sizes, start) <= cap < 2 * hooks.region_bytes(sizes, start - 1)
        assert fit_region(1, lambda st: hooks.region_bytes(sizes, st), 59, 0) == (1, 0)  # no cap: all 60 blocks
        assert 2 * hooks.region_bytes(sizes, 0) > 100 * 2**30  # which no 80 GB GPU holds
    finally:
        hooks.remove()


# Peak of a full 720×1280×129f step of the bf16 transformer on one H100 (DESIGN §1, measured there).
H100_PEAK_720P = 36.3 * 2**30


@pytest.mark.parametrize("storage_dtype, host, blocks, stored_gb, device_gb", [
    ("compute", False, 10, 16.1, 16.1),  # bf16 on the device: 16 GiB holds 10 single blocks (+ entry stream)
    ("bfloat16", False, 10, 16.1, 16.1),  # the model's own dtype: the same
    ("float8_e4m3fn", False, 22, 16.8, 16.8),  # half the bytes: 22 single blocks
    ("compute", True, 60, 117.0, 4.4),  # host offload: every block, 117 GB pinned, 2 branches on the device
    ("bfloat16", True, 60, 117.0, 4.4),
    ("float8_e4m3fn", True, 60, 58.5, 2.9),  # fp8 + host offload: every block in 58.5 GB of host memory
])
def test_storage_dtype_and_host_offload_fit_every_block_of_hunyuan_video_720p(storage_dtype, host, blocks,
                                                                                stored_gb, device_gb):
    """Every block's branches are 20 x 1,463 MB (dual: attn, ff, ff_context) + 40 x 731.5 MB (single:
    proj_out) = 58.5 GB in bf16; cached at order 1 (2 factors) that is 117 GB, more than an 80 GB GPU
    even before the model's 36.3 GiB (39.0 GB) peak. On the device the 16 GiB default holds the last
    10 blocks (11 x 731.5 MB x 2 = 16.1 GB, with the entry stream); fp8 storage halves the bytes, so
    22 blocks fit (16.8 GB) — and every block in fp8 would still need 39.0 + 58.5 = 97.5 GB. With host
    offload every block is cached in pinned host memory (117 GB bf16 / 58.5 GB fp8, under the
    default 192 GiB host cap) and the device holds only the working set, the entry in use as stored
    and in bf16 plus the prefetched next entry: 2 x (2 x 731.5 + 731.5) MB = 4.4 GB (bf16) or
    2 x (2 x 365.7 + 731.5) MB = 2.9 GB (fp8), so a step peaks near 39.0 + 4.4 = 43.4 GB. The host
    needs the cache in page-locked memory, at most 80% of its RAM: 109 GiB of bf16 factors need a
    host with >= 137 GiB, 54.5 GiB of fp8 >= 68 GiB. Arithmetic only: not measured on a GPU."""
    from specdist.engine.cache_memory import plan_block_cache
    from specdist.engine.forecast import CacheStorage

    hooks, sizes = _hunyuan_video_720p_sizes()
    try:
        cfg = CacheConfig(granularity="block", storage_dtype=storage_dtype, host_offload=host)
        plan = plan_block_cache(hooks, sizes, 1, 2, 1, 59, CacheStorage.named(cfg.storage_dtype, cfg.host_offload),
                                cfg.max_cache_bytes, cfg.max_host_bytes)
        assert plan.order == 1 and plan.cached_blocks == blocks
        assert plan.stored_bytes / 1e9 == pytest.approx(stored_gb, abs=0.05)
        assert plan.device_bytes / 1e9 == pytest.approx(device_gb, abs=0.05)
        assert plan.host_bytes == (plan.stored_bytes if host else 0)
        fits_80gb = H100_PEAK_720P + plan.device_bytes <= 80e9
        assert fits_80gb  # what the default budgets allow always fits next to the model
        every_block = 2 * CacheStorage.named(storage_dtype).stored_bytes(hooks.region_bytes(sizes, 0), 2)
        device_with_every_block = H100_PEAK_720P + (plan.device_bytes if host else every_block)
        assert (device_with_every_block <= 80e9) == host  # every block fits one 80 GB GPU only with host offload
    finally:
        hooks.remove()


def test_a_waived_check_sharing_a_verified_call_gets_the_output_of_its_own_call():
    """Block level: when one sample's check is waived (``min_run``) while its batch mate's runs,
    both speculate in one call and the waived row's probe block keeps its forecast — so each
    sample's decisions and output equal those of the sample run alone."""
    model, adapter, sched, cond, noise = _tiny_video()
    cfg = CacheConfig(granularity="block", order=1, max_run=4, min_run=1, warmup=2)
    tau = {3: 0.043}  # between the two samples' errors at step 3: sample 0 is rolled back, sample 1 accepted

    def run(idx):
        return sample_cached(model, adapter, sched, cond.select(idx), noise[idx], 12, "speca", cfg, progress=False,
                             threshold_fn=lambda i: tau.get(i, float("inf")))

    both = run(torch.tensor([0, 1]))
    decisions = [r["decisions"] for r in both.stats.per_sample()]
    assert decisions[0][3:5] == "RA" and decisions[1][3:5] == "AA"  # step 4: 0 waived, 1 checked, one call
    assert both.stats.errors[0][4] is None and both.stats.errors[1][4] is not None
    for s in (0, 1):
        alone = run(torch.tensor([s]))
        assert alone.stats.per_sample()[0]["decisions"] == decisions[s]
        torch.testing.assert_close(both.latents[s:s + 1], alone.latents, rtol=1e-5, atol=1e-6)
