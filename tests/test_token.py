"""Token-level caching (``cache.granularity: token``, ``method: specdiff``) on tiny random models.

Exact where it must be: refreshing every token reproduces full compute bit for bit, refreshing
none reproduces the block-level forecast bit for bit; the unselected tokens run no query, output
or MLP rows (rows counted on the Linear modules); a sample's result does not depend on its batch
mates; the FLOPs the engine books equal torch's FLOP counter over a whole generation.
"""

from __future__ import annotations

import pytest
import torch
from test_adapters import FAMILIES, _setup
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from specdist.config import load_config
from specdist.engine.config import CacheConfig
from specdist.engine.hooks import SpeculationHooks
from specdist.engine.speculative import sample_cached
from specdist.engine.tokens import TokenPlan, levels, rotating_index, share_count
from specdist.errors import ConfigError
from specdist.metrics.flops import block_flops, forward_flops, token_block_flops
from specdist.sampling import initial_noise, sample_full

TOKEN_FAMILIES = ["dit", "pixart", "flux", "hunyuan_video", "wan"]
STEPS = 7


def _run(family: str, method: str, batch: int = 2, **knobs):
    model, adapter, shape, cond, _ = _setup(family, batch)
    noise = initial_noise(shape, list(range(batch)))
    cfg = CacheConfig(interval=3, **knobs)
    return sample_cached(model, adapter, FAMILIES[family][3](), cond, noise, STEPS, method, cfg, progress=False)


def _full(family: str, batch: int = 2) -> torch.Tensor:
    model, adapter, shape, cond, _ = _setup(family, batch)
    return sample_full(model, adapter, FAMILIES[family][3](), cond, initial_noise(shape, list(range(batch))), STEPS,
                       progress=False).latents


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_refreshing_every_token_is_the_full_trajectory_bit_for_bit(family):
    full = _full(family)
    ts = _run(family, "taylorseer", granularity="token", token_refresh=1.0)
    sd = _run(family, "specdiff", token_refresh=1.0, token_reuse=0.0)
    assert "A" in ts.stats.decisions[0]  # the token steps really ran
    assert torch.equal(ts.latents, full) and torch.equal(sd.latents, full)


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_refreshing_no_token_is_the_block_level_forecast_bit_for_bit(family):
    block = _run(family, "taylorseer", granularity="block")
    none = _run(family, "taylorseer", granularity="token", token_refresh=0.0)
    assert torch.equal(none.latents, block.latents)
    assert not torch.equal(block.latents, _full(family))  # the forecast is not trivially exact


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_token_level_speca_checks_the_refreshed_rows(family):
    # threshold 0: every check fails and is rolled back -> the full trajectory, bit for bit
    strict = _run(family, "speca", granularity="token", tau0=0.0, beta=1.0, token_refresh=0.25, max_run=2)
    assert torch.equal(strict.latents, _full(family))
    assert "R" in strict.stats.decisions[0] and "A" not in strict.stats.decisions[0]
    assert all(e is None or e > 0 for e in strict.stats.errors[0])
    # no threshold: every forecast accepted -> token-level taylorseer on the same schedule
    loose = _run(family, "speca", granularity="token", tau0=1e9, beta=1.0, token_refresh=0.25, max_run=2)
    fixed = _run(family, "taylorseer", granularity="token", token_refresh=0.25)
    assert loose.stats.decisions == fixed.stats.decisions and torch.equal(loose.latents, fixed.latents)


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_a_partial_refresh_lies_between_and_specdiff_books_its_levels(family):
    full = _full(family)
    err = lambda x: float((x - full).norm() / full.norm())
    block = err(_run(family, "taylorseer", granularity="block").latents)
    half = _run(family, "specdiff", token_refresh=0.5, token_reuse=0.25)
    assert err(half.latents) < block
    steps = half.stats.token_levels[0]
    assert [s[0] for s in steps] == [i for i, d in enumerate(half.stats.decisions[0]) if d == "A"]
    assert all(abs(sum(s[1:]) - 1.0) < 1e-9 and s[1] > 0.4 and s[3] > 0.15 for s in steps)


