"""diffusers hooks that let one model call either record features or speculate.

A :class:`SpeculationHooks` registers one ``ModelHook`` per transformer block (through
``HookRegistry``, no forward is rebound by hand) and, for block-level caching, one per residual
branch submodule of each block (:class:`~specdist.models.base.BranchSpec`). What the hooks do
during a model call is set explicitly by the engine before the call with
:meth:`SpeculationHooks.plan` and read back after it — there is no hidden counter and no global
state.

Granularity ``probe`` / ``output`` (features: the probe block's input and output streams and the
last block's output):

* ``record``: every block runs; the hooks keep the probe block's input and output streams (and
  the last block's output when the probe is not the last block).
* ``speculate``: blocks are skipped (a skipped block returns its input streams unchanged, costing
  nothing). With verification on, the probe block runs for real on the *forecast* of its input,
  and its true output is kept for comparison with the forecast of its output; when the probe is
  the last block, that true output goes on to the output head. Without verification (fixed-interval
  methods) even the probe is skipped and the last block returns the forecast of its output.

Granularity ``block`` (features: every cached block's residual branches *before* their gate,
plus, when the memory budget leaves the first ``start`` blocks uncached, the input streams of
block ``start``):

* ``measure``: a full call that records only the bytes per row of each block's branches and input
  streams (the engine sizes the cached region with them before keeping anything).
* ``record``: a full call; the branches of blocks ``>= start`` (and block ``start``'s input) are kept.
* ``speculate``: blocks ``< start`` are skipped and block ``start`` gets the forecast of its input;
  every later block runs its own forward — norms and the *current* step's modulation — while each
  branch submodule returns its forecast instead of computing, so the forecast is re-gated for free.
  Submodules that only feed a forecast branch return zero-width tensors (nothing computed). With
  verification on, the probe block's branches run for real and are kept for comparison with their
  forecasts.

Granularity ``token`` (:mod:`~specdist.engine.tokens`; the same features as ``block``, plus, with
``cache.token_kv: forecast``, each attention's key and value projections): ``measure`` and
``record`` as at block level. ``speculate`` with a :class:`~specdist.engine.tokens.TokenPlan`:
each block hook records the lengths of its token streams; specdiff's self-speculation block runs
for real and scores the tokens; every later block runs its norms and modulation on every token
while each branch submodule runs on the selected tokens only (the adapter's
:class:`~specdist.models.base.TokenSpec` says how: row-wise, or attention with queries from the
selected tokens) and scatters them into its forecast; a key/value projection hook projects the
selected rows and scatters them into the forecast keys/values.

Features are tuples of tensors, each ``[rows, ...]``.
"""

from __future__ import annotations

import threading
import time as time_module
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..models.base import ModelAdapter, StreamSpec, TokenBranch, gather_rows
from .config import GRANULARITIES
from .tokens import TokenPlan, mix_reuse, run_branch, scatter_rows, split_streams, token_scores

HOOK_NAME = "specdist_speculation"


