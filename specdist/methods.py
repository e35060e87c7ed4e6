"""One entry point for every sampling method: ``full``, ours (``fora``, ``taylorseer``, ``speca``,
``specdiff``), the diffusers built-in caches as peers (``diffusers-*``) and exact speculative
sampling (``exact``)."""

from __future__ import annotations

from typing import Any

import torch

from .engine.config import CACHE_METHODS, CacheConfig, ExactConfig
from .models.base import Conditioning
from .sampling import SampleResult, sample_full


def run_method(method: str, model: torch.nn.Module, adapter: Any, scheduler: Any, cond: Conditioning,
               noise: torch.Tensor, steps: int, *, cache: CacheConfig | None = None, peer: Any = None,
               progress: bool = True, desc: str = "sampling", calibrations: dict | None = None,
               calibration: Any = None, on_step: Any = None, seeds: list[int] | None = None,
               exact: ExactConfig | None = None, agreement: Any = None) -> SampleResult:
    """Sample ``noise`` with ``method``; the same inputs give the same trajectory for ``full``.

    ``calibrations`` (a dict the caller owns) keeps MagCache calibrations across calls;
    ``calibration`` is speca's (:mod:`specdist.engine.calibration`), needed for a quality target;
    ``on_step(step)`` is called after each step (``full`` and our caching methods). ``exact`` needs
    the samples' ``seeds`` (its per-step noise streams are functions of them) and takes ``exact``.
    ``agreement`` (our caching methods): a gang's :class:`~specdist.engine.verify.Agreement` when the
    model runs context-parallel; ``None``: one device."""
    if method == "full":
        return sample_full(model, adapter, scheduler, cond, noise, steps, progress=progress, desc=desc,
                           on_step=None if on_step is None else (lambda i, t, x: on_step(i)))
    if method == "exact":
        from .engine.exact import sample_exact

        if seeds is None or len(seeds) != noise.shape[0]:
            raise ValueError("run_method('exact', ...) needs one seed per sample (seeds=)")
        return sample_exact(model, adapter, scheduler, cond, noise, steps, seeds, exact or ExactConfig(),
                            progress=progress, desc=desc)
    if method in CACHE_METHODS:
        from .engine.speculative import sample_cached

        from .engine.verify import ONE_DEVICE

        return sample_cached(model, adapter, scheduler, cond, noise, steps, method, cache or CacheConfig(),
                             progress=progress, desc=desc, calibration=calibration, on_step=on_step,
                             agreement=agreement or ONE_DEVICE)
    from .engine.config import PeerConfig
    from .engine.peers import sample_with_peer

    return sample_with_peer(model, adapter, scheduler, cond, noise, steps, method, peer or PeerConfig(),
                            progress=progress, desc=desc, calibrations=calibrations)
