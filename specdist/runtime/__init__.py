"""The distributed speculative runtime: a coordinator, worker pools (local threads, Ray actors,
torchrun ranks) and the parallel speculation rule. See :mod:`specdist.runtime.rule` for what is
committed and :mod:`specdist.runtime.coordinator` for how work is scheduled."""

from .config import BACKENDS, MODES, RuntimeConfig

__all__ = ["BACKENDS", "MODES", "RuntimeConfig"]
