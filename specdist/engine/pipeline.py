"""Speculative feature caching as a drop-in for stock diffusers pipelines (DESIGN §2.2, §4).

:func:`enable` registers two layers of diffusers hooks on ``pipe.transformer``; the pipeline's own
``__call__`` runs unchanged:

* one transformer-level :class:`~diffusers.hooks.ModelHook` (``"specdist_pipeline"``) that turns
  each transformer call of the pipeline into one :meth:`SpeculativeStepper.step`. The step index is
  found explicitly: the call's ``timestep`` is looked up in ``pipe.scheduler.timesteps``
  (:func:`step_index`). One stepper is kept per cache context (the pipeline's
  ``transformer.cache_context("cond")`` / ``("uncond")``, so true CFG speculates on each branch
  separately) and a fresh one starts when a context's step index does not move forward (step 0 of
  a new generation), so consecutive ``pipe(...)`` calls are independent. The stepper reaches the
  model through the original forward on the sub-batches it needs: every batch-first tensor argument
  is cut to those samples;
* the block-level :class:`SpeculationHooks` that the stepper plans before each of those calls.

Decisions are per sample and per context: with true CFG the ``cond`` and ``uncond`` calls speculate
and roll back independently (specdist's own loop batches both and decides jointly). Pipelines reset
stateful hooks at the end of each call; :func:`last_stats` still returns that generation's stats.
Only first-order schedulers are supported (Heun-like schedulers repeat timesteps).

Example (a tiny random FLUX, runs on CPU in about a second)::

    >>> import torch
    >>> from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    >>> import specdist
    >>> from specdist.engine.config import CacheConfig
    >>> from specdist.engine.pipeline import last_stats
    >>> _ = torch.manual_seed(0)
    >>> model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
    ...                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
    ...                                pooled_projection_dim=8, axes_dims_rope=[2, 2, 4])
    >>> pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
    ...                     text_encoder_2=None, tokenizer_2=None, transformer=model)
    >>> pipe.set_progress_bar_config(disable=True)
    >>> specdist.enable(pipe, "speca", CacheConfig(tau0=1e9, beta=1.0, max_run=3))
    >>> latents = pipe(prompt_embeds=torch.randn(1, 4, 16), pooled_prompt_embeds=torch.randn(1, 8), height=32,
    ...                width=32, num_inference_steps=8, output_type="latent").images
    >>> "".join(last_stats(pipe)["cond"].decisions[0])  # F full, A accepted forecast, R rolled back
    'FFFAAAFA'
    >>> specdist.disable(pipe)
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..attention import apply_attention_backend
from ..errors import ConfigError, SpecdistError
from ..models import adapter_for
from ..models.base import ModelAdapter
from .config import CACHE_METHODS, CacheConfig
from .hooks import SpeculationHooks
from .calibration import Calibration
from .decision import forecaster_time, make_rule
from .speculative import CacheStats, SpeculativeStepper

HOOK_NAME = "specdist_pipeline"
SUPPORTED = ("FluxTransformer2DModel", "HunyuanVideoTransformer3DModel")
"""Transformer classes whose pipelines call the model once per step and cache context."""
_SHARED_IDS = ("img_ids", "txt_ids")  # FLUX RoPE positions: [tokens, 3] shared by the batch (3-D: batched)


class _Generation(BaseState):
    """One cache context's current generation: its stepper and the last step index it ran."""

    def __init__(self) -> None:
        self.stepper: SpeculativeStepper | None = None
        self.last_step = -1

    def reset(self) -> None:
        self.stepper, self.last_step = None, -1


class _Generations(StateManager):
    """A :class:`_Generation` per cache context name (diffusers sets the context on this manager)."""

    def __init__(self) -> None:
        super().__init__(_Generation)

    def states(self) -> dict[str, _Generation]:
        """Every context's state, by context name."""
        return dict(self._state_cache)


def step_index(timestep: torch.Tensor, timesteps: torch.Tensor, scale: float = 1.0, after: int = -1) -> int:
    """Position of a transformer call's ``timestep`` (``[B]`` or scalar) in the scheduler's ``timesteps``.

    The scheduler's timesteps are brought to the call's convention as pipelines do it (cast to the
    call's dtype, then divided by ``scale``, the adapter's ``call_timestep_scale``), so the match is
    exact even in bf16; where that cast makes neighbouring timesteps equal, the first match after
    step ``after`` wins (a pipeline walks its timesteps in order). Reads both tensors on the host.
    """
    if len(timesteps) == 0:
        raise SpecdistError("specdist: pipe.scheduler has no timesteps (the pipeline did not call set_timesteps)")
    t = torch.as_tensor(timestep).reshape(-1)[:1].cpu()
    ts = timesteps.cpu()
    cast = ts.to(t.dtype) if scale == 1 else ts.to(t.dtype) / scale
    gap = (cast.double() - t.double()).abs()
    best = float(gap.min())
    if best * scale > 0.01 * (float(ts.max() - ts.min()) + 1.0):
        raise SpecdistError(f"specdist: the transformer's timestep {float(t) * scale:g} is not one of "
                            f"pipe.scheduler.timesteps (called outside the pipeline's denoising loop?)")
    hits = (gap == best).nonzero().flatten().tolist()
    return next((h for h in hits if h > after), hits[0])


