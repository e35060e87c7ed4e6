"""Typed, validated configuration of a specdist job, loaded from YAML with ``--set`` overrides.

A config file maps onto :class:`GenerateConfig` (nested sections map onto nested dataclasses).
Every field is checked when the config is built: an unknown key or a bad value raises
:class:`~specdist.errors.ConfigError` naming the dotted key, the value and what is allowed.

Example::

    cfg = load_config("configs/default.yaml", overrides=["steps=20", "output.fps=12"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .engine.config import CACHE_METHODS, PEER_METHODS, CacheConfig, ExactConfig, PeerConfig
from .errors import ConfigError
from .runtime.config import LATENCY_METHODS, PicardConfig, RuntimeConfig, check_latency_cache
from .errors import check_value as _check
from .attention import ATTENTION_BACKENDS
from .memory import OFFLOADS

METHODS = ("full", *CACHE_METHODS, *PEER_METHODS, "exact", "picard")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class OutputConfig:
    """Where and how results are written."""

    dir: str = "outputs/latest"
    """Output directory (created; media and ``report.json`` go here)."""
    fps: int = 8
    """Frames per second of written videos."""
    save_latents: bool = True
    """Also write the final latents as ``latents.safetensors`` (for exact comparisons)."""

    def validate(self, prefix: str) -> None:
        _check(self.fps >= 1, f"{prefix}fps", self.fps, "an integer >= 1")


@dataclass(kw_only=True)
class VaeConfig:
    """Decoding with a diffusers pipeline's VAE (see :mod:`specdist.memory`)."""

    tiling: bool | str = "auto"
    """``vae.enable_tiling()``: decode in overlapping spatial tiles. ``auto``: on when the latents are
    larger than the VAE's own tile (HunyuanVideo's VAE: 256×256 pixels, so 544p and 720p tile);
    ``true`` on a model without a VAE (the zoo, a bare transformer) is refused."""
    slicing: bool | str = "auto"
    """``vae.enable_slicing()``: decode one sample at a time. ``auto``: on when a large (tiled)
    output has more than one sample."""

    def validate(self, prefix: str) -> None:
        for key in ("tiling", "slicing"):
            value = getattr(self, key)
            _check(value in (True, False) or value == "auto", f"{prefix}{key}", value, "auto, true or false")


