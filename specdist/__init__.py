"""specdist: speculative feature caching and a distributed runtime for diffusion transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import GenerateConfig, load_config
from .errors import CheckpointError, ConfigError, SpecdistError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from .engine.config import CacheConfig

__version__ = "0.1.0"


# The pipeline drop-in imports torch and diffusers: load it on first use so `import specdist` stays light.
def enable(pipe: Any, method: str = "speca", cache: "CacheConfig | None" = None, calibration: Any = None,
           attention_backend: str | None = None) -> dict[str, Any] | None:
    """Speculative caching on a stock diffusers pipeline (:func:`specdist.engine.pipeline.enable`).

    ``calibration``: for ``speca`` to a quality target (the default), the transformer's calibration
    (:func:`specdist.calibrate.calibrate_pipeline`); ``attention_backend`` (e.g. ``"auto"``) is set
    on its transformer as ``specdist generate`` does."""
    from .engine.pipeline import enable as _enable

    return _enable(pipe, method, cache, calibration=calibration, attention_backend=attention_backend)


def disable(pipe: Any) -> None:
    """Remove what :func:`enable` installed (:func:`specdist.engine.pipeline.disable`)."""
    from .engine.pipeline import disable as _disable

    _disable(pipe)


def enabled(pipe: Any, method: str = "speca", cache: "CacheConfig | None" = None,
            calibration: Any = None) -> "AbstractContextManager[None]":
    """``with specdist.enabled(pipe): pipe(...)`` (:func:`specdist.engine.pipeline.enabled`)."""
    from .engine.pipeline import enabled as _enabled

    return _enabled(pipe, method, cache, calibration)


__all__ = ["CheckpointError", "ConfigError", "GenerateConfig", "SpecdistError", "__version__", "disable", "enable",
           "enabled", "load_config"]
