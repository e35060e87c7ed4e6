"""Tapping transformer blocks through diffusers hooks (``ModelHook`` / ``HookRegistry``).

:class:`BlockTap` records what goes into and comes out of chosen blocks during a forward pass,
without rebinding any ``forward`` by hand: it registers a diffusers ``ModelHook`` on each block and
removes it again on :meth:`BlockTap.remove` (or when used as a context manager).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .base import ModelAdapter

_HOOK_NAME = "specdist_block_tap"


def _tensors(value: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(v for v in value if isinstance(v, torch.Tensor))
    return ()


class _TapHook(ModelHook):
    """Stores the tensor positional inputs and tensor outputs of one block call."""

    def __init__(self, record: dict[str, Any], key: int) -> None:
        super().__init__()
        self.record = record
        self.key = key

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        inputs = _tensors(args) + tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.record.setdefault("inputs", {})[self.key] = tuple(t.detach() for t in inputs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.record.setdefault("outputs", {})[self.key] = tuple(t.detach() for t in _tensors(output))
        return output


class BlockTap:
    """Record inputs and outputs of blocks ``indices`` (adapter order) of ``model``.

    Example::

        with BlockTap(model, adapter, [0, -1]) as tap:
            adapter.forward(model, latents, t, cond.kwargs, cond.extra)
        first_out = tap.outputs(0)[0]   # hidden states leaving block 0
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, indices: list[int]) -> None:
        self.blocks = adapter.blocks(model)
        n = len(self.blocks)
        self.indices = sorted({i % n for i in indices})
        self.record: dict[str, Any] = {}
        for i in self.indices:
            registry = HookRegistry.check_if_exists_or_initialize(self.blocks[i])
            registry.register_hook(_TapHook(self.record, i), _HOOK_NAME)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        self._model = model

    def inputs(self, index: int) -> tuple[torch.Tensor, ...]:
        """Tensor inputs of block ``index`` in the last forward."""
        return self.record["inputs"][index % len(self.blocks)]

    def outputs(self, index: int) -> tuple[torch.Tensor, ...]:
        """Tensor outputs of block ``index`` in the last forward."""
        return self.record["outputs"][index % len(self.blocks)]

    def remove(self) -> None:
        """Detach every hook this tap registered."""
        for i in self.indices:
            HookRegistry.check_if_exists_or_initialize(self.blocks[i]).remove_hook(_HOOK_NAME)
        HookRegistry.check_if_exists_or_initialize(self._model).invalidate_child_registries_cache()

    def __enter__(self) -> "BlockTap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
