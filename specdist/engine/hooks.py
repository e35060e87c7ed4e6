"""diffusers hooks that let one model call either record features or speculate.

A :class:`SpeculationHooks` registers one ``ModelHook`` per transformer block (through
``HookRegistry``, no forward is rebound by hand). What the hooks do during a model call is set
explicitly by the engine before the call with :meth:`SpeculationHooks.plan` and read back after it
— there is no hidden counter and no global state:

* ``record``: every block runs; the hooks keep the probe block's input and output streams (and
  the last block's output when the probe is not the last block). These are the features the
  Taylor cache is refreshed with on full steps.
* ``speculate``: blocks are skipped (a skipped block returns its input streams unchanged, costing
  nothing). With verification on, the probe block runs for real on the *forecast* of its input,
  and its true output is kept for comparison with the forecast of its output; when the probe is
  the last block, that true output goes on to the output head. Without verification (fixed-interval
  methods) even the probe is skipped and the last block returns the forecast of its output.

Features are tuples of stream tensors, each ``[rows, tokens, dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..models.base import ModelAdapter, StreamSpec

HOOK_NAME = "specdist_speculation"


@dataclass
class CallPlan:
    """Instructions for the blocks during one model call, and what they leave behind."""

    mode: str = "off"  # "off" | "record" | "speculate"
    verify: bool = True
    forecast: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # probe_in / probe_out / last_out
    recorded: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)


class _BlockHook(ModelHook):
    def __init__(self, owner: "SpeculationHooks", index: int, streams: StreamSpec) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.streams = streams

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan, probe, last = self.owner.current, self.owner.probe, self.owner.last
        run = self.fn_ref.original_forward
        if plan.mode == "off":
            return run(*args, **kwargs)
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


class SpeculationHooks:
    """Install speculation hooks on every block of ``model`` (remove with :meth:`remove`)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, probe_block: int = -1) -> None:
        self.model = model
        blocks = adapter.blocks(model)
        n = len(blocks)
        if not -n <= probe_block < n:
            raise ValueError(f"probe_block {probe_block} out of range for {n} blocks")
        self.probe = probe_block % n
        self.last = n - 1
        self.current = CallPlan()
        self._blocks = blocks
        for i, block in enumerate(blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                _BlockHook(self, i, adapter.stream_spec(model, i)), HOOK_NAME)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Features recorded on full steps (and forecast on speculative ones)."""
        return ("probe_in", "last_out") if self.probe == self.last else ("probe_in", "probe_out", "last_out")

    def plan(self, mode: str, verify: bool = True, forecast: dict | None = None) -> CallPlan:
        """Set what the next model call does; returns the plan the hooks will fill."""
        self.current = CallPlan(mode=mode, verify=verify, forecast=forecast or {})
        return self.current

    def remove(self) -> None:
        """Detach every hook."""
        for block in self._blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(HOOK_NAME)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        self.current = CallPlan()
