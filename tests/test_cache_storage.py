"""Cache storage (``cache.storage_dtype``) and host offload (``cache.host_offload``) of the Taylor cache.

Storage changes only what is kept between steps: the arithmetic runs in the compute dtype, so
``float32`` storage of float32 features is bit-identical to the default, lower-precision storage is
close and takes proportionally fewer bytes, and the block level's streaming (lazy per-block
forecasts, per-branch recording) is bit-identical to the all-at-once path. Host offload on this CPU
machine runs the same code path with the host as the device: bit-identical to on-device caching.
"""

from __future__ import annotations

import pytest
import torch
from test_adapters import FAMILIES, _setup

from specdist.engine.cache_memory import plan_block_cache, working_set_bytes
from specdist.engine.config import CacheConfig
from specdist.engine.forecast import CacheStorage, TaylorCache
from specdist.engine.speculative import sample_cached
from specdist.errors import ConfigError
from specdist.sampling import initial_noise

ROWS = torch.arange(3)


def _trajectory(steps: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two smooth features per step, rows with different scales (fp8 scales are per row and token)."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(3, 4, 8, generator=g) for _ in range(3))
    scale = torch.tensor([1.0, 30.0, 0.01]).view(3, 1, 1)
    return [((a + b * t + c * t * t) * scale, (b - c * t).mean(-1) * scale[..., 0]) for t in range(steps)]


def _run(storage: CacheStorage | None, order: int = 2) -> tuple[TaylorCache, tuple[torch.Tensor, ...]]:
    cache = TaylorCache(order, 3, storage)
    for t, feats in enumerate(_trajectory()[:4]):
        cache.update(ROWS, feats, float(t))
    return cache, cache.forecast(ROWS, 4.0)


def test_float32_storage_and_host_storage_on_cpu_are_bit_identical_to_the_default():
    _, ref = _run(None)
    for storage in (CacheStorage.named("float32"), CacheStorage.named("compute", host=True),
                    CacheStorage.named("float32", host=True)):
        cache, out = _run(storage)
        assert all(torch.equal(a, b) for a, b in zip(ref, out)), storage
    assert cache.host_bytes() == cache.nbytes() > 0 and cache.device_bytes() == 0


@pytest.mark.parametrize("name, shrink, tol", [("bfloat16", 2, 1e-2), ("float16", 2, 2e-3),
                                               ("float8_e4m3fn", 4, 0.08), ("float8_e5m2", 4, 0.12)])
def test_lower_precision_storage_is_close_and_smaller(name, shrink, tol):
    ref_cache, ref = _run(None)
    cache, out = _run(CacheStorage.named(name))
    factors = sum(f.numel() * f.element_size() for feat in cache.factors for f in feat)
    assert factors * shrink == ref_cache.nbytes()
    assert all(f.dtype == CacheStorage.named(name).dtype for feat in cache.factors for f in feat)
    for a, b in zip(ref, out):
        assert b.dtype == torch.float32  # forecasts come back in the compute dtype
        rel = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
        assert float(rel.max()) < tol, (name, rel)  # per row: the 0.01-scaled row too (fp8 scales per token)
    truth = _trajectory()[4]
    assert (ref[0] - truth[0]).abs().max() < 1e-3  # the float32 cache is exact on a quadratic


def test_partial_row_updates_and_forecasts_with_converted_storage():
    traj = _trajectory()
    ref, conv = TaylorCache(1, 3), TaylorCache(1, 3, CacheStorage.named("bfloat16", host=True))
    for t, feats in enumerate(traj[:3]):
        rows = ROWS if t != 1 else torch.tensor([0, 2])  # row 1 skips a full step
        for cache in (ref, conv):
            cache.update(rows, tuple(f[rows] for f in feats), float(t))
    for rows in (ROWS, torch.tensor([1]), torch.tensor([2, 0])):
        for a, b in zip(ref.forecast(rows, 3.0), conv.forecast(rows, 3.0)):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * float(a.abs().max()))


