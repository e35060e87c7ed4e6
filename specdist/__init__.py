"""specdist: speculative feature caching and a distributed runtime for diffusion transformers."""

from .config import GenerateConfig, load_config
from .errors import CheckpointError, ConfigError, SpecdistError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "GenerateConfig", "SpecdistError", "__version__", "load_config"]
