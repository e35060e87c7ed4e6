"""One contract for every caching method, ours and diffusers' (``specdist.engine.peers``).

For each method on tiny random DiT and HunyuanVideo transformers: a run gives finite latents of
the right shape and is repeatable; afterwards no hook is left and ``sample_full`` is bit-identical
to a run before any method was applied; the most conservative knob reproduces ``sample_full``
and an aggressive one really skips work (nfe < steps).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FirstBlockCacheConfig

from specdist.engine.calibration import run_calibration
from specdist.engine.config import CacheConfig
from specdist.engine.peers import PEER_METHODS, PeerConfig, calibrate_magcache, sample_with_peer
from specdist.engine.speculative import sample_cached
from specdist.errors import ConfigError, SpecdistError
from specdist.models import adapter_for
from specdist.sampling import initial_noise, sample_full

from test_engine import _tiny

STEPS = 8
METHODS = ("fora", "taylorseer", "speca", *PEER_METHODS)

# method -> (default, most conservative, aggressive) knobs
KNOBS = {
    "fora": (CacheConfig(), CacheConfig(interval=1), CacheConfig(interval=3)),
    "taylorseer": (CacheConfig(), CacheConfig(interval=1), CacheConfig(interval=3)),
    "speca": (CacheConfig(), CacheConfig(tau0=0.0, beta=1.0), CacheConfig(tau0=1e9, beta=1.0)),
    "diffusers-fbcache": (PeerConfig(), PeerConfig(fbcache_threshold=0.0), PeerConfig(fbcache_threshold=10.0)),
    "diffusers-taylorseer": (PeerConfig(), PeerConfig(taylorseer_cache_interval=1),
                             PeerConfig(taylorseer_cache_interval=2)),
    "diffusers-magcache": (PeerConfig(), PeerConfig(magcache_max_skip_steps=0), PeerConfig(magcache_threshold=10.0)),
    "diffusers-pab": (PeerConfig(), PeerConfig(pab_spatial_skip_range=1),
                      PeerConfig(pab_spatial_skip_range=3, pab_spatial_timestep_range=(-1.0, 2000.0))),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest and does not stall on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["dit", "hunyuan"], scope="module")
def tiny(request):
    model, sched, shape = _tiny(request.param)
    adapter = adapter_for(model)
    guidance = 3.0 if request.param == "dit" else 1.0
    cond = adapter.random_conditioning(model, 2, torch.Generator().manual_seed(1), guidance_scale=guidance)
    noise = initial_noise(shape, [0, 1])
    ref = sample_full(model, adapter, sched, cond, noise, STEPS, progress=False)  # before any method
    calibrations: dict = {}
    cal = run_calibration(model, adapter, sched, cond, noise, STEPS, CacheConfig(), progress=False)  # speca's target
    run = lambda method, cfg: (
        sample_cached(model, adapter, sched, cond, noise, STEPS, method, cfg, progress=False, calibration=cal)
        if isinstance(cfg, CacheConfig)
        else sample_with_peer(model, adapter, sched, cond, noise, STEPS, method, cfg, progress=False,
                              calibrations=calibrations))
    return model, adapter, sched, cond, noise, ref, run


def _registries(model: torch.nn.Module) -> dict[str, list[str]]:
    return {n: list(m._diffusers_hook.hooks) for n, m in model.named_modules() if hasattr(m, "_diffusers_hook")}


def _bound_forwards(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in vars(m)]


def _assert_clean(model: torch.nn.Module, before: tuple, method: str) -> None:
    assert not any(_registries(model).values()), _registries(model)
    assert not [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    if method in PEER_METHODS:  # a peer leaves not even an empty registry or a bound forward behind
        assert (_registries(model), _bound_forwards(model)) == before


@pytest.mark.parametrize("method", METHODS)
def test_run_is_finite_repeatable_and_leaves_no_state(tiny, method):
    model, adapter, sched, cond, noise, ref, run = tiny
    before = _registries(model), _bound_forwards(model)
    first = run(method, KNOBS[method][0])
    second = run(method, KNOBS[method][0])
    assert first.latents.shape == noise.shape and torch.isfinite(first.latents).all()
    assert torch.equal(first.latents, second.latents) and first.nfe == second.nfe
    assert 0 < first.nfe <= STEPS
    _assert_clean(model, before, method)
    assert torch.equal(sample_full(model, adapter, sched, cond, noise, STEPS, progress=False).latents, ref.latents)


@pytest.mark.parametrize("method", METHODS)
def test_conservative_knob_is_full_and_aggressive_knob_skips(tiny, method):
    model, adapter, sched, cond, noise, ref, run = tiny
    _, safe, bold = KNOBS[method]
    res = run(method, safe)
    assert (res.latents - ref.latents).abs().max().item() <= 1e-6
    assert res.nfe == STEPS
    fast = run(method, bold)
    assert torch.isfinite(fast.latents).all()
    assert fast.nfe < STEPS, fast.nfe
    if method in PEER_METHODS:  # the work meter sees the skips step by step
        assert fast.work[0] == 1.0 and min(fast.work) < 1.0 and len(fast.work) == STEPS


def test_taylorseer_forecasts_whole_blocks_and_diffusers_defaults_miss_dit(tiny):
    model, adapter, sched, cond, noise, ref, run = tiny
    res = run("diffusers-taylorseer", PeerConfig(taylorseer_cache_interval=2, taylorseer_disable_cache_before_step=2))
    # steps 0, 1 warm-up; then diffusers forecasts step 2 and computes every other step
    assert [w == 1.0 for w in res.work] == [True, True, False, True, False, True, False, True]
    assert max(w for w in res.work if w < 1.0) < 0.05  # a forecast step runs no block (DiT: + its head embedding)
    defaults = PeerConfig(taylorseer_cache_identifiers=["^transformer_blocks.*attn",
                                                        "^single_transformer_blocks.*attn"])
    if adapter.family == "dit":
        with pytest.raises(SpecdistError, match="match no module"):
            run("diffusers-taylorseer", defaults)
        with pytest.raises(SpecdistError, match="proj_out"):
            run("diffusers-taylorseer", PeerConfig(taylorseer_lite=True))
    else:  # diffusers' defaults hook only the attention: the MLPs still run on forecast steps
        partial = run("diffusers-taylorseer", defaults)
        assert 0.5 < min(partial.work) < 1.0
        lite = run("diffusers-taylorseer", PeerConfig(taylorseer_lite=True))
        assert torch.isfinite(lite.latents).all() and lite.nfe < STEPS


def test_magcache_calibration_is_diffusers_own_and_stored_per_model_and_steps(tiny):
    model, adapter, sched, cond, noise, ref, run = tiny
    before = _registries(model), _bound_forwards(model)
    ratios = calibrate_magcache(model, adapter, sched, cond, noise, STEPS)
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    _assert_clean(model, before, "diffusers-magcache")
    store: dict = {}
    res = sample_with_peer(model, adapter, sched, cond, noise, STEPS, "diffusers-magcache", PeerConfig(),
                           progress=False, calibrations=store)
    assert store == {(id(model), STEPS): ratios} and res.mag_ratios == ratios
    given = sample_with_peer(model, adapter, sched, cond, noise, STEPS, "diffusers-magcache",
                             PeerConfig(magcache_ratios=ratios), progress=False)
    assert torch.equal(given.latents, res.latents)


def test_unsupported_combinations_and_bad_knobs_fail_clearly():
    model, sched, shape = _tiny("hunyuan")
    adapter = adapter_for(model)
    cond = adapter.random_conditioning(model, 1, torch.Generator().manual_seed(1))
    noise = initial_noise(shape, [0])
    args = (model, adapter, sched, cond, noise, 2)
    with pytest.raises(SpecdistError, match="'method'"):
        sample_with_peer(*args, "diffusers-teacache", PeerConfig(), progress=False)
    with pytest.raises(ConfigError, match="peer.fbcache_threshold"):
        sample_with_peer(*args, "diffusers-fbcache", PeerConfig(fbcache_threshold=-1.0), progress=False)
    with pytest.raises(ConfigError, match="peer.taylorseer_cache_identifiers"):
        PeerConfig(taylorseer_cache_identifiers=["("]).validate()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(SpecdistError, match="already has a diffusers cache"):
        sample_with_peer(*args, "diffusers-pab", PeerConfig(), progress=False)
    model.disable_cache()
    single = _tiny("hunyuan")[0]
    single.single_transformer_blocks = torch.nn.ModuleList()  # one block left: nothing to skip
    with pytest.raises(SpecdistError, match="diffusers-fbcache does not support"):
        sample_with_peer(single, adapter, sched, cond, noise, 2, "diffusers-fbcache", PeerConfig(), progress=False)