def test_streamed_recording_and_lazy_forecasts_equal_the_all_at_once_path():
    """Features written one name at a time, in arrival order, through a sink; read back per name
    through a view: bit-identical to update/forecast of the flat tuple."""
    traj = _trajectory()
    flat, streamed = TaylorCache(2, 3), TaylorCache(2, 3)
    layout: list = []
    for t, (x, y) in enumerate(traj[:4]):
        flat.update(ROWS, (x, y, 2 * x), float(t))
        sink = streamed.sink(ROWS, float(t), layout)
        sink["a"] = (x, y)
        sink["b"] = (2 * x,)
        layout = sink.finish()
    assert layout == [("a", 2), ("b", 1)]
    view = streamed.view(ROWS, 4.0, layout)
    assert sorted(view) == ["a", "b"] and len(view) == 2
    expected = flat.forecast(ROWS, 4.0)
    assert all(torch.equal(a, b) for a, b in zip(expected, view["a"] + view["b"]))
    assert torch.equal(view["b"][0], expected[2])  # read twice: the same forecast
    incomplete = streamed.sink(ROWS, 5.0, layout)
    incomplete["a"] = traj[4]
    with pytest.raises(RuntimeError, match=r"without features \['b'\]"):
        incomplete.finish()


def _tiny(family: str, samples: int = 2):
    model, adapter, shape, cond, _ = _setup(family, batch=samples)
    return model, adapter, FAMILIES[family][3](), cond, initial_noise(shape, list(range(samples)))


@pytest.mark.parametrize("family", ["hunyuan_video", "flux", "wan"])
def test_block_level_storage_dtypes_run_and_host_offload_equals_on_device_caching(family):
    model, adapter, sched, cond, noise = _tiny(family)
    base = dict(granularity="block", order=2, tau0=0.3, beta=1.0, max_run=3)
    run = lambda **kw: sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(**base, **kw),
                                     progress=False)
    ref = run()
    offloaded = run(host_offload=True)
    assert torch.equal(offloaded.latents, ref.latents)
    assert offloaded.stats.decisions == ref.stats.decisions
    assert offloaded.stats.extra["cache_host_bytes"] == offloaded.stats.cache_bytes == ref.stats.cache_bytes
    assert ref.stats.extra["cache_host_bytes"] == 0
    for name, shrink in (("bfloat16", 2), ("float8_e4m3fn", 4)):
        for host in (False, True):
            res = run(storage_dtype=name, host_offload=host)
            assert torch.isfinite(res.latents).all(), (name, host)
            # bytes shrink with the dtype (fp8 adds one float32 scale per token: 4 bytes per 16-wide token here)
            assert ref.stats.cache_bytes // shrink <= res.stats.cache_bytes <= 1.25 * ref.stats.cache_bytes // shrink
            host_bytes, total = res.stats.extra["cache_host_bytes"], res.stats.cache_bytes  # fp8 scales stay on the device
            if not host:
                assert host_bytes == 0
            else:
                assert host_bytes == total if name == "bfloat16" else 0.75 * total <= host_bytes < total
            rel = float((res.latents - ref.latents).norm() / ref.latents.norm())
            assert 0 < rel < (1e-3 if name == "bfloat16" else 1e-2), (name, rel)
        if name == "bfloat16":  # host offload of converted storage: the same bits as on the device
            on_device = run(storage_dtype=name)
            assert torch.equal(run(storage_dtype=name, host_offload=True).latents, on_device.latents)


def test_storage_dtype_applies_at_every_granularity_and_tau_zero_is_still_full():
    from specdist.sampling import sample_full

    model, adapter, sched, cond, noise = _tiny("hunyuan_video")
    full = sample_full(model, adapter, sched, cond, noise, 6, progress=False)
    for granularity in ("probe", "output", "block"):
        cfg = CacheConfig(granularity=granularity, storage_dtype="float8_e4m3fn")
        exact = sample_cached(model, adapter, sched, cond, noise, 6, "speca", cfg, progress=False,
                              threshold_fn=lambda i: 0.0)
        assert torch.equal(exact.latents, full.latents), granularity  # every check rejects: full compute
        loose = sample_cached(model, adapter, sched, cond, noise, 6, "taylorseer",
                              CacheConfig(granularity=granularity, storage_dtype="bfloat16", interval=3),
                              progress=False)
        assert torch.isfinite(loose.latents).all() and loose.stats.cache_bytes > 0