class _Features(dict):
    """Recorded features used as their own forecast; ``base`` (the last full step) is the same."""

    def base(self, name):
        return self[name]


class _MatmulRows(TorchDispatchMode):
    """Rows through each block Linear's weight, counted at the op itself (``linear`` / ``mm`` /
    ``addmm`` whose weight operand is that Linear's weight), so a gather or scatter around the call in a
    hook cannot hide what ran."""

    def __init__(self, model, adapter) -> None:
        super().__init__()
        lists = tuple(f"{name}." for name in adapter.block_lists(model))
        self.names = {mod.weight.data_ptr(): name.split(".", 2)[-1] for name, mod in model.named_modules()
                      if isinstance(mod, torch.nn.Linear) and name.startswith(lists)}
        self.rows: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", None)
        ops = {torch.ops.aten.linear: (0, 1), torch.ops.aten.mm: (0, 1), torch.ops.aten.addmm: (1, 2)}
        if packet in ops:
            x, w = (args[i] for i in ops[packet])
            name = self.names.get(w.data_ptr())
            if name is not None:
                self.rows[name] = self.rows.get(name, 0) + x.shape[:-1].numel()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
@pytest.mark.parametrize("specdiff,kv", [(False, "compute"), (True, "compute"), (False, "forecast"), (True, "forecast")])
def test_unselected_tokens_run_no_query_output_or_mlp_rows(family, specdiff, kv):
    model, adapter, _, cond, latents = _setup(family)
    b = latents.shape[0]
    hooks = SpeculationHooks(model, adapter, granularity="token", token_kv=kv)
    call = lambda: adapter.forward(model, latents, torch.tensor(500), cond.kwargs, cond.extra)
    try:
        with torch.inference_mode():
            plan = hooks.plan("record")
            call()
            feats = _Features({name: plan.recorded[name] for name in hooks.feature_names()})
            tokens = (TokenPlan(0.25, 0.25, 1.0, spec_block=0) if specdiff
                      else TokenPlan(0.25, phase=torch.zeros(b, dtype=torch.long)))
            hooks.plan("speculate", verify=False, forecast=feats, tokens=tokens)
            with _MatmulRows(model, adapter) as counter:
                call()
            rows = counter.rows
    finally:
        hooks.remove()
    n, t = tokens.lengths["video"], tokens.lengths.get("text", 0)
    k, kt = share_count(0.25, n), share_count(0.25, t)
    assert 0 < k < n
    # every family here has two blocks; specdiff runs block 0 in full (its self-speculation); queries, attention outputs and MLPs: selected rows only in the partial blocks
    q_rows = sum(v for key, v in rows.items() if key.endswith(("to_q", "add_q_proj")))
    kv_rows = sum(v for key, v in rows.items() if key.endswith(("to_k", "add_k_proj")))
    mlp_rows = sum(v for key, v in rows.items() if ".ff" in f".{key}" or "proj_mlp" in key or "ff_context" in key)
    if family in ("hunyuan_video", "flux"):  # one dual block (image/video + text), then one single block (both joined)
        dual_q, single_q = (n + t if specdiff else k + kt), k + kt
        assert q_rows == b * (dual_q + single_q)
        assert kv_rows == b * (2 * (n + t) if kv == "compute" else dual_q + single_q)
        assert rows["proj_out"] == b * (k + kt) and rows["proj_mlp"] == b * (k + kt)
    else:
        n_attn = 1 + (family in ("pixart", "wan"))  # cross-attention queries are rows too
        full_blocks, partial_blocks = (1, 1) if specdiff else (0, 2)
        assert q_rows == b * n_attn * (n * full_blocks + k * partial_blocks)
        self_kv = sum(v for key, v in rows.items() if key.endswith("attn1.to_k"))
        assert self_kv == b * (n * full_blocks + (n if kv == "compute" else k) * partial_blocks)
        assert mlp_rows == 2 * b * (n * full_blocks + k * partial_blocks)  # ff.net.0.proj and ff.net.2


