"""``specdist.enable(pipe)`` on stock diffusers pipelines (tiny random FLUX and HunyuanVideo, CPU).

Every comparison runs the same pipeline with the same per-sample generators and prompt embeddings,
``output_type="latent"``.
"""

from __future__ import annotations

import doctest
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from forecast_check import Tap, assert_accepted_are_extrapolations
from tiny_pipelines import flux_pipe, gens, hunyuan_video_pipe, text

import specdist
from specdist import ConfigError, SpecdistError
from specdist.engine import pipeline as drop_in
from specdist.engine.config import CacheConfig
from specdist.engine.pipeline import last_stats, step_index

STEPS = 8
REJECT_ALL = CacheConfig(tau0=0.0, beta=1.0)  # τ = 0: every check fails, every step is recomputed fully
ACCEPT_ALL = CacheConfig(tau0=1e9, beta=1.0, max_run=3, order=1)  # every check passes: F F F A A A F A


def run_flux(pipe, cfg: bool = False) -> torch.Tensor:
    kw = {}
    if cfg:
        kw = dict(negative_prompt_embeds=text(2, 5, 16, 3), true_cfg_scale=4.0,
                  negative_pooled_prompt_embeds=torch.randn(2, 8, generator=torch.Generator().manual_seed(4)))
    pooled = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=text(2, 5, 16, 1), pooled_prompt_embeds=pooled, height=16, width=16, guidance_scale=3.5,
                num_inference_steps=STEPS, generator=gens(), output_type="latent", **kw).images


def run_hunyuan(pipe, cfg: bool = False) -> torch.Tensor:
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    kw = {}
    if cfg:
        kw = dict(negative_prompt_embeds=text(2, 6, 16, 3), true_cfg_scale=4.0,
                  negative_prompt_attention_mask=torch.ones(2, 6, dtype=torch.long),
                  negative_pooled_prompt_embeds=torch.randn(2, 8, generator=torch.Generator().manual_seed(4)))
    pooled = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=text(2, 6, 16, 1), pooled_prompt_embeds=pooled, prompt_attention_mask=mask, height=16,
                width=16, num_frames=5, guidance_scale=6.0, num_inference_steps=STEPS, generator=gens(),
                output_type="latent", **kw).frames