def test_bad_storage_settings_are_one_line():
    with pytest.raises(ConfigError, match=r"'cache.storage_dtype': 'int8' \(allowed: one of \['compute'"):
        CacheConfig(storage_dtype="int8").validate()
    with pytest.raises(ConfigError, match=r"'cache.host_offload': True \(allowed: false with "
                                          r"cache.granularity='probe'"):
        CacheConfig(host_offload=True, granularity="probe").validate()
    with pytest.raises(ConfigError, match="'cache.max_host_bytes'"):
        CacheConfig(max_host_bytes=-1).validate()
    model, adapter, sched, cond, noise = _tiny("hunyuan_video")
    with pytest.raises(ConfigError, match=r"'cache.max_cache_bytes': 100 \(allowed: >= \d+ bytes with "
                                          r"cache.host_offload"):
        sample_cached(model, adapter, sched, cond, noise, 4, "taylorseer",
                      CacheConfig(granularity="block", host_offload=True, max_cache_bytes=100), progress=False)


def test_working_set_arithmetic():
    storage = CacheStorage.named("bfloat16", host=True)
    # one row, largest entry 1000 float32 bytes -> 500 stored; order 1: 2 x (2 x 500 + 1000)
    assert working_set_bytes(1, 1, {"a": 1000, "b": 10}, 4, storage) == 4000

    class Hooks:  # three blocks, one branch each
        last = 2

        @staticmethod
        def region_bytes(sizes, start):
            return sum(sizes[f"branch.{k}"] for k in range(start, 3))

    sizes = {f"branch.{k}": 100 for k in range(3)}
    plan = plan_block_cache(Hooks, sizes, 2, 4, 1, 2, storage, max_cache_bytes=10**6, max_host_bytes=400)
    assert (plan.order, plan.start, plan.cached_blocks) == (1, 1, 2)  # 2 rows x 2 blocks x 50 B x 2 factors
    assert plan.host_bytes == plan.stored_bytes == 400 and plan.device_bytes == 2 * (2 * 100 + 200)
    on_device = plan_block_cache(Hooks, sizes, 2, 4, 1, 2, CacheStorage.named("bfloat16"), 600, 0)
    assert (on_device.start, on_device.host_bytes, on_device.device_bytes) == (0, 0, 600)


def test_pinned_arena_hands_out_aligned_zeroed_tensors_and_the_host_share_is_checked():
    from specdist.engine.cache_memory import BlockCachePlan, storage_for
    from specdist.engine.host_memory import ALIGN, PinnedArena

    arena = PinnedArena(3 * ALIGN, pin=False)  # no CUDA here: the same arena, not page-locked
    arena.buf.fill_(7)
    a = arena.take((3, 5), torch.float32)
    b = arena.take((10,), torch.bfloat16)
    assert a.abs().sum() == 0 and b.abs().sum() == 0 and a.data_ptr() % 4 == 0
    assert b.data_ptr() - arena.buf.data_ptr() == ALIGN  # the second one starts on the next boundary
    assert arena.take((ALIGN,), torch.float32) is None  # does not fit: the cache allocates it alone
    arena.close()
    plan = BlockCachePlan(1, 0, 60, 100 << 30, 4 << 30, 100 << 30)
    sized = storage_for(plan, CacheStorage.named("bfloat16", host=True), 192 << 30, physical=256 << 30)
    assert (100 << 30) < sized.host_capacity < (101 << 30)
    with pytest.raises(ConfigError, match=r"'cache.max_host_bytes': 206158430208 \(allowed: at most \d+ bytes here: "
                                          r"the cache would page-lock 100.0 GiB, more than 80% of this machine's "
                                          r"120.0 GiB"):
        storage_for(plan, CacheStorage.named("bfloat16", host=True), 192 << 30, physical=120 << 30)
    assert storage_for(plan, CacheStorage.named("bfloat16"), physical=1).host_capacity == 0  # device storage
