"""What the caches accept is close to full compute on the trained zoo models: the rel-L2 of the final
latents to ``full`` (same seed, 16 steps) is bounded, for ours and for diffusers' caches (which
must skip work too). The bound is loose, but a forecaster that returns garbage (zeros) fails it.
Our order-1 ``taylorseer`` also equals diffusers' TaylorSeer on the same schedule (an independent
implementation of the same forecast)."""

from __future__ import annotations

import pytest
import torch

from specdist.config import load_config
from specdist.engine.config import CacheConfig
from specdist.engine.speculative import sample_cached
from specdist.generate import job_inputs
from specdist.loading import load_model
from specdist.metrics.quality import rel_l2
from specdist.sampling import initial_noise, sample_full
from specdist.zoo.specs import ZOO_SPECS

STEPS = 16
BOUND = 0.5  # measured (16 steps, seed 0): taylorseer 0.28 / 0.17 (DiT probe / output), 0.027 (video);
#             diffusers' caches 0.04-0.28; a forecaster returning zeros: 0.59-0.70


@pytest.fixture(scope="module", params=list(ZOO_SPECS))
def zoo(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bundle = load_model(request.param, device="cpu")
    cfg = load_config(None, [f"model={request.param}", "num_samples=1"])
    prompts, labels = job_inputs(cfg, bundle)
    cond = bundle.encode(prompts or [""], labels, bundle.default_guidance, 0)
    noise = initial_noise(bundle.latent_shape(None, None, None), [0])
    ref = sample_full(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, STEPS, progress=False)
    yield bundle, cond, noise, ref
    torch.set_num_threads(threads)


@pytest.mark.parametrize("granularity", ["probe", "output"])
def test_taylorseer_on_zoo_models_stays_close_to_full(zoo, granularity):
    bundle, cond, noise, ref = zoo
    res = sample_cached(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, STEPS, "taylorseer",
                        CacheConfig(interval=2, order=1, granularity=granularity), progress=False)
    assert res.nfe == 9  # 3 warm-up steps, then every other step of 13
    err = float(rel_l2(res.latents, ref.latents).max())
    assert 0.0 < err < BOUND, err


@pytest.mark.parametrize("method, knobs", [
    ("diffusers-taylorseer", dict(taylorseer_cache_interval=2)),
    ("diffusers-fbcache", dict(fbcache_threshold=0.2)),
    ("diffusers-pab", dict()),
])
def test_diffusers_peers_on_zoo_models_stay_close_to_full(zoo, method, knobs):
    from specdist.engine.peers import PeerConfig, sample_with_peer

    bundle, cond, noise, ref = zoo
    res = sample_with_peer(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, STEPS, method,
                           PeerConfig(**knobs), progress=False)
    err = float(rel_l2(res.latents, ref.latents).max())
    assert res.nfe < STEPS and 0.0 < err < BOUND, (res.nfe, err)


def test_taylorseer_order_one_matches_diffusers_taylorseer(zoo):
    """Order 1, full steps 0-2 then every other step: ours (probe level: the last block's output
    extrapolated) and diffusers' TaylorSeer (every block's output extrapolated) forecast the same."""
    from specdist.engine.peers import PeerConfig, sample_with_peer

    bundle, cond, noise, ref = zoo
    args = (bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, STEPS)
    ours = sample_cached(*args, "taylorseer", CacheConfig(interval=2, order=1, granularity="probe"), progress=False)
    theirs = sample_with_peer(*args, "diffusers-taylorseer", PeerConfig(taylorseer_cache_interval=2,
                              taylorseer_max_order=1, taylorseer_disable_cache_before_step=3), progress=False)
    torch.testing.assert_close(ours.latents, theirs.latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.latents, ref.latents, rtol=1e-3, atol=1e-3)
