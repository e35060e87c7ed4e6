"""The caching engine: forecaster math, verification, rollback and per-sample decisions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
from diffusers.hooks import HookRegistry

from specdist.engine.config import CacheConfig
from specdist.engine.forecast import TaylorCache
from specdist.engine.hooks import HOOK_NAME
from specdist.engine.speculative import sample_cached
from specdist.engine.verify import combine_rows, forecast_error, threshold
from specdist.models import adapter_for
from specdist.sampling import initial_noise, sample_full

from forecast_check import Tap, assert_accepted_are_extrapolations, newton, recording_scheduler


# ----- forecaster ---------------------------------------------------------------------------

@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
def test_taylor_exact_on_polynomials_of_degree_up_to_order(order, grid):
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 3, 4, generator=g, dtype=torch.float64)
    poly = lambda s: sum(coeffs[j] * s**j for j in range(order + 1))
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] if grid == "uniform" else [0.0, 0.3, 1.1, 1.5, 2.6, 3.0]
    cache = TaylorCache(order, rows=3)
    rows = torch.arange(3)
    for s in times:
        cache.update(rows, (poly(s),), s)
    for s in (times[-1], times[-1] + 0.5, times[-1] + 2.0):
        (pred,) = cache.forecast(rows, s)
        torch.testing.assert_close(pred, poly(s), rtol=1e-9, atol=1e-9)


def test_taylor_order_too_low_is_not_exact():
    cache = TaylorCache(1, rows=1)
    for s in (0.0, 1.0, 2.0):
        cache.update(torch.arange(1), (torch.tensor([[s**2]], dtype=torch.float64),), s)
    (pred,) = cache.forecast(torch.arange(1), 3.0)
    assert abs(pred.item() - 9.0) > 0.5  # linear extrapolation of a parabola: 7, not 9


def test_rows_are_independent_and_order_grows_per_row():
    cache = TaylorCache(2, rows=2)
    cache.update(torch.tensor([0, 1]), (torch.tensor([[1.0], [5.0]]),), 0.0)
    cache.update(torch.tensor([0]), (torch.tensor([[3.0]]),), 1.0)  # row 0: slope 2
    a, = cache.forecast(torch.tensor([0]), 2.0)
    b, = cache.forecast(torch.tensor([1]), 2.0)
    assert a.item() == pytest.approx(5.0)  # linear from two points
    assert b.item() == pytest.approx(5.0)  # one point: reuse
    assert cache.filled.tolist() == [2, 1]
    assert cache.nbytes() == 3 * 2 * 1 * 4


def test_reuse_order_zero_returns_last_full_value():
    cache = TaylorCache(0, rows=1)
    for s, v in ((0.0, 1.0), (1.0, 4.0)):
        cache.update(torch.arange(1), (torch.tensor([[v]]),), s)
    assert cache.forecast(torch.arange(1), 7.0)[0].item() == 4.0


# ----- verification -------------------------------------------------------------------------

def test_errors_per_row_and_nan_is_infinite():
    true = torch.ones(3, 4)
    pred = true.clone()
    pred[1] *= 1.1
    pred[2, 0] = float("nan")
    for metric in ("rel_l1", "rel_l2", "cosine"):
        err = forecast_error(pred, true, metric)
        assert err[0] == pytest.approx(0.0, abs=1e-6)
        assert err[2] == float("inf")
    assert forecast_error(pred, true, "rel_l2")[1] == pytest.approx(0.1, rel=1e-4)
    assert forecast_error(pred, true, "rel_l1")[1] == pytest.approx(0.1, rel=1e-4)
    with pytest.raises(ValueError, match="unknown metric"):
        forecast_error(pred, true, "l7")


def test_threshold_schedule_and_branch_combination():
    assert threshold(0.0, 1.0, 0.1, 0.0) == pytest.approx(1.0)
    assert threshold(1.0, 1.0, 0.1, 0.0) == pytest.approx(0.1)
    assert threshold(1.0, 1.0, 0.1, 0.5) == pytest.approx(0.5)
    # interior points: tau0 * beta ** p, geometric in p (not linear), floored by tau_min
    assert threshold(0.5, 1.0, 0.1, 0.0) == pytest.approx(0.1 ** 0.5)
    assert threshold(0.25, 0.2, 0.5, 0.0) == pytest.approx(0.2 * 0.5 ** 0.25)
    assert threshold(0.5, 0.04, 6.0, 0.0) == pytest.approx(0.04 * 6.0 ** 0.5)  # beta > 1 loosens
    assert threshold(0.5, 1.0, 0.1, 0.4) == pytest.approx(0.4)
    assert threshold(0.25, 1.0, 0.1, 0.4) == pytest.approx(0.1 ** 0.25)  # above the floor: untouched
    assert combine_rows(torch.tensor([0.1, 0.5, 0.3, 0.2]), 2).tolist() == pytest.approx([0.3, 0.5])


# ----- the sampling loop --------------------------------------------------------------------

PROBE = dict(granularity="probe", order=1)
"""What the probe-level tests below check: the probe block's input and the last block's output,
forecast at order 1 (the defaults are block level, order 2)."""


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "dit":
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        return model.eval(), DDIMScheduler(), (4, 8, 8)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=3, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    return model.eval(), FlowMatchEulerDiscreteScheduler(), (4, 3, 8, 8)


@pytest.fixture(params=["dit", "hunyuan"], scope="module")
def tiny(request):
    model, sched, shape = _tiny(request.param)
    adapter = adapter_for(model)
    cond = adapter.random_conditioning(model, 3, torch.Generator().manual_seed(1), guidance_scale=3.0)
    noise = initial_noise(shape, [0, 1, 2])
    ref = sample_full(model, adapter, sched, cond, noise, 8, progress=False)
    return model, adapter, sched, cond, noise, ref


def test_tau_zero_rejects_everything_and_reproduces_full_exactly(tiny):
    model, adapter, sched, cond, noise, ref = tiny
    res = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(tau0=0.0, beta=1.0),
                        progress=False)
    assert torch.equal(res.latents, ref.latents)
    for row in res.stats.per_sample():
        assert row["decisions"] == "FFFRRRRR" and row["accepted"] == 0 and row["full_steps"] == 8


def test_on_latents_sees_the_full_trajectory_step_by_step(tiny):
    model, adapter, sched, cond, noise, ref = tiny
    full_states, cached_states = [], []
    sample_full(model, adapter, sched, cond, noise, 8, progress=False,
                on_step=lambda i, t, x: full_states.append((i, x.float().cpu())))
    res = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(tau0=0.0, beta=1.0),
                        progress=False, on_latents=lambda i, x: cached_states.append((i, x.float().cpu())))
    assert [i for i, _ in cached_states] == list(range(8))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full_states, cached_states))  # rollbacks: the full path
    assert torch.equal(cached_states[-1][1], res.latents)


def _norm(block):
    """The first module of a block that takes its hidden state (its input, as the block computes it)."""
    return block.norm1 if hasattr(block, "norm1") else block.norm


def test_huge_tau_accepts_and_hooks_are_removed(tiny):
    model, adapter, sched, cond, noise, ref = tiny
    probe_input = Tap(_norm(adapter.blocks(model)[-1]), pre=True)
    try:
        res = sample_cached(model, adapter, sched, cond, noise, 8, "speca",
                            CacheConfig(tau0=1e9, beta=1.0, max_run=3, **PROBE), progress=False)
    finally:
        probe_input.remove()
    decisions = {row["decisions"] for row in res.stats.per_sample()}
    assert decisions == {"FFFAAAFA"}
    assert res.nfe == 4
    # the probe ran on every step; on the accepted ones, on the order-1 extrapolation of its input
    assert assert_accepted_are_extrapolations(probe_input.values, "FFFAAAFA", order=1) == 4
    assert not torch.equal(res.latents, ref.latents)
    for block in adapter.blocks(model):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        assert HOOK_NAME not in registry.hooks
    again = sample_full(model, adapter, sched, cond, noise, 8, progress=False)
    assert torch.equal(again.latents, ref.latents)  # nothing leaks into a later generation


def test_rollback_equals_computing_that_step_fully(tiny):
    """Reject exactly step 4 (tau = 0 there, infinite elsewhere): the trajectory must equal a run
    in which step 4 was scheduled full from the start — the rejected forecast leaves no trace."""
    model, adapter, sched, cond, noise, _ = tiny
    cfg = CacheConfig(max_run=8)
    rejected = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False,
                             threshold_fn=lambda i: 0.0 if i == 4 else float("inf"))
    pinned = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(max_run=8, full_steps=[4]),
                           progress=False, threshold_fn=lambda i: float("inf"))
    assert {r["decisions"] for r in rejected.stats.per_sample()} == {"FFFARAAA"}
    assert {r["decisions"] for r in pinned.stats.per_sample()} == {"FFFAFAAA"}
    assert torch.equal(rejected.latents, pinned.latents)


class _PoisonedCache(TaylorCache):
    """Forecasts NaN at step 5 (index time)."""

    def forecast(self, rows, time):
        out = super().forecast(rows, time)
        return tuple(torch.full_like(t, float("nan")) for t in out) if time == 5.0 else out


def test_nan_forecast_is_rejected(tiny):
    model, adapter, sched, cond, noise, ref = tiny
    for metric in ("rel_l1", "rel_l2", "cosine"):
        res = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(metric=metric, **PROBE),
                            progress=False, threshold_fn=lambda i: float("inf"), cache_cls=_PoisonedCache)
        for row in res.stats.per_sample():
            assert row["decisions"][5] == "R"
        assert torch.isfinite(res.latents).all()
    # Without verification a NaN output is still caught (the output itself is checked).
    res = sample_cached(model, adapter, sched, cond, noise, 8, "taylorseer", CacheConfig(interval=8, **PROBE),
                        progress=False, cache_cls=_PoisonedCache)
    assert {r["decisions"][5] for r in res.stats.per_sample()} == {"R"}
    assert torch.isfinite(res.latents).all()


def test_per_sample_result_independent_of_batch(tiny):
    model, adapter, sched, cond, noise, _ = tiny
    cfg = CacheConfig(tau0=0.3, beta=0.5, order=1)
    full_batch = sample_cached(model, adapter, sched, cond, noise, 8, "speca", cfg, progress=False)
    idx = torch.tensor([1])
    alone = sample_cached(model, adapter, sched, cond.select(idx), noise[idx], 8, "speca", cfg, progress=False)
    assert alone.stats.per_sample()[0]["decisions"] == full_batch.stats.per_sample()[1]["decisions"]
    torch.testing.assert_close(alone.latents[0], full_batch.latents[1], atol=1e-5, rtol=1e-4)


def test_fixed_interval_methods_follow_their_schedule(tiny):
    """Both skip the same steps; on them ``fora`` reuses the last block's last full output and
    ``taylorseer`` extrapolates it (order 1): the two are told apart by what they forecast."""
    model, adapter, sched, cond, noise, ref = tiny
    latents = {}
    for method, order in (("fora", 0), ("taylorseer", 1)):
        last_out = Tap(adapter.blocks(model)[-1])
        try:
            res = sample_cached(model, adapter, sched, cond, noise, 8, method, CacheConfig(interval=2, **PROBE),
                                progress=False)
        finally:
            last_out.remove()
        assert {r["decisions"] for r in res.stats.per_sample()} == {"FFFAFAFA"}
        assert res.nfe == 5
        assert assert_accepted_are_extrapolations(last_out.values, "FFFAFAFA", order) == 3
        latents[method] = res.latents
    assert not torch.equal(latents["fora"], latents["taylorseer"])


@pytest.mark.parametrize("method, order", [("fora", 1), ("taylorseer", 0), ("taylorseer", 1), ("taylorseer", 2),
                                           ("speca", 1), ("speca", 2)])
def test_accepted_output_is_the_extrapolation_of_the_full_outputs(tiny, method, order):
    """``granularity: output``: on an accepted step the scheduler gets the Newton extrapolation of
    the model outputs of the full steps before it (``fora``: the last one, bit for bit)."""
    model, adapter, sched, cond, noise, ref = tiny
    rec = recording_scheduler(sched)
    cfg = CacheConfig(interval=3, order=order, max_run=3, granularity="output")
    res = sample_cached(model, adapter, rec, cond, noise, 8, method, cfg, progress=False,
                        threshold_fn=(lambda i: float("inf")) if method == "speca" else None)
    (decisions,) = {r["decisions"] for r in res.stats.per_sample()}
    assert decisions == ("FFFAAAFA" if method == "speca" else "FFFAAFAA")
    effective = 0 if method == "fora" else order
    assert assert_accepted_are_extrapolations(rec.outputs, decisions, effective) == 4


def test_order_fallback_far_beyond_adjacent_full_steps(tiny):
    """``cache.extrapolation_ratio``: after the warm-up (full steps 1 and 2 adjacent) the forecasts
    at steps 3, 4 use order 2, step 5 (3 gaps beyond step 2 > 2) order 1; with 0 every accepted
    step is the plain order-2 Newton extrapolation, and the two runs differ exactly there."""
    model, adapter, sched, cond, noise, _ = tiny
    outputs = {}
    for ratio in (2.0, 0.0):
        rec = recording_scheduler(sched)
        cfg = CacheConfig(interval=3, order=2, max_run=3, granularity="output", extrapolation_ratio=ratio)
        res = sample_cached(model, adapter, rec, cond, noise, 8, "speca", cfg, progress=False,
                            threshold_fn=lambda i: float("inf"))
        (decisions,) = {r["decisions"] for r in res.stats.per_sample()}
        assert decisions == "FFFAAAFA"
        assert assert_accepted_are_extrapolations(rec.outputs, decisions, 2, fallback_ratio=ratio) == 4
        outputs[ratio] = rec.outputs
    same = [torch.equal(a, b) for a, b in zip(outputs[2.0], outputs[0.0])]
    assert same[:5] == [True] * 5 and not same[5]  # identical up to the first fallback
    with pytest.raises(AssertionError):  # the fallback run is not the plain expansion
        assert_accepted_are_extrapolations(outputs[2.0], "FFFAAAFA", 2, fallback_ratio=0.0)


def test_extrapolation_ratio_is_refused_where_it_cannot_apply():
    from specdist.errors import ConfigError

    for method, order in (("fora", 2), ("taylorseer", 1), ("speca", 0)):
        with pytest.raises(ConfigError, match=r"invalid value for 'cache.extrapolation_ratio': 3.0 .*Taylor orders >= 2"):
            CacheConfig(order=order, extrapolation_ratio=3.0).validate_for(method)
    with pytest.raises(ConfigError, match=r"'cache.extrapolation_ratio': -1.0"):
        CacheConfig(extrapolation_ratio=-1.0).validate()
    CacheConfig(extrapolation_ratio=0.0).validate_for("taylorseer")  # order 2: applies


def test_timestep_time_unit_extrapolates_over_the_schedulers_time():
    """``cache.time: timestep``: forecasts are polynomials in t / num_train_timesteps (on a shifted,
    non-uniform flow-matching schedule, where that differs from extrapolating over the step index)."""
    model, _, shape = _tiny("hunyuan")
    adapter = adapter_for(model)
    cond = adapter.random_conditioning(model, 2, torch.Generator().manual_seed(1))
    noise = initial_noise(shape, [0, 1])
    rec = recording_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    cfg = CacheConfig(interval=3, order=2, granularity="output", time="timestep")
    res = sample_cached(model, adapter, rec, cond, noise, 8, "taylorseer", cfg, progress=False)
    (decisions,) = {r["decisions"] for r in res.stats.per_sample()}
    times = [t / 1000.0 for t in res.timesteps]
    assert assert_accepted_are_extrapolations(rec.outputs, decisions, 2, times) == 4
    full = [(i, v) for i, (v, d) in enumerate(zip(rec.outputs, decisions)) if d != "A"]
    by_index = newton(full[:3], 2, 3)  # what index time would have forecast for step 3
    assert not torch.allclose(by_index, rec.outputs[3].double(), rtol=1e-3, atol=1e-4)


def test_non_default_probe_block_is_the_one_verified(tiny):
    """``cache.probe_block: 1``: that block runs on every speculative step, on the extrapolation of
    its own input; the blocks after it do not run; its error is what decides."""
    model, adapter, sched, cond, noise, ref = tiny
    blocks = adapter.blocks(model)
    probe_in, after = Tap(_norm(blocks[1]), pre=True), Tap(_norm(blocks[2]), pre=True)
    try:
        res = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(probe_block=1, max_run=3, **PROBE),
                            progress=False, threshold_fn=lambda i: float("inf"))
    finally:
        probe_in.remove()
        after.remove()
    assert {r["decisions"] for r in res.stats.per_sample()} == {"FFFAAAFA"}
    assert assert_accepted_are_extrapolations(probe_in.values, "FFFAAAFA", 1) == 4
    assert len(after.values) == 4  # block 2 ran on the full steps only
    default = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(max_run=3, **PROBE), progress=False,
                            threshold_fn=lambda i: float("inf"))
    errors = [e for e in res.stats.errors[0] if e is not None]
    assert len(errors) == 4 and errors != [e for e in default.stats.errors[0] if e is not None]
    exact = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(probe_block=1, **PROBE), progress=False,
                          threshold_fn=lambda i: 0.0)
    assert torch.equal(exact.latents, ref.latents)


def test_the_loop_uses_the_schedule_at_every_step(tiny):
    """The τ the loop applies at step i is τ0 · β^(i / (N − 1)) (interior steps included)."""
    model, adapter, sched, cond, noise, ref = tiny
    res = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(tau0=0.3, beta=0.2),
                        progress=False)
    assert res.stats.thresholds == pytest.approx([0.3 * 0.2 ** (i / 7) for i in range(8)])


def test_cache_byte_cap_lowers_order_or_fails(tiny):
    from specdist.errors import ConfigError

    model, adapter, sched, cond, noise, _ = tiny
    probe = dict(order=2, granularity="probe")  # (block level shrinks the cached region first: test_block_cache)
    big = sample_cached(model, adapter, sched, cond, noise, 4, "taylorseer", CacheConfig(**probe), progress=False)
    per_order = big.stats.cache_bytes // 3
    capped = sample_cached(model, adapter, sched, cond, noise, 4, "taylorseer",
                           CacheConfig(**probe, max_cache_bytes=2 * per_order), progress=False)
    assert capped.stats.effective_order == 1 and capped.stats.cache_bytes == 2 * per_order
    with pytest.raises(ConfigError, match="cache.max_cache_bytes"):
        sample_cached(model, adapter, sched, cond, noise, 4, "taylorseer",
                      CacheConfig(**probe, max_cache_bytes=per_order // 2), progress=False)


def test_lite_mode_caches_only_the_output_and_runs_no_model_on_forecasts(tiny):
    model, adapter, sched, cond, noise, ref = tiny
    calls = []
    handle = adapter.blocks(model)[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        res = sample_cached(model, adapter, sched, cond, noise, 8, "taylorseer",
                            CacheConfig(interval=2, granularity="output", order=1), progress=False)
    finally:
        handle.remove()
    assert {r["decisions"] for r in res.stats.per_sample()} == {"FFFAFAFA"}
    assert len(calls) == 5  # the block ran on the 5 full steps only
    assert res.stats.cache_bytes == 2 * noise.numel() * 4  # order 1: two output-sized factors per sample
    assert torch.isfinite(res.latents).all() and not torch.equal(res.latents, ref.latents)
    exact = sample_cached(model, adapter, sched, cond, noise, 8, "fora", CacheConfig(interval=1, granularity="output"),
                          progress=False)
    assert torch.equal(exact.latents, ref.latents)


def test_speca_lite_verifies_with_the_probe_and_accepts_the_forecast_output(tiny):
    model, adapter, sched, cond, noise, ref = tiny
    exact = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(granularity="output"),
                          progress=False, threshold_fn=lambda i: 0.0)
    assert torch.equal(exact.latents, ref.latents)  # every check rejects: full compute
    loose = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(granularity="output", max_run=3),
                          progress=False, threshold_fn=lambda i: float("inf"))
    probe = sample_cached(model, adapter, sched, cond, noise, 8, "speca", CacheConfig(max_run=3, granularity="probe"),
                          progress=False, threshold_fn=lambda i: float("inf"))
    assert {r["decisions"] for r in loose.stats.per_sample()} == {"FFFAAAFA"}
    assert loose.stats.spec_calls == 4  # the probe ran on every speculative step
    assert loose.stats.cache_bytes > probe.stats.cache_bytes  # probe features + the output
    assert not torch.equal(loose.latents, probe.latents)  # the accepted output is the forecast output
