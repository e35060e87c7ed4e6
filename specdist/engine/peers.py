"""diffusers' built-in caches as peer methods, run on the same loop and inputs as ours.

Methods (each a diffusers hook config applied to the transformer for one generation):

* ``diffusers-fbcache`` — First Block Cache (ParaAttention, after TeaCache, Liu et al. 2024): the
  first block always runs; while its residual changed by less than ``fbcache_threshold`` since
  the last full step, the other blocks are skipped and their cached residual is added.
* ``diffusers-taylorseer`` — TaylorSeer (Liu et al. 2025, arXiv:2503.06923): hooked modules
  compute every ``taylorseer_cache_interval`` steps and are Taylor-forecast in between.
* ``diffusers-magcache`` — MagCache (Ma et al. 2025): per-step residual magnitude ratios, calibrated
  once per (model, steps), accumulate an error; all blocks are skipped (last residual reused)
  while it stays under ``magcache_threshold``.
* ``diffusers-pab`` — Pyramid Attention Broadcast (Zhao et al. 2024, arXiv:2408.12588): inside a
  timestep range, each self-attention reuses its output for ``pab_spatial_skip_range − 1``
  calls out of ``pab_spatial_skip_range``.

:func:`sample_with_peer` applies the hooks with diffusers' own ``apply_*`` functions (DiT has no
``enable_cache``), runs :func:`~specdist.sampling.sample_full` with each step's model call inside
``cache_context("cond", step_index=i, num_inference_steps=N, timestep=t)`` (guided calls are one
batch, so one context), and afterwards — always — resets and removes every hook it added and
deletes the hook registries it created, so the next generation starts from the untouched model.

Work counted (``nfe``): forward pre-hooks on every ``nn.Linear`` inside the transformer blocks
add ``weight.numel() × rows`` (multiply-accumulates) when the layer really runs; a skipped block,
or an attention whose output is reused, never calls its linear layers. A step's work is its sum
divided by a full step's (the first step: every peer computes it fully), so a full step counts
1, an fbcache skip the first block's share, a PAB step with reused attention the MLP and
modulation share, and a skip of all blocks ~0 (DiT calls block 0's label/timestep embedder
again for its output head, ~2 % of a step at the tiny test size). Not counted: the attention
products ``QKᵀ``/``AV`` (no module) and everything outside the blocks (embedding, head), so at
long sequences PAB saves more than counted.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig, apply_first_block_cache, apply_mag_cache,
                             apply_pyramid_attention_broadcast, apply_taylorseer_cache)
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from ..errors import SpecdistError
from ..errors import check_value as _check
from ..models.base import Conditioning, ModelAdapter
from ..sampling import SampleResult, sample_full
from .config import PEER_METHODS, PeerConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MagCalibrations = dict[tuple[int, int], list[float]]  # (id(model), steps) -> ratios, caller-owned


@dataclass
class PeerResult(SampleResult):
    """A peer's samples; ``nfe`` is the sum of ``work`` (see the module doc)."""

    work: list[float] = field(default_factory=list)  # [steps] fraction of a full step's block work that ran
    mag_ratios: list[float] | None = None  # magcache: the ratios used