@dataclass(kw_only=True)
class GenerateConfig:
    """One generation job (``specdist generate``)."""

    model: str = "hunyuan-shapes-video"
    """A zoo name (see ``specdist models``) or a local diffusers directory."""
    method: str = "full"
    """``full`` (every step computes the whole model), ours: ``fora``, ``taylorseer``, ``speca``, a
    diffusers built-in cache as a peer: ``diffusers-fbcache``, ``diffusers-taylorseer``,
    ``diffusers-magcache``, ``diffusers-pab`` (see :mod:`specdist.engine.config`), or ``exact``:
    exact speculative sampling of a stochastic sampler (``exact:`` section; needs e.g.
    ``scheduler: DDPMScheduler``; see :mod:`specdist.engine.exact`), or ``picard``: parallel-in-time
    Picard iteration on a worker pool (latency mode; ``picard:`` section; see
    :mod:`specdist.runtime.picard`)."""
    steps: int = 50
    """Denoising steps."""
    seed: int = 0
    """Seed of the initial noise (sample ``i`` uses its own generator seeded ``seed + i``)."""
    num_samples: int = 4
    """Samples to generate."""
    batch_size: int = 0
    """Samples per model call; 0 means all ``num_samples`` in one batch."""
    prompt: list[str] = field(default_factory=list)
    """Prompts for text-conditioned models (cycled over samples); empty means the model's defaults."""
    class_labels: list[str] = field(default_factory=list)
    """Class names or ids for class-conditional models (cycled); empty means the model's defaults."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; ``null`` means the model's default."""
    height: int | None = None
    """Output height in pixels; ``null`` means the model's default."""
    width: int | None = None
    """Output width in pixels; ``null`` means the model's default."""
    frames: int | None = None
    """Video frames; ``null`` means the model's default (ignored for image models)."""
    scheduler: str | None = None
    """A diffusers scheduler class name that replaces the model's sampler, built from the model's own
    scheduler config (e.g. ``DDPMScheduler`` for a stochastic sampler); ``null`` keeps the saved
    one. A bare transformer directory without a saved ``scheduler/scheduler_config.json`` needs it."""
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    """Scheduler config keys that override the model's (e.g. ``{prediction_type: v_prediction}``
    or ``{eta: 0.5}``-like keys of the class); unknown keys are refused naming the allowed ones."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``."""
    dtype: str = "auto"
    """Compute dtype of the model: ``auto`` (``bfloat16`` for diffusers checkpoints on CUDA,
    ``float32`` for the zoo and on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    attention_backend: str = "auto"
    """diffusers attention backend of the transformer (:mod:`specdist.attention`): ``auto`` (the
    best exact one usable here: flash3, flash, xformers, native; masked models such as HunyuanVideo:
    flash_varlen, native), ``native`` (PyTorch SDPA), ``flash``, ``flash_varlen``, ``flash3``,
    ``sage``, ``sage_varlen`` (lossy INT8) or ``xformers``. One that is not installed or cannot run
    this model on this device is refused in one line. Workers set it the same way."""
    offload: str = "none"
    """Weights placement for GPUs smaller than the model (CUDA only; see :mod:`specdist.memory`):
    ``none``; ``model`` (a pipeline's text encoders and VAE on the device only while they run);
    ``group`` (diffusers' group offloading: every component's weights in CPU memory, streamed in
    block by block)."""
    vae: VaeConfig = field(default_factory=VaeConfig)
    reference: bool = True
    """For a caching method, also run ``full`` from the same seeds and report PSNR/SSIM/rel-L2
    against it (doubles the cost; the honest way to read a speedup)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    exact: ExactConfig = field(default_factory=ExactConfig)
    picard: PicardConfig = field(default_factory=PicardConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self, prefix: str = "") -> None:
        _check(bool(self.model), f"{prefix}model", self.model, "a zoo model name or a local path")
        _check(self.method in METHODS, f"{prefix}method", self.method, f"one of {list(METHODS)}")
        _check(self.steps >= 1, f"{prefix}steps", self.steps, "an integer >= 1")
        _check(self.num_samples >= 1, f"{prefix}num_samples", self.num_samples, "an integer >= 1")
        _check(self.batch_size >= 0, f"{prefix}batch_size", self.batch_size, "an integer >= 0")
        _check(self.device in DEVICES, f"{prefix}device", self.device, f"one of {list(DEVICES)}")
        _check(self.dtype in DTYPES, f"{prefix}dtype", self.dtype, f"one of {list(DTYPES)}")
        if self.guidance_scale is not None:
            _check(self.guidance_scale >= 1.0, f"{prefix}guidance_scale", self.guidance_scale, "a number >= 1.0 or null")
        for key in ("height", "width", "frames"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"{prefix}{key}", value, "an integer >= 1 or null")
        _check(self.attention_backend in ATTENTION_BACKENDS, f"{prefix}attention_backend", self.attention_backend,
               f"one of {list(ATTENTION_BACKENDS)}")
        _check(self.offload in OFFLOADS, f"{prefix}offload", self.offload, f"one of {list(OFFLOADS)}")
        self.vae.validate(f"{prefix}vae.")
        self.cache.validate(f"{prefix}cache.")
        self.cache.validate_for(self.method, f"{prefix}cache.")
        stored = self.cache.storage_dtype != "compute" or self.cache.host_offload
        key = "cache.storage_dtype" if self.cache.storage_dtype != "compute" else "cache.host_offload"
        value = getattr(self.cache, key.split(".")[1])
        if stored and self.method not in CACHE_METHODS:
            _check(False, f"{prefix}{key}", value, f"the default with method={self.method!r} (it applies to "
                   f"{', '.join(CACHE_METHODS)}; the peers have peer.taylorseer_factors_dtype)")
        if stored and self.runtime.distributed and self.runtime.mode == "latency":
            _check(False, f"{prefix}{key}", value, "the default with runtime.mode=latency (the engine's caches: "
                   "runtime.backend=none or runtime.mode=throughput)")
        self.peer.validate(f"{prefix}peer.")
        self.exact.validate(f"{prefix}exact.")
        self._validate_exact(prefix)
        self.picard.validate(f"{prefix}picard.")
        self._validate_picard(prefix)
        self.output.validate(f"{prefix}output.")
        self.runtime.validate(f"{prefix}runtime.")
        if self.runtime.distributed and self.runtime.mode == "latency" and self.method != "exact":
            _check(self.method in LATENCY_METHODS, f"{prefix}method", self.method,
                   f"one of {list(LATENCY_METHODS)} with runtime.mode=latency (other methods: runtime.mode=throughput "
                   f"or runtime.backend=none)")
            if self.method == "speca":
                check_latency_cache(self.cache, f"{prefix}cache.")

    def _own_section(self, prefix: str, method: str, default: Any) -> bool:
        """A method with its own section (``exact:``, ``picard:``): refuse that section's changed fields
        with any other method; with this one, refuse ``cache.*`` and ``peer.*`` knobs (naming the
        section's own). Returns whether ``method`` is the job's."""
        section = getattr(self, method)
        if self.method != method:
            _refuse_changed(section, default, f"{prefix}{method}.", f"the default with method={self.method!r} "
                            f"(it applies to method={method})")
            return False
        knobs = ", ".join(f"{method}.{f.name}" for f in dataclasses.fields(section))
        _refuse_changed(self.cache, CacheConfig(), f"{prefix}cache.", f"the default with method={method} (its knobs "
                        f"are {knobs})")
        _refuse_changed(self.peer, PeerConfig(), f"{prefix}peer.", f"the default with method={method}")
        return True

    def _validate_picard(self, prefix: str) -> None:
        """``picard.*`` only with method=picard; with it, no ``cache.*``/``peer.*`` knob, a worker pool
        in latency mode."""
        if not self._own_section(prefix, "picard", PicardConfig()):
            return
        _check(self.runtime.backend != "none", f"{prefix}runtime.backend", self.runtime.backend,
               "local, ray or torchrun with method=picard (it refines a window of states on a worker pool; "
               "runtime.workers=1 runs it one call at a time)")
        _check(self.runtime.mode == "latency", f"{prefix}runtime.mode", self.runtime.mode,
               "latency with method=picard (the workers compute one generation's window of states)")

    def _validate_exact(self, prefix: str) -> None:
        """``exact.*`` only with method=exact; with it, no ``cache.*``/``peer.*`` knob and no worker pool."""
        if not self._own_section(prefix, "exact", ExactConfig()):
            return
        _check(self.runtime.backend in ("none", "local"), f"{prefix}runtime.backend", self.runtime.backend,
               "none or local with method=exact (none: one batched verification call per round in this process; "
               "local: the round's states spread over runtime.workers reference workers; ray and torchrun are "
               "not wired for exact mode yet)")
        _check(self.runtime.mode == "latency", f"{prefix}runtime.mode", self.runtime.mode,
               "latency with method=exact (the workers verify a round's drafted states)")

    @property
    def effective_batch_size(self) -> int:
        """Samples per model call."""
        return self.batch_size or self.num_samples


def _refuse_changed(section: Any, default: Any, prefix: str, allowed: str) -> None:
    """Raise a ConfigError naming the first field of ``section`` that differs from ``default``."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value != getattr(default, f.name):
            _check(False, f"{prefix}{f.name}", value, allowed)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to ``annotation`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first alternative that accepts the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: a mapping of {annotation.__name__} fields)")
        return build_config(annotation, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: a mapping)")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is list:
        if not isinstance(value, list):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: a list)")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: a list)")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: one of {list(args)})")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: true or false)")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: an integer)")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot ("1e9") as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: a number)")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: a string)")
        return str(value)
    return value


def build_config(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from ``data`` (no validation); errors name ``prefix + key``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (allowed: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], cls: type = GenerateConfig) -> Any:
    """Build and validate a config dataclass from a plain dict."""
    cfg = build_config(cls, data or {})
    cfg.validate()
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"invalid override {item!r} (allowed: key=value, e.g. steps=20 or output.fps=12)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid value for '{key}': {raw!r} is not valid YAML ({exc.problem})") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid override '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = GenerateConfig) -> Any:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    apply_overrides(data, list(overrides))
    return config_from_dict(data, cls)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (for reports)."""
    return dataclasses.asdict(cfg)