@pytest.mark.parametrize("family", ["dit", "hunyuan_video"])
def test_specdiff_sample_does_not_depend_on_its_batch_mates(family):
    model, adapter, shape, cond, _ = _setup(family, 2)
    cfg = CacheConfig(interval=3, token_refresh=0.3, token_reuse=0.3)
    run = lambda c, seeds: sample_cached(model, adapter, FAMILIES[family][3](), c, initial_noise(shape, seeds), STEPS,
                                         "specdiff", cfg, progress=False)
    both = run(cond, [0, 1])
    alone = run(cond.select(torch.tensor([1])), [1])
    assert both.stats.decisions[1] == alone.stats.decisions[0]
    assert both.stats.token_cost[1] == pytest.approx(alone.stats.token_cost[0])
    torch.testing.assert_close(alone.latents[0], both.latents[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
@pytest.mark.parametrize("method,knobs", [("taylorseer", {"granularity": "token", "token_refresh": 0.3}),
                                          ("specdiff", {"token_refresh": 0.3, "token_reuse": 0.2}),
                                          ("specdiff", {"token_refresh": 0.3, "token_kv": "compute"})])
def test_booked_flops_match_torch_flop_counter_over_a_generation(family, method, knobs):
    model, adapter, shape, cond, _ = _setup(family, 1)
    n, t = adapter.token_counts(model, shape, cond)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        res = sample_cached(model, adapter, FAMILIES[family][3](), cond, initial_noise(shape, [0]), STEPS, method,
                            CacheConfig(interval=3, **knobs), progress=False)
    full_steps = sum(d == "F" for d in res.stats.decisions[0])
    booked = forward_flops(model, n, t) * (full_steps + res.stats.token_cost[0])
    assert 0 < res.stats.token_cost[0] < STEPS - full_steps
    assert int(counter.get_total_flops()) == pytest.approx(booked, rel=1e-9)


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_token_flops_formula_at_the_ends(family):
    model, adapter, shape, cond, _ = _setup(family, 1)
    n, t = adapter.token_counts(model, shape, cond)
    assert token_block_flops(model, n, t, n, t) == block_flops(model, n, t)
    none = token_block_flops(model, n, t, 0, 0)
    assert all(0 < x < y / 20 for x, y in zip(none, block_flops(model, n, t)))
    with pytest.raises(ValueError, match="out of range"):
        token_block_flops(model, n, t, n + 1, 0)


def test_selection_rules():
    # fixed schedule: each token once per n / k steps, spread, sorted
    idx = torch.cat([rotating_index(torch.tensor([p]), 16, 4) for p in range(4)], dim=1)
    assert sorted(idx.flatten().tolist()) == list(range(16))
    assert torch.equal(rotating_index(torch.tensor([0, 0]), 16, 4)[0], rotating_index(torch.tensor([0]), 16, 4)[0])
    # levels: top share recomputed, bottom share reused, per row
    score = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.8], [5.0, 4.0, 3.0, 2.0, 1.0]])
    index, reuse = levels(score, 0.4, 0.4)
    assert index.tolist() == [[1, 4], [0, 1]]
    assert reuse.tolist() == [[True, False, False, True, False], [False, False, False, True, True]]


@pytest.mark.parametrize("override,needle", [
    (["method=speca", "cache.granularity=token"], "'cache.tau0': None"),
    (["method=speca", "cache.granularity=token", "cache.tau0=0.1", "cache.token_refresh=0"], "'cache.token_refresh': 0"),
    (["method=fora", "cache.granularity=token"], "'cache.granularity': 'token'"),
    (["method=taylorseer", "cache.token_reuse=0.1"], "'cache.token_reuse'"),
    (["method=taylorseer", "cache.token_refresh=0.5"], "'cache.token_refresh'"),
    (["method=specdiff", "cache.token_refresh=1.5"], "'cache.token_refresh': 1.5 (allowed: a number in [0, 1])"),
    (["method=specdiff", "cache.token_refresh=0.6", "cache.token_reuse=0.5"], "'cache.token_reuse': 0.5"),
    (["method=specdiff", "cache.granularity=probe"], "'cache.granularity': 'probe'"),
    (["method=specdiff", "cache.tau0=0.1"], "'cache.tau0'"),
    (["method=specdiff", "cache.min_run=2"], "'cache.min_run'"),
    (["method=specdiff", "cache.token_history=-1"], "'cache.token_history'"),
    (["method=specdiff", "cache.token_kv=cached"], "'cache.token_kv': 'cached' (allowed: one of ['forecast', 'compute'])"),
    (["method=speca", "cache.token_kv=compute"], "'cache.token_kv'"),
    (["method=speca", "cache.granularity=token", "cache.tau0=0.1", "cache.token_reuse=0.1"], "'cache.token_reuse'"),
])
def test_config_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert needle in str(info.value)