class _WorkMeter:
    """Multiply-accumulates of the blocks' linear layers that really ran, per step."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        linears = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
        self._sizes = [m.weight.numel() for m in linears]
        self.per_step: list[int] = []
        self._handles = [m.register_forward_pre_hook(functools.partial(self._count, k)) for k, m in enumerate(linears)]

    def _count(self, k: int, module: nn.Linear, args: tuple) -> None:
        if self.per_step:
            self.per_step[-1] += self._sizes[k] * (args[0].numel() // module.in_features)

    def start_step(self) -> None:
        self.per_step.append(0)

    def fractions(self) -> list[float]:
        """Work per step relative to the heaviest, a full one (every peer's first step is full)."""
        full = max(self.per_step, default=0)
        return [w / full if full else 0.0 for w in self.per_step]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _Session:
    """What one generation with peer hooks needs at each step."""

    model: nn.Module
    steps: int
    meter: _WorkMeter
    timestep: float = 0.0  # current scheduler timestep (PAB's callback reads it)

    @contextlib.contextmanager
    def step_context(self, i: int, t: torch.Tensor) -> Iterator[None]:
        self.timestep = float(t)
        self.meter.start_step()
        # CacheMixin.cache_context only walks HookRegistry: valid on models without CacheMixin (DiT).
        with CacheMixin.cache_context(self.model, "cond", step_index=i, num_inference_steps=self.steps, timestep=t):
            yield


@contextlib.contextmanager
def _installed(model: nn.Module, adapter: ModelAdapter, steps: int,
               apply: Callable[[_Session], None]) -> Iterator[_Session]:
    """Apply peer hooks for one generation; on exit reset and remove every hook added, delete the
    registries created and the ``forward`` attributes they set, and drop the work meter."""
    if getattr(model, "_cache_config", None) is not None:
        raise SpecdistError(f"{type(model).__name__} already has a diffusers cache enabled; disable it first")
    before = {name: set(m._diffusers_hook.hooks) for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")}
    own_forward = {name for name, m in model.named_modules() if "forward" in vars(m)}
    session = _Session(model, steps, _WorkMeter(adapter.blocks(model)))
    try:
        apply(session)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        yield session
    finally:
        session.meter.remove()
        kept = []
        for name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for hook_name in reversed([h for h in registry.hooks if h not in before.get(name, set())]):
                hook = registry.hooks[hook_name]
                if hook._is_stateful:
                    hook.reset_state(module)
                registry.remove_hook(hook_name, recurse=False)
            if name not in before and not registry.hooks:
                del module._diffusers_hook
                if name not in own_forward:
                    vars(module).pop("forward", None)
            else:
                kept.append(registry)
        for registry in kept:
            registry.invalidate_child_registries_cache()


def _check_block_hooks(model: nn.Module, adapter: ModelAdapter, method: str) -> None:
    """fbcache/magcache hook the blocks diffusers finds itself: they must be the adapter's, >= 2, registered."""
    blocks = adapter.blocks(model)
    found = [b for name, lst in model.named_children()
             if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(lst, nn.ModuleList) for b in lst]
    why = (f"it needs at least 2 transformer blocks, the model has {len(blocks)}" if len(blocks) < 2 else
           f"diffusers does not find {', '.join(adapter.block_lists(model))} as its transformer blocks"
           if [id(b) for b in found] != [id(b) for b in blocks] else None)
    for block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            why = why or f"block class {type(block).__name__} is not in diffusers' TransformerBlockRegistry"
    if why:
        raise SpecdistError(f"{method} does not support {type(model).__name__}: {why}")


def _taylorseer_config(model: nn.Module, adapter: ModelAdapter, cfg: PeerConfig) -> TaylorSeerCacheConfig:
    names = [n for n, _ in model.named_modules()]
    if cfg.taylorseer_lite:
        if "proj_out" not in names:
            raise SpecdistError(f"diffusers-taylorseer lite mode does not support {type(model).__name__}: "
                                f"it forecasts a top-level 'proj_out', which this model lacks")
        ids = None
    else:
        ids = cfg.taylorseer_cache_identifiers or [rf"{re.escape(n)}\.\d+" for n in adapter.block_lists(model)]
        if not any(re.fullmatch(p, n) for p in ids for n in names):
            raise SpecdistError(f"diffusers-taylorseer: cache identifiers {ids} match no module of "
                                f"{type(model).__name__}")
    return TaylorSeerCacheConfig(
        cache_interval=cfg.taylorseer_cache_interval, max_order=cfg.taylorseer_max_order,
        disable_cache_before_step=cfg.taylorseer_disable_cache_before_step, cache_identifiers=ids,
        taylor_factors_dtype=_DTYPES[cfg.taylorseer_factors_dtype], use_lite_mode=cfg.taylorseer_lite)


def _pab_apply(model: nn.Module, adapter: ModelAdapter, cfg: PeerConfig, session: _Session) -> None:
    # Only the adapter's blocks: diffusers' default identifiers ("blocks", re.search) would also
    # catch e.g. HunyuanVideo's text token-refiner attention ("refiner_blocks").
    ids = tuple(rf"^{re.escape(n)}\." for n in adapter.block_lists(model))
    if not any(isinstance(m, _ATTENTION_CLASSES) and not getattr(m, "is_cross_attention", False)
               for b in adapter.blocks(model) for m in b.modules()):
        raise SpecdistError(f"diffusers-pab does not support {type(model).__name__}: "
                            f"no diffusers self-attention in its blocks")
    apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=cfg.pab_spatial_skip_range,
        spatial_attention_timestep_skip_range=tuple(cfg.pab_spatial_timestep_range),
        spatial_attention_block_identifiers=ids,
        current_timestep_callback=lambda: session.timestep))