@dataclass
class CallPlan:
    """Instructions for the blocks during one model call, and what they leave behind."""

    mode: str = "off"  # "off" | "measure" | "record" | "speculate"
    verify: bool = True
    start: int = 0  # block level: first block whose branches are cached
    forecast: Mapping[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    recorded: MutableMapping[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # measure: bytes per row of each feature
    itemsize: int = 4  # measure: bytes per element of the measured features (their compute dtype)
    tokens: TokenPlan | None = None  # token level, speculate: the token levels of this call
    keep_forecast: torch.Tensor | None = None  # block level, speculate with verify: bool per model row whose
    # probe block returns its forecast (a waived check sharing the verified call; its true branches are still
    # computed, and ignored), so the row's output is what a call without the probe gives it


def _tensors(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, tuple) else (output,)


def _row_bytes(tensors: tuple[torch.Tensor, ...]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors)


def region_bytes(sizes: dict[str, int], start: int) -> int:
    """Bytes per row of the block-level features cached from block ``start`` on: its input
    streams (when ``start > 0``) and every later block's branches, from a ``measure`` call's
    ``sizes`` (keys ``input.<k>`` and ``branch.<k>.<name>``)."""
    entry = sizes[f"input.{start}"] if start > 0 else 0
    return entry + sum(v for k, v in sizes.items() if k.startswith("branch.") and int(k.split(".")[1]) >= start)


def branch_key(block: int, name: str) -> str:
    """Feature name of branch submodule ``name`` of block ``block``."""
    return f"branch.{block}.{name}"


class _BlockHook(ModelHook):
    def __init__(self, owner: "SpeculationHooks", index: int, streams: StreamSpec) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.streams = streams

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.owner.current
        run = self.fn_ref.original_forward
        if plan.mode == "off":
            return run(*args, **kwargs)
        if self.owner.block_level:
            return self._block_level(plan, run, args, kwargs)
        probe, last = self.owner.probe, self.owner.last
        if plan.mode == "record":
            if self.index == probe:
                plan.recorded["probe_in"] = self.streams.read(args, kwargs)
            output = run(*args, **kwargs)
            if self.index == probe:
                plan.recorded["probe_out"] = self.streams.unpack(output)
            if self.index == last:
                plan.recorded["last_out"] = self.streams.unpack(output)
            return output
        # speculate
        if plan.verify and self.index == probe:
            args, kwargs = self.streams.replace(args, kwargs, plan.forecast["probe_in"])
            output = run(*args, **kwargs)
            plan.recorded["probe_out"] = self.streams.unpack(output)
            if self.index == last:
                return output
        if self.index == last:
            return self.streams.pack(plan.forecast["last_out"])
        return self.streams.pack(self.streams.read(args, kwargs))

    def _block_level(self, plan: CallPlan, run: Any, args: tuple, kwargs: dict) -> Any:
        if plan.mode == "speculate" and plan.tokens is not None and self.index >= plan.start:
            return self._token_level(plan, run, args, kwargs)
        if plan.mode == "measure":
            plan.sizes[f"input.{self.index}"] = _row_bytes(self.streams.read(args, kwargs))
        elif plan.mode == "record":
            if plan.start > 0 and self.index == plan.start:
                plan.recorded["entry_in"] = self.streams.read(args, kwargs)
        elif self.index < plan.start:  # speculate: the uncached prefix costs nothing
            return self.streams.pack(self.streams.read(args, kwargs))
        elif plan.start > 0 and self.index == plan.start:
            args, kwargs = self.streams.replace(args, kwargs, plan.forecast["entry_in"])
        return run(*args, **kwargs)


    def _token_level(self, plan: CallPlan, run: Any, args: tuple, kwargs: dict) -> Any:
        tokens = plan.tokens
        if plan.start > 0 and self.index == plan.start:
            args, kwargs = self.streams.replace(args, kwargs, plan.forecast["entry_in"])
        spec = self.owner.token_specs[self.index]
        tokens.lengths = {name: t.shape[1] for name, t in zip(spec.streams, self.streams.read(args, kwargs))}
        context = None
        if spec.context is not None:
            name, pos = spec.context
            context = kwargs.get(name, args[pos] if len(args) > pos else None)
        tokens.context_tokens = 0 if context is None else context.shape[1]
        output = run(*args, **kwargs)
        if self.index == tokens.spec_block:  # self-speculation: score every token from this block
            began = time_module.perf_counter()
            true, pred = {}, {}
            for name in self.owner.branches[self.index]:
                key, branch = branch_key(self.index, name), spec.branches[name]
                for target, values in ((true, plan.recorded.pop(key)), (pred, plan.forecast[key])):
                    for stream, parts in split_streams(values, branch, tokens.lengths).items():
                        target.setdefault(stream, []).extend(parts)
            tokens.select({s: token_scores(true[s], pred[s], tokens.age.get(s), tokens.history) for s in true})
            tokens.select_seconds += time_module.perf_counter() - began
        return output


class _BranchHook(ModelHook):
    """On a residual-branch submodule: record its output, or return its forecast."""

    def __init__(self, owner: "SpeculationHooks", block: int, name: str, token: TokenBranch | None = None) -> None:
        super().__init__()
        self.owner, self.block, self.key = owner, block, branch_key(block, name)
        self.token = token
        self.is_tuple = False

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.owner.current
        run = self.fn_ref.original_forward
        if plan.mode == "off" or self.block < plan.start:
            return run(*args, **kwargs)
        if plan.mode == "speculate" and plan.tokens is not None:
            if self.block == plan.tokens.spec_block:  # runs for real; the block hook scores its tokens
                output = run(*args, **kwargs)
                plan.recorded[self.key] = _tensors(output)
                return output
            forecast = plan.forecast[self.key]
            if plan.tokens.reuse:
                forecast = mix_reuse(forecast, plan.forecast.base(self.key), self.token, plan.tokens)
            output = run_branch(self.token, self.owner.adapter, module, run, args, kwargs, plan.tokens, forecast,
                                self.is_tuple)
            if plan.verify and self.block == self.owner.probe:  # speca at token level: check the refreshed rows
                streams = self.token.streams
                plan.recorded[self.key] = tuple(gather_rows(t, plan.tokens.stream_index(s))
                                                for t, s in zip(_tensors(output), streams))
                plan.recorded[f"forecast:{self.key}"] = tuple(gather_rows(f, plan.tokens.stream_index(s))
                                                              for f, s in zip(forecast, streams))
            return output
        if plan.mode == "speculate" and not (plan.verify and self.block == self.owner.probe):
            forecast = plan.forecast[self.key]
            return tuple(forecast) if self.is_tuple else forecast[0]
        output = run(*args, **kwargs)
        self.is_tuple = isinstance(output, tuple)
        if plan.mode == "measure":
            plan.sizes[self.key] = _row_bytes(_tensors(output))
            plan.itemsize = _tensors(output)[0].element_size()
        else:
            plan.recorded[self.key] = _tensors(output)
        if plan.mode == "speculate" and plan.keep_forecast is not None:
            keep = plan.keep_forecast
            mixed = tuple(torch.where(keep.to(t.device).view(-1, *[1] * (t.ndim - 1)), f, t)
                          for t, f in zip(_tensors(output), plan.forecast[self.key]))
            return mixed if self.is_tuple else mixed[0]
        return output


class _KVHook(ModelHook):
    """Token level, ``token_kv: forecast``: on a key or value projection of an attention. Full
    steps record its output (a cached feature like a branch); at a partial block only the selected
    tokens' rows are projected and scattered into the forecast keys/values of every token."""

    def __init__(self, owner: "SpeculationHooks", block: int, path: str, stream: str) -> None:
        super().__init__()
        self.owner, self.block, self.key, self.stream = owner, block, branch_key(block, path), stream

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.owner.current
        run = self.fn_ref.original_forward
        if plan.mode == "off" or self.block < plan.start:
            return run(*args, **kwargs)
        if plan.mode == "speculate":
            if plan.tokens is None or self.block == plan.tokens.spec_block:
                return run(*args, **kwargs)
            idx = plan.tokens.stream_index(self.stream)
            x = args[0] if args else kwargs["input"]
            return scatter_rows(plan.forecast[self.key][0], idx, run(gather_rows(x, idx)))
        output = run(*args, **kwargs)
        if plan.mode == "measure":
            plan.sizes[self.key] = _row_bytes((output,))
        else:
            plan.recorded[self.key] = (output,)
        return output


class _SkipHook(ModelHook):
    """On a submodule that only feeds a forecast branch: skip it on forecast steps.

    It returns tensors of its usual shape but *zero width* in the last dimension: the consumer (a
    concatenation feeding the forecast ``proj_out``) never reads them, so nothing is computed or
    materialised. The shapes come from the last computed call with the same input shapes.
    """

    def __init__(self, owner: "SpeculationHooks", block: int, token: TokenBranch | None = None) -> None:
        super().__init__()
        self.owner, self.block = owner, block
        self.token = token
        self.shapes: dict[tuple, tuple] = {}  # input signature -> (output shapes[1:-1], dtypes, is_tuple)

    @staticmethod
    def _tensors_in(args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = self.owner.current
        run = self.fn_ref.original_forward
        if plan.mode == "speculate" and plan.tokens is not None and self.block >= plan.start:
            if self.block == plan.tokens.spec_block:
                return run(*args, **kwargs)
            return run_branch(self.token, self.owner.adapter, module, run, args, kwargs, plan.tokens, None, False)
        inputs = self._tensors_in(args, kwargs)
        sig = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
        known = self.shapes.get(sig)
        if (plan.mode == "speculate" and self.block >= plan.start and known is not None
                and not (plan.verify and self.block == self.owner.probe)):
            shapes, dtypes, tuple_out = known
            rows = inputs[0].shape[0]
            out = tuple(inputs[0].new_empty((rows, *shape, 0), dtype=dtype) for shape, dtype in zip(shapes, dtypes))
            return out if tuple_out else out[0]
        output = run(*args, **kwargs)
        if plan.mode != "speculate":
            outs = _tensors(output)
            self.shapes[sig] = (tuple(tuple(t.shape[1:-1]) for t in outs), tuple(t.dtype for t in outs),
                                isinstance(output, tuple))
        return output


class SpeculationHooks:
    """Install speculation hooks on every block of ``model`` (remove with :meth:`remove`).

    Raises:
        ValueError: ``probe_block`` out of range, an unknown granularity, or (block level) a
            branch submodule the adapter names that the block does not have.
        UnsupportedError (a NotImplementedError): block-level caching on a model whose adapter has no branch spec.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, probe_block: int = -1,
                 granularity: str = "probe", token_kv: str = "forecast") -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r} (allowed: {', '.join(GRANULARITIES)})")
        self.model = model
        blocks = adapter.blocks(model)
        n = len(blocks)
        if not -n <= probe_block < n:
            raise ValueError(f"probe_block {probe_block} out of range for {n} blocks")
        self.probe = probe_block % n
        self.last = n - 1
        self.block_level = granularity in ("block", "token")
        self.token_level = granularity == "token"
        self.adapter = adapter
        self.token_specs = [adapter.token_spec(model, i) for i in range(n)] if self.token_level else []
        self._plans = threading.local()  # one plan per calling thread: the hooks are reentrant
        self._hooked: list[nn.Module] = []
        self.branches: list[tuple[str, ...]] = []
        self.kv: list[tuple[str, ...]] = []  # token level, token_kv forecast: cached key/value projections
        try:
            for i, block in enumerate(blocks):
                self._register(block, _BlockHook(self, i, adapter.stream_spec(model, i)))
                if not self.block_level:
                    continue
                spec = adapter.branch_spec(model, i)
                for name in (*spec.cached, *spec.skipped):
                    if not isinstance(getattr(block, name, None), nn.Module):
                        raise ValueError(f"{adapter.model_class} block {i} has no submodule {name!r} "
                                         f"(branch spec {spec})")
                tokens = self.token_specs[i].branches if self.token_level else {}
                missing = [name for name in (*spec.cached, *spec.skipped) if self.token_level and name not in tokens]
                if missing:
                    raise ValueError(f"{adapter.model_class} block {i}: no token-level rule for {missing}")
                for name in spec.cached:
                    self._register(getattr(block, name), _BranchHook(self, i, name, tokens.get(name)))
                for name in spec.skipped:
                    self._register(getattr(block, name), _SkipHook(self, i, tokens.get(name)))
                self.branches.append(spec.cached)
                kv = self.token_specs[i].kv if self.token_level and token_kv == "forecast" else {}
                for path, stream in kv.items():
                    sub = block.get_submodule(path)
                    self._register(sub, _KVHook(self, i, path, stream))
                self.kv.append(tuple(kv))
        except BaseException:  # a refused model keeps no hook
            self.remove()
            raise
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    def _register(self, module: nn.Module, hook: ModelHook) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        self._hooked.append(module)

    def feature_names(self, start: int = 0) -> tuple[str, ...]:
        """Features recorded on full steps (and forecast on speculative ones); ``start``: first
        cached block (block level)."""
        if self.block_level:
            entry = ("entry_in",) if start > 0 else ()
            return entry + tuple(branch_key(k, name) for k in range(start, self.last + 1)
                                 for name in (*self.branches[k], *self.kv[k]))
        return ("probe_in", "last_out") if self.probe == self.last else ("probe_in", "probe_out", "last_out")

    def verified_features(self) -> tuple[str, ...]:
        """Features whose forecast is compared with the probe's true computation."""
        if self.block_level:
            return tuple(branch_key(self.probe, name) for name in self.branches[self.probe])
        return ("probe_out",)

    def region_bytes(self, sizes: dict[str, int], start: int) -> int:
        """Bytes per row of the features cached when the region starts at block ``start``
        (from a ``measure`` call's ``sizes``)."""
        return region_bytes(sizes, start)

    @property
    def current(self) -> CallPlan:
        """The calling thread's plan (``off`` until :meth:`plan` is called on this thread)."""
        plan = getattr(self._plans, "plan", None)
        if plan is None:
            plan = self._plans.plan = CallPlan()
        return plan

    def plan(self, mode: str, verify: bool = True, forecast: Mapping | None = None, start: int = 0,
             recorded: MutableMapping | None = None, tokens: TokenPlan | None = None,
             keep_forecast: torch.Tensor | None = None) -> CallPlan:
        """Set what this thread's next model call does; returns the plan the hooks will fill.

        ``forecast`` and ``recorded`` may be any mappings: the block level passes a lazy
        :class:`~specdist.engine.forecast.ForecastView` (each block's branches forecast when that
        block reads them) and a :class:`~specdist.engine.forecast.RecordSink` (each recorded branch
        goes into the cache at once), so a call never holds every block's features at the same time."""
        self._plans.plan = CallPlan(mode=mode, verify=verify, start=start,
                                    forecast={} if forecast is None else forecast,
                                    recorded={} if recorded is None else recorded, tokens=tokens,
                                    keep_forecast=keep_forecast)
        return self._plans.plan

    def remove(self) -> None:
        """Detach every hook."""
        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        self._hooked = []
        self._plans = threading.local()