def _select(value: Any, rows: torch.Tensor, batch: int, name: str = "") -> Any:
    """``value`` with every batch-first tensor (first dim ``batch``) cut to ``rows``; recurses into
    lists, tuples and dicts. FLUX's 2-D ``img_ids``/``txt_ids`` are shared by the batch and kept."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch or (name in _SHARED_IDS and value.ndim < 3):
            return value
        return value[rows.to(value.device)]
    if isinstance(value, dict):
        return {k: _select(v, rows, batch, k) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_select(v, rows, batch, name) for v in value)
    return value


class _PipelineHook(ModelHook):
    """Transformer-level hook: one pipeline call = one speculative step of its cache context."""

    _is_stateful = True

    def __init__(self, pipe: Any, adapter: ModelAdapter, blocks: SpeculationHooks, method: str,
                 cfg: CacheConfig, calibration: Calibration | None = None) -> None:
        super().__init__()
        self._pipe = weakref.ref(pipe)  # the scheduler is read at call time (users may swap it)
        self.adapter, self.blocks, self.method, self.cfg = adapter, blocks, method, cfg
        self.calibration = calibration
        self.generations = _Generations()
        self.finished: dict[str, CacheStats] = {}  # per context, the generation before the last reset
        self.params: tuple[str, ...] = ()

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.params = tuple(inspect.signature(module.forward).parameters)  # to name positional arguments
        return module

    def reset_state(self, module: nn.Module) -> nn.Module:
        # Pipelines reset stateful hooks at the end of every call (maybe_free_model_hooks): keep the stats.
        self.finished = self.stats() or self.finished
        self.generations.reset()
        return module

    def stats(self) -> dict[str, CacheStats]:
        """Per context name, the stats of the generation in progress (empty after a reset)."""
        return {name: g.stepper.stats for name, g in self.generations.states().items() if g.stepper is not None}

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs = {**dict(zip(self.params, args)), **kwargs}
        return_dict = kwargs.pop("return_dict", True)
        try:
            context = self.generations.context
        except ValueError:
            raise SpecdistError("specdist: call the transformer inside `transformer.cache_context(name)` "
                                "(the pipelines do)") from None
        generation = self.generations.get_state()
        pipe = self._pipe()
        if pipe is None:
            raise SpecdistError("specdist: the pipeline this transformer was enabled with no longer exists")
        scheduler = pipe.scheduler
        if getattr(scheduler, "order", 1) != 1:
            raise SpecdistError(f"specdist: {type(scheduler).__name__} is a multi-stage scheduler "
                                f"(order {scheduler.order}); only first-order schedulers are supported")
        timesteps = scheduler.timesteps
        step = context.step_index
        if step is None:
            step = step_index(kwargs["timestep"], timesteps, self.adapter.call_timestep_scale, generation.last_step)
        batch = kwargs["hidden_states"].shape[0]
        stepper = generation.stepper
        if stepper is None or step <= generation.last_step or stepper.samples != batch:  # a new generation
            try:
                rule = make_rule(self.method, self.cfg, len(timesteps), batch, calibration=self.calibration)
            except ValueError as err:  # a calibration made for another step count
                raise SpecdistError(f"specdist: {err}") from None
            stepper = generation.stepper = SpeculativeStepper(self.blocks, self.method, self.cfg, batch, rule=rule)
        generation.last_step = step
        out_dtype = kwargs["hidden_states"].dtype

        def call(samples: torch.Tensor) -> torch.Tensor:
            nonlocal out_dtype
            sub = kwargs if len(samples) == batch else _select(kwargs, samples, batch)
            out = self.fn_ref.original_forward(**sub, return_dict=False)[0]
            out_dtype = out.dtype
            return out.float()

        train_t = float(getattr(scheduler.config, "num_train_timesteps", 1000))
        time = forecaster_time(self.cfg, step, timesteps[step], train_t)
        out = stepper.step(step, len(timesteps), time, call).to(out_dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _hook(pipe: Any) -> _PipelineHook | None:
    registry = getattr(getattr(pipe, "transformer", None), "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def enable(pipe: Any, method: str = "speca", cache: CacheConfig | None = None,
           calibration: Calibration | None = None, attention_backend: str | None = None) -> dict[str, Any] | None:
    """Make ``pipe`` (a diffusers pipeline with a transformer in :data:`SUPPORTED`) speculate.

    Args:
        pipe: the pipeline; its ``transformer`` gets the hooks, its ``scheduler`` is read every call.
        method: ``speca`` (forecast, verify with one block, roll back), ``taylorseer``, ``fora`` or
            ``specdiff`` (token level).
        cache: the method's knobs (default :class:`CacheConfig`); validated here.
        calibration: ``speca`` with a quality target (the default): the transformer's calibration
            for the pipeline's step count and size (:func:`specdist.calibrate.calibrate_pipeline`);
            not needed with ``cache.tau0`` (a threshold schedule).
        attention_backend: set on ``pipe.transformer`` the way ``specdist generate`` sets it
            (:func:`specdist.attention.apply_attention_backend`: ``auto``, ``native``, ``flash``, …);
            ``None`` leaves the transformer's backend as it is.

    Returns:
        What :func:`~specdist.attention.apply_attention_backend` set, or ``None``.

    Raises:
        SpecdistError: unsupported transformer or method, invalid ``cache``, an attention backend
            that cannot run here, a diffusers cache already enabled, or specdist already enabled on
            ``pipe`` (not idempotent: a second call with other settings would silently be ignored;
            :func:`disable` first).
    """
    model = getattr(pipe, "transformer", None)
    name = type(model).__name__
    if name not in SUPPORTED:
        raise SpecdistError(f"specdist.enable: unsupported transformer {name} (supported: {', '.join(SUPPORTED)})")
    if method not in CACHE_METHODS:
        raise SpecdistError(f"specdist.enable: unknown method {method!r} (allowed: {', '.join(CACHE_METHODS)})")
    cfg = cache if cache is not None else CacheConfig()
    cfg.validate()
    cfg.validate_for(method)
    cfg = cfg.resolved(method)
    if _hook(pipe) is not None:
        raise SpecdistError("specdist.enable: already enabled on this pipeline (call specdist.disable(pipe) first)")
    if getattr(model, "is_cache_enabled", False):
        raise SpecdistError("specdist.enable: a diffusers cache is enabled on pipe.transformer "
                            "(call pipe.transformer.disable_cache() first)")
    adapter = adapter_for(model)
    attention = None
    if attention_backend is not None:
        try:
            attention = apply_attention_backend(model, adapter, attention_backend)
        except ConfigError as err:
            raise SpecdistError(f"specdist.enable: {err}") from None
    try:
        blocks = SpeculationHooks(model, adapter, cfg.probe_block, cfg.granularity, cfg.token_kv)
    except (ValueError, NotImplementedError) as err:
        raise SpecdistError(f"specdist.enable: {err}") from None
    if method == "speca" and cfg.uses_target and calibration is None:
        blocks.remove()
        raise SpecdistError("specdist.enable: speca with a quality target needs calibration= (see "
                            "specdist.calibrate.calibrate_pipeline), or set cache.tau0 for a threshold schedule")
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_PipelineHook(pipe, adapter, blocks, method, cfg, calibration), HOOK_NAME)
    registry.invalidate_child_registries_cache()
    return attention


def disable(pipe: Any) -> None:
    """Remove specdist's hooks from ``pipe.transformer`` and drop its state (no-op when not enabled)."""
    hook = _hook(pipe)
    if hook is None:
        return
    hook.reset_state(pipe.transformer)
    hook.finished = {}
    hook.blocks.remove()
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.remove_hook(HOOK_NAME, recurse=False)
    registry.invalidate_child_registries_cache()


@contextmanager
def enabled(pipe: Any, method: str = "speca", cache: CacheConfig | None = None,
            calibration: Calibration | None = None) -> Iterator[None]:
    """``with enabled(pipe): pipe(...)`` — :func:`enable` on entry, :func:`disable` on exit."""
    enable(pipe, method, cache, calibration)
    try:
        yield
    finally:
        disable(pipe)


def last_stats(pipe: Any) -> dict[str, CacheStats]:
    """Per cache context (``"cond"``, ``"uncond"``): what happened in the latest generation (the
    one in progress, else the last finished one). Read it before :func:`disable`, which drops it."""
    hook = _hook(pipe)
    if hook is None:
        raise SpecdistError("specdist.last_stats: specdist is not enabled on this pipeline")
    return hook.stats() or dict(hook.finished)