MODELS: dict[str, tuple[Callable, Callable]] = {"flux": (flux_pipe, run_flux),
                                                  "hunyuan_video": (hunyuan_video_pipe, run_hunyuan)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: with a busy CPU, a second thread costs ~30× in synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def first_block_runs(pipe) -> Iterator[list[int]]:
    """Counts real runs of the first block. The pre-hook sits on the attention's query projection: a
    pre-hook on the block (or, at block granularity, on the attention module) fires on every call,
    also when the speculation hook returns a forecast instead of running the body."""
    runs = [0]
    handle = pipe.transformer.transformer_blocks[0].attn.to_q.register_forward_pre_hook(
        lambda *_: runs.__setitem__(0, runs[0] + 1))
    try:
        yield runs
    finally:
        handle.remove()


def no_hooks_left(pipe) -> bool:
    return all(not m._diffusers_hook.hooks for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook"))


@pytest.mark.parametrize("granularity", ["probe", "block"])
@pytest.mark.parametrize("name", MODELS)
def test_every_rejected_check_rolls_back_to_the_exact_output(name, granularity):
    make, run = MODELS[name]
    pipe = make()
    reference = run(pipe)
    specdist.enable(pipe, "speca", replace(REJECT_ALL, granularity=granularity))
    out = run(pipe)
    decisions = ["".join(d) for d in last_stats(pipe)["cond"].decisions]
    specdist.disable(pipe)
    assert decisions == ["FFF" + "R" * (STEPS - 3)] * 2  # forecasts were made, checked and rolled back
    assert torch.equal(out, reference)


@pytest.mark.parametrize("granularity", ["probe", "block"])
@pytest.mark.parametrize("name", MODELS)
def test_accepted_forecasts_skip_blocks(name, granularity):
    make, run = MODELS[name]
    pipe = make()
    with first_block_runs(pipe) as runs:
        reference = run(pipe)
    assert runs[0] == STEPS
    # what is accepted: probe level, the probe (last block) runs on the extrapolation of its input;
    # block level, the first block's feed-forward branch is the extrapolation of its full-step outputs
    model = pipe.transformer
    tap = (Tap(model.single_transformer_blocks[-1].norm, pre=True) if granularity == "probe"
           else Tap(model.transformer_blocks[0].ff))
    try:
        with specdist.enabled(pipe, "speca", replace(ACCEPT_ALL, granularity=granularity)), \
                first_block_runs(pipe) as runs:
            out = run(pipe)
            stats = last_stats(pipe)["cond"]
    finally:
        tap.remove()
    assert ["".join(d) for d in stats.decisions] == ["FFFAAAFA"] * 2
    assert runs[0] == 4  # full steps only: 4 of 8
    assert stats.full_calls == 4 and stats.spec_calls == 4
    assert assert_accepted_are_extrapolations(tap.values, "FFFAAAFA", order=1) == 4
    assert not torch.equal(out, reference)


@pytest.mark.parametrize("name", MODELS)
def test_true_cfg_speculates_per_context(name):
    make, run = MODELS[name]
    pipe = make()
    reference = run(pipe, cfg=True)
    with specdist.enabled(pipe, "speca", REJECT_ALL):
        exact = run(pipe, cfg=True)
        assert sorted(last_stats(pipe)) == ["cond", "uncond"]
    assert torch.equal(exact, reference)
    tap = Tap(pipe.transformer.single_transformer_blocks[-1].norm, pre=True)
    try:
        with specdist.enabled(pipe, "speca", replace(ACCEPT_ALL, granularity="probe")), first_block_runs(pipe) as runs:
            out = run(pipe, cfg=True)
            stats = last_stats(pipe)
    finally:
        tap.remove()
    assert runs[0] == 2 * 4  # 4 full steps per branch
    assert all(["".join(d) for d in s.decisions] == ["FFFAAAFA"] * 2 for s in stats.values())
    # the pipeline calls cond, then uncond, each step: each context extrapolates its own history
    for context in (tap.values[0::2], tap.values[1::2]):
        assert assert_accepted_are_extrapolations(context, "FFFAAAFA", order=1) == 4
    assert not torch.equal(out, reference)


def test_disable_restores_the_stock_pipeline():
    pipe = flux_pipe()
    forward = pipe.transformer.forward
    reference = run_flux(pipe)
    specdist.enable(pipe, "taylorseer", CacheConfig(interval=2))
    assert not torch.equal(run_flux(pipe), reference)
    specdist.disable(pipe)
    assert no_hooks_left(pipe) and pipe.transformer.forward == forward
    assert torch.equal(run_flux(pipe), reference)
    with pytest.raises(SpecdistError, match="not enabled"):
        last_stats(pipe)
    specdist.disable(pipe)  # a no-op when not enabled


@pytest.mark.parametrize("name", MODELS)
def test_consecutive_generations_are_independent(name):
    make, run = MODELS[name]
    pipe = make()
    with specdist.enabled(pipe, "speca", ACCEPT_ALL):
        first, first_stats = run(pipe), last_stats(pipe)["cond"]
        second, second_stats = run(pipe), last_stats(pipe)["cond"]
    assert torch.equal(first, second)
    assert second_stats is not first_stats and second_stats.decisions == first_stats.decisions
    assert no_hooks_left(pipe)


def test_errors_are_one_clear_line():
    pipe = flux_pipe()
    with pytest.raises(SpecdistError, match="unsupported transformer Linear"):
        specdist.enable(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
    with pytest.raises(SpecdistError, match="unknown method 'magic'"):
        specdist.enable(pipe, "magic")
    with pytest.raises(ConfigError, match="cache.max_run"):
        specdist.enable(pipe, "speca", CacheConfig(max_run=0))
    with pytest.raises(SpecdistError, match="probe_block 5 out of range"):
        specdist.enable(pipe, "speca", CacheConfig(probe_block=5))
    with pytest.raises(SpecdistError, match="quality target needs calibration="):  # the default: a target
        specdist.enable(pipe)
    assert no_hooks_left(pipe)
    specdist.enable(pipe, "speca", ACCEPT_ALL)
    with pytest.raises(SpecdistError, match="already enabled"):
        specdist.enable(pipe, "speca", ACCEPT_ALL)
    with pytest.raises(SpecdistError, match="cache_context"):  # a call outside the pipeline's loop
        pipe.transformer(hidden_states=torch.zeros(1, 16, 16))
    specdist.disable(pipe)
    assert no_hooks_left(pipe)


def test_step_index_matches_the_pipelines_cast():
    timesteps = torch.tensor([1000.0, 999.0, 998.0, 500.0, 20.0])
    call = lambda i: (timesteps[i].expand(2).to(torch.bfloat16) / 1000)  # FLUX: bf16 latents, t / 1000
    assert [step_index(call(i), timesteps, 1000.0, after=i - 1) for i in range(5)] == [0, 1, 2, 3, 4]
    assert step_index(call(0), timesteps, 1000.0, after=4) == 0  # a new generation starts over
    assert step_index(torch.tensor([500.0]), timesteps) == 3
    with pytest.raises(SpecdistError, match="not one of"):
        step_index(torch.tensor([700.0]), timesteps)


def test_docstring_example_runs():
    assert doctest.testmod(drop_in, optionflags=doctest.ELLIPSIS).failed == 0