def calibrate_magcache(model: nn.Module, adapter: ModelAdapter, scheduler: Any, cond: Conditioning,
                       noise: torch.Tensor, steps: int) -> list[float]:
    """MagCache's per-step magnitude ratios for ``model`` at ``steps`` steps, from one full run
    in diffusers' calibrate mode (no block is skipped; the result equals :func:`sample_full`'s).

    diffusers prints the ratios and clears them when the step counter reaches
    ``num_inference_steps``; calibrating with ``steps + 1`` keeps them in the tail hook's state,
    where they are read.
    """
    _check_block_hooks(model, adapter, "diffusers-magcache")
    config = MagCacheConfig(calibrate=True, num_inference_steps=steps + 1)
    with _installed(model, adapter, steps, lambda s: apply_mag_cache(model, config)) as session:
        sample_full(model, adapter, scheduler, cond, noise, steps, progress=False, step_context=session.step_context)
        tail = adapter.blocks(model)[-1]
        manager = tail._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK).state_manager
        manager.set_context(CacheContext("cond"))
        ratios = [float(r) for r in manager.get_state().calibration_ratios]
    if len(ratios) != steps:
        raise SpecdistError(f"diffusers-magcache calibration recorded {len(ratios)} ratios for {steps} steps")
    return ratios


def sample_with_peer(
    model: nn.Module,
    adapter: ModelAdapter,
    scheduler: Any,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int,
    method: str,
    peer_cfg: PeerConfig,
    *,
    progress: bool = True,
    desc: str = "",
    calibrations: MagCalibrations | None = None,
) -> SampleResult:
    """Sample with the diffusers cache ``method`` (one of :data:`PEER_METHODS`) on the loop of
    :func:`~specdist.sampling.sample_full`; returns a :class:`PeerResult` (see the module doc).

    ``calibrations``: caller-owned store of MagCache ratios keyed ``(id(model), steps)``; a
    missing entry is calibrated on this call's inputs and stored (without a store, every call
    without ``peer_cfg.magcache_ratios`` calibrates). The model is left without any added hook.
    """
    _check(method in PEER_METHODS, "method", method, f"one of {list(PEER_METHODS)}")
    peer_cfg.validate()
    ratios: list[float] | None = None
    if method == "diffusers-fbcache":
        _check_block_hooks(model, adapter, method)
        apply = lambda s: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=peer_cfg.fbcache_threshold))
    elif method == "diffusers-taylorseer":
        ts_config = _taylorseer_config(model, adapter, peer_cfg)
        apply = lambda s: apply_taylorseer_cache(model, ts_config)
    elif method == "diffusers-magcache":
        _check_block_hooks(model, adapter, method)
        ratios = peer_cfg.magcache_ratios
        if ratios is None:
            store = calibrations if calibrations is not None else {}
            key = (id(model), steps)
            if key not in store:
                store[key] = calibrate_magcache(model, adapter, scheduler, cond, noise, steps)
            ratios = store[key]
        mag_config = MagCacheConfig(threshold=peer_cfg.magcache_threshold, mag_ratios=list(ratios),
                                    max_skip_steps=peer_cfg.magcache_max_skip_steps, num_inference_steps=steps,
                                    retention_ratio=peer_cfg.magcache_retention_ratio)
        apply = lambda s: apply_mag_cache(model, mag_config)
    else:
        apply = lambda s: _pab_apply(model, adapter, peer_cfg, s)
    with _installed(model, adapter, steps, apply) as session:
        res = sample_full(model, adapter, scheduler, cond, noise, steps, progress=progress, desc=desc or method,
                          step_context=session.step_context)
        work = session.meter.fractions()
    return PeerResult(latents=res.latents, nfe=sum(work), wall_s=res.wall_s, timesteps=res.timesteps,
                      work=work, mag_ratios=None if ratios is None else [float(r) for r in ratios])
