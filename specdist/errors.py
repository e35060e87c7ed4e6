"""Errors that the CLI reports as one clear line (no traceback)."""

from __future__ import annotations


class SpecdistError(Exception):
    """Base class of every user-facing specdist error."""


class ConfigError(SpecdistError, ValueError):
    """An invalid configuration: names the key, the value and what is allowed."""


class UnsupportedError(SpecdistError, NotImplementedError):
    """A feature this model (or this part of it) does not support: names the model, the feature
    and, where there is one, what to use instead."""


class CheckpointError(SpecdistError, FileNotFoundError):
    """A missing or malformed model path: names the path and what was expected."""


def check_value(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise :class:`ConfigError` ``invalid value for 'key': value (allowed: ...)`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: {allowed})")
