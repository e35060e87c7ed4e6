"""method=picard (latency mode): Picard iteration over a sliding window with drafted guesses —
exactness at tol 0, determinism across worker counts and result order, what the drafts buy, and
the configs it refuses (the Ray backend and a killed Ray worker: tests/test_distributed.py; gangs:
tests/test_gang_pool.py)."""

from __future__ import annotations


import pytest
import torch

from specdist.config import load_config
from specdist.errors import ConfigError
from specdist.report import output_sha256
from specdist.runtime.picard import PicardTrajectory
from specdist.runtime.run import run_distributed

from runtime_jobs import PICARD, in_shuffled_order, picard_job, sequential

STEPS = 12


@pytest.fixture(scope="module")
def reference():
    args = picard_job()
    return output_sha256(sequential(*args)), args


def _rounds(args) -> list[int]:
    cfg, bundle, prompts, labels, guidance, noise = args
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None)
    return run.anchors


def test_tol_zero_equals_full_bit_for_bit():
    """tol 0 slides only past guesses that were the exact state: the full trajectory, every bit."""
    args = picard_job("picard.tol=0.0")
    full = sequential(*picard_job("method=full", "picard.window=8", "picard.tol=0.5"))
    assert torch.equal(sequential(*args), full)


def test_picard_commits_fewer_rounds_than_steps_and_stays_close(reference):
    """The point of the method: fewer sequential rounds than steps, and a result near full compute
    (and not equal to it: the tolerance is used)."""
    sha, args = reference
    rounds = _rounds(args)
    assert all(r < STEPS for r in rounds), rounds
    got = sequential(*args)
    full = sequential(*picard_job("method=full", "picard.window=8", "picard.tol=0.5"))
    rel = ((got - full).norm() / full.norm()).item()
    assert 0 < rel < 0.25, rel


@pytest.mark.parametrize("workers", [1, 3])
def test_local_pool_of_any_size_matches_sequential(reference, workers):
    sha, _ = reference
    cfg, bundle, prompts, labels, guidance, noise = picard_job(f"runtime.workers={workers}")
    run = run_distributed(cfg, bundle, noise, prompts, labels, guidance, progress=False, log=lambda m: None)
    assert output_sha256(run.latents) == sha
    assert all(len(d) == STEPS for d in run.decisions), run.decisions
    assert run.stats.jobs_stale == run.stats.jobs_cancelled == 0  # a round waits for all of its calls


def test_result_order_does_not_matter(reference):
    sha, args = reference
    latents, trajs = in_shuffled_order(*args, seed=1)
    assert all(isinstance(t, PicardTrajectory) for t in trajs)
    assert output_sha256(latents) == sha


def test_drifted_guesses_need_fewer_rounds_than_copies():
    """Stepping the guesses on with the newest output (drift) beats copying the last state (the
    textbook ParaDiGMS initialisation) at the same tolerance."""
    drift = _rounds(picard_job("picard.window=8", "steps=24"))
    copy = _rounds(picard_job("picard.window=8", "steps=24", "picard.init=copy"))
    assert sum(drift) < sum(copy), (drift, copy)


@pytest.mark.parametrize("override, field", [
    ("cache.order=1", "cache.order"),
    ("peer.fbcache_threshold=0.1", "peer.fbcache_threshold"),
    ("runtime.backend=none", "runtime.backend"),
    ("runtime.mode=throughput", "runtime.mode"),
    ("picard.tol=1.0", "picard.tol"),
    ("picard.window=0", "picard.window"),
    ("picard.init=zero", "picard.init"),
])
def test_bad_picard_configs_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [*PICARD, override])


def test_picard_knobs_are_refused_for_other_methods():
    with pytest.raises(ConfigError, match=r"picard\.tol.*method=picard"):
        load_config(None, ["method=speca", "picard.tol=0.2"])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_drift_holds_the_schedulers_own_clean_sample_prediction(kind):
    """The x̂_0 that drift holds fixed is DDIM's own ``pred_original_sample``; flow matching holds the
    output itself (no map)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from specdist.runtime.picard import _x0_map

    s = DDIMScheduler(prediction_type=kind, clip_sample=False)
    s.set_timesteps(10)
    t = s.timesteps[3]
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    a, b = _x0_map(s, t)
    want = s.step(out, t, x).pred_original_sample
    assert torch.allclose(a * x + b * out, want, atol=1e-5)
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(10)
    assert _x0_map(flow, flow.timesteps[3]) is None