def test_specdiff_defaults_validate_and_unsupported_attention_is_refused_clearly():
    cfg = load_config(None, ["method=specdiff"])
    assert cfg.cache.resolved("specdiff").granularity == "token"
    load_config(None, ["method=taylorseer", "cache.granularity=token", "cache.token_refresh=0.5"])
    model, adapter, shape, cond, latents = _setup("flux")
    attn = model.transformer_blocks[0].attn
    default = attn.processor
    hooks = SpeculationHooks(model, adapter, granularity="token")
    try:
        with torch.inference_mode():
            plan = hooks.plan("record")
            adapter.forward(model, latents, torch.tensor(500), cond.kwargs, cond.extra)
            feats = _Features({name: plan.recorded[name] for name in hooks.feature_names()})
            attn.set_processor(AttnProcessorStandIn())
            hooks.plan("speculate", verify=False, forecast=feats,
                       tokens=TokenPlan(0.25, phase=torch.zeros(latents.shape[0], dtype=torch.long)))
            with pytest.raises(NotImplementedError, match="FLUX token level: attention processor AttnProcessorStandIn"):
                adapter.forward(model, latents, torch.tensor(500), cond.kwargs, cond.extra)
    finally:
        attn.set_processor(default)
        hooks.remove()


class AttnProcessorStandIn:
    """An attention processor FLUX's token level does not know (an IP-adapter's, say)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        raise AssertionError("the token level must refuse this processor before calling it")


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_specdiff_in_a_stock_pipeline(family):
    """The diffusers drop-in (:func:`specdist.enable`) runs specdiff in a stock ``FluxPipeline``
    and ``HunyuanVideoPipeline``; refreshing every token gives the stock pipeline's output
    exactly, a partial refresh books its token steps."""
    import specdist
    from test_enable_pipeline import MODELS

    from specdist.engine.pipeline import last_stats

    make, run = MODELS[family]
    pipe = make(num_layers=1, num_single_layers=2)
    stock = run(pipe)
    for refresh, exact in ((1.0, True), (0.25, False)):
        specdist.enable(pipe, "specdiff", CacheConfig(interval=3, token_refresh=refresh))
        try:
            out = run(pipe)
            stats = last_stats(pipe)["cond"]
        finally:
            specdist.disable(pipe)
        assert torch.equal(out, stock) == exact
        assert "A" in stats.decisions[0] and all(c > 0 for c in stats.token_cost)


@pytest.mark.parametrize("method,knobs", [("taylorseer", {"granularity": "token"}), ("specdiff", {})])
def test_the_cache_byte_budget_holds_at_token_level(method, knobs):
    """Keys/values are cached features too: the budget leaves the first blocks uncached (then the
    spec block is the first cached one) and the run stays within it."""
    whole = _run("hunyuan_video", method, **knobs)
    cap = int(whole.stats.cache_bytes * 0.7)
    capped = _run("hunyuan_video", method, max_cache_bytes=cap, **knobs)
    assert capped.stats.cache_bytes <= cap < whole.stats.cache_bytes
    assert capped.stats.extra["cached_blocks"] < whole.stats.extra["cached_blocks"]
    assert torch.isfinite(capped.latents).all() and "A" in capped.stats.decisions[0]
