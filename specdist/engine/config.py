"""Configuration of the feature-caching methods (``cache:`` section of a job config) and of the
diffusers built-in caches run as peers (``peer:`` section; see :mod:`specdist.engine.peers`).

Methods (``method`` key of the job):

* ``full`` — every step computes the whole model (the reference).
* ``fora`` — FORA: reuse the last full step's features for ``interval − 1`` steps, no checks.
* ``taylorseer`` — TaylorSeer: Taylor forecast of order ``order`` over full steps, full every
  ``interval`` steps, no checks.
* ``speca`` — SpeCa forecast-then-verify: Taylor forecast, a one-block probe checks each forecast;
  a rejected step is recomputed fully at the same state (true rollback), per sample. By default
  the check serves a quality target (``target_psnr_db``, calibrated per model,
  :mod:`specdist.engine.target`); ``tau0`` selects a raw threshold schedule
  ``τ(p) = max(τ0·β^p, τ_min)`` instead (expert override).
* ``specdiff`` — SpecDiff-style token-level self-speculation (:mod:`specdist.engine.tokens`): full
  every ``interval`` steps; at the steps between, the first cached block runs for real, its
  disagreement with the forecast (plus the forecast's own predicted change) scores every token,
  and the tokens are split into three levels — recomputed in every later block, Taylor-forecast,
  or reused — with the shares ``token_refresh`` / rest / ``token_reuse``. Always token level.
* ``exact`` — exact speculative sampling of a stochastic sampler (``exact:`` section,
  :class:`ExactConfig`; :mod:`specdist.engine.exact`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import check_value as _check

CACHE_METHODS = ("fora", "taylorseer", "speca", "specdiff")
PEER_METHODS = ("diffusers-fbcache", "diffusers-taylorseer", "diffusers-magcache", "diffusers-pab")
FACTOR_DTYPES = ("float32", "bfloat16", "float16")
TIME_UNITS = ("index", "timestep")
TOKEN_KV = ("forecast", "compute")
GRANULARITIES = ("probe", "output", "block", "token")
METRICS = ("rel_l1", "rel_l2", "cosine")
CALIBRATION_MODES = ("auto", "refresh")
DEFAULT_TARGET_PSNR_DB = 35.0
"""speca's quality target when neither ``cache.target_psnr_db`` nor ``cache.tau0`` is set."""
STORAGE_DTYPE_NAMES = ("compute", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
"""``cache.storage_dtype`` values (the same names as :data:`specdist.engine.forecast.STORAGE_DTYPES`)."""


@dataclass(kw_only=True)
class CacheConfig:
    """Knobs of the caching methods; each is used by the methods named in its doc."""

    order: int = 2
    """Taylor order m (taylorseer, speca); fora always uses 0 (reuse)."""
    extrapolation_ratio: float = 2.0
    """taylorseer, speca with ``order >= 2``: a forecast more than this many times the gap between the
    last two full steps beyond the last one falls back to order 1 (the noise of the higher terms
    grows with (distance / gap)²; :mod:`specdist.engine.forecast`). 0: TaylorSeer's plain
    expansion at every distance."""
    time: str = "index"
    """Distance unit of the Taylor expansion: ``index`` (step index, as the public code) or
    ``timestep`` (the scheduler's own time t / num_train_timesteps, i.e. sigma for flow matching)."""
    interval: int = 3
    """fora, taylorseer: one full step every ``interval`` steps."""
    granularity: str = "block"
    """What is cached and forecast. ``probe``: the probe block's input and the last block's output
    (video and text streams); a speculative step runs embeddings, the probe block (speca) and the
    head. ``output`` ("lite"): the model output itself is forecast (one tensor per sample); for fora
    and taylorseer a speculative step runs no model at all; speca still caches the probe features
    and runs the probe to verify, but accepts the forecast output. ``block``: every block's
    residual branches (attention and MLP outputs before their gate) are cached; a speculative
    step runs each block's norms and modulation for the current step and re-gates the forecast
    branches with them (speca: the probe block's branches run for real and verify). The first full
    step measures the branch sizes; when ``max_cache_bytes`` cannot hold every block, the order is
    kept and the first blocks are left uncached (forecast as one input stream of the first cached
    block), then the order is lowered. ``token`` (taylorseer, speca with ``tau0``; specdiff always):
    as ``block``, but at the steps between full steps a share of the tokens (``token_refresh``) runs
    through every cached block's branches for real, the others are forecast
    (:mod:`specdist.engine.tokens`); speca checks the probe block's refreshed rows."""
    token_refresh: float = 0.25
    """``granularity: token`` (taylorseer, speca) and specdiff: share of each token stream (video,
    text) recomputed in every cached block at a step between full steps; the other tokens are
    forecast. taylorseer and speca refresh a rotating, spatially spread subset (ToCa-style fixed
    schedule); specdiff the highest-scored tokens. 1 recomputes everything (the full step, bit for bit); 0 none (the
    block-level forecast, bit for bit)."""
    token_reuse: float = 0.0
    """specdiff: share of each token stream (the lowest-scored tokens) whose branches reuse their
    last full step's value instead of the Taylor forecast; at most ``1 − token_refresh``. Default 0:
    on both tuning models (dit-shapes, hunyuan-shapes-video; 2 samples, 50 steps, interval 4) a
    reuse share of 0.1 cost 2.8 / 3.2 dB worst-sample PSNR for no FLOPs saved (the forecast costs
    O(tokens × width), like reuse)."""
    token_history: float = 0.5
    """specdiff: weight of the history term of a token's score (steps since the token was last
    computed) next to the self-speculative term (the first cached block's relative disagreement
    between its forecast and its real output at this step, divided by its mean over the tokens).
    0.5 measured best of {0, 0.5, 2} on dit-shapes (worst 20.1 / 24.1 / 20.8 dB) and near best on
    hunyuan-shapes-video (31.4 / 32.6 / 33.0 dB)."""
    token_kv: str = "forecast"
    """``granularity: token`` (taylorseer, speca) and specdiff: keys and values of the tokens that are not
    recomputed. ``forecast``: cached and Taylor-forecast like the branches (every key/value
    projection runs on the selected rows only; the cache holds two more tensors per attention);
    ``compute``: projected from the block's current input for every token (exact for its input,
    no extra cache, costs two projections of every token per block)."""
    probe_block: int = -1
    """speca: the block run for real to verify a forecast (negative counts from the end)."""
    metric: str = "rel_l2"
    """speca: forecast error: ``rel_l1`` (SpeCa code), ``rel_l2`` (SpeCa paper) or ``cosine``."""
    target_psnr_db: float | None = None
    """speca: the quality you want — the PSNR (dB) of each sample's output against the full-compute
    output of the same seed. A training-free calibration of the model (two full generations,
    cached on disk; :mod:`specdist.engine.calibration`) turns it into per-step decisions
    (:mod:`specdist.engine.target`). ``null`` with no ``tau0`` means the default,
    :data:`DEFAULT_TARGET_PSNR_DB`; set ``tau0`` instead for a raw threshold schedule."""
    calibration: str = "auto"
    """speca with a quality target: ``auto`` reuses the calibration cached for this model and
    setting (under ``$SPECDIST_CACHE_DIR``, default ``~/.cache/specdist``) or runs and caches it;
    ``refresh`` always recomputes it."""
    calibration_samples: int = 4
    """speca with a quality target: samples of the calibration run (seeds 1000…, the model's
    default conditioning); its cost is two full generations of these samples."""
    tau0: float | None = None
    """speca, expert override of the quality target: threshold on the probe's error at progress 0
    (τ(p) = max(τ0·β^p, τ_min)); setting it selects the threshold schedule."""
    beta: float | None = None
    """speca with ``tau0``: threshold change over the trajectory (default 0.1): β < 1 tightens the
    check towards the end (SpeCa's schedule), β > 1 loosens it (strict while the layout forms)."""
    tau_min: float | None = None
    """speca with ``tau0``: threshold floor (default 0)."""
    warmup: int = 3
    """All methods: leading steps always computed fully."""
    full_steps: list[int] = field(default_factory=list)
    """All methods: step indices always computed fully (negative counts from the end, e.g. -1)."""
    min_run: int = 0
    """speca: speculative steps right after a full step accepted without the probe check
    (NaN/Inf forecasts are still rejected); 0 verifies every forecast."""
    max_run: int = 12
    """speca: at most this many consecutive speculative steps before a forced full step."""
    max_cache_bytes: int = 16 * 2**30
    """Cap on the forecaster's memory (0 = no cap). ``probe``/``output``: the Taylor order is lowered
    until the cache fits; fails clearly if even reuse (order 0) does not fit. ``block``: the first
    blocks are left uncached until the rest fits at the configured order, then the order is lowered.
    The default, 16 GiB, sits next to HunyuanVideo's 36 GiB peak at 720×1280×129f on one 80 GB GPU
    (one hidden state: 730 MB in bf16): ``probe`` order 1 with guidance takes ≈ 6 GB; ``block``
    order 1 without CFG keeps the last 10 single-stream blocks' branches (+ one entry stream).
    Counted in ``storage_dtype`` bytes; with ``host_offload`` it bounds the cache's working set on
    the device (two entries) and ``max_host_bytes`` bounds the cache itself."""
    storage_dtype: str = "compute"
    """fora, taylorseer, speca: dtype the Taylor factors are *stored* in: ``compute`` (the features'
    own dtype, i.e. the model's), ``float32``, ``bfloat16``, ``float16`` (may overflow on large
    activations; an overflowing forecast is rejected as non-finite) or fp8 ``float8_e4m3fn`` /
    ``float8_e5m2`` (one float32 scale per token, i.e. per row and position of the last dimension). The forecast arithmetic always runs in
    the compute dtype; only what is kept between steps is converted. Halving the bytes lets twice the
    blocks fit in ``max_cache_bytes``. Applies to the single-device engine (``runtime.backend:
    none`` and ``runtime.mode: throughput``)."""
    host_offload: bool = False
    """``granularity: block`` only: keep the cached branches in host memory (pinned when the model
    runs on CUDA) instead of on the device; each block's factors are copied in when the block reads
    them, and the next block's copy starts while the current one runs (a side CUDA stream). The
    device then holds about two blocks' factors; ``max_host_bytes`` caps the rest. On a CPU run the
    host *is* the device: the same code path runs, nothing is saved, and the report says so."""
    max_host_bytes: int = 192 * 2**30
    """``host_offload``: cap on the host memory the cached branches take (0 = no cap), sized like
    ``max_cache_bytes`` (uncached prefix first, then the order). The default, 192 GiB, holds every
    block of HunyuanVideo 720×1280×129f at order 1 in bf16 (117 GB) or fp8 (59 GB)."""

    def resolved(self, method: str) -> "CacheConfig":
        """This config as ``method`` runs it: specdiff always caches per token (granularity ``token``)."""
        if method == "specdiff" and self.granularity != "token":
            from dataclasses import replace

            return replace(self, granularity="token")
        return self

    @property
    def uses_target(self) -> bool:
        """Whether ``speca`` runs to a quality target (the default) rather than a τ schedule."""
        return self.tau0 is None

    @property
    def effective_target_psnr_db(self) -> float:
        """The quality target speca runs to (the configured one, else the default)."""
        return DEFAULT_TARGET_PSNR_DB if self.target_psnr_db is None else self.target_psnr_db

    def threshold_schedule(self) -> tuple[float, float, float]:
        """``(τ0, β, τ_min)`` of the threshold schedule (only with ``tau0`` set)."""
        if self.tau0 is None:
            raise ValueError("no threshold schedule: cache.tau0 is not set (speca runs to a quality target)")
        return self.tau0, 0.1 if self.beta is None else self.beta, 0.0 if self.tau_min is None else self.tau_min

    def validate_for(self, method: str, prefix: str = "cache.") -> None:
        """Refuse the fields that do not apply to ``method`` (one line naming the field)."""
        token_only = ("token_reuse", "token_history")
        if method != "specdiff":
            for key in token_only:
                _check(getattr(self, key) == getattr(CacheConfig, key), f"{prefix}{key}", getattr(self, key),
                       f"the default ({getattr(CacheConfig, key)}) with method={method} (it applies to specdiff)")
        if method != "specdiff" and self.granularity != "token":
            for key in ("token_refresh", "token_kv"):
                _check(getattr(self, key) == getattr(CacheConfig, key), f"{prefix}{key}", getattr(self, key),
                       f"the default ({getattr(CacheConfig, key)}) with method={method} and granularity="
                       f"{self.granularity} (it applies to specdiff and to cache.granularity=token)")
        if self.granularity == "token":
            _check(method in ("taylorseer", "speca", "specdiff"), f"{prefix}granularity", self.granularity,
                   f"one of {[g for g in GRANULARITIES if g != 'token']} with method={method} (token level: "
                   f"taylorseer, speca and specdiff)")
        if method == "speca" and self.granularity == "token":
            _check(self.tau0 is not None, f"{prefix}tau0", self.tau0,
                   "a number >= 0 with cache.granularity=token (speca's quality-target calibration is block "
                   "level; at token level it verifies the refreshed tokens against a threshold schedule)")
            _check(self.token_refresh > 0, f"{prefix}token_refresh", self.token_refresh,
                   "a number in (0, 1] with method=speca (its check reads the refreshed tokens)")
        if method == "specdiff":
            _check(self.granularity in ("block", "token"), f"{prefix}granularity", self.granularity,
                   "token (or left at its default: specdiff is always token level)")
            for key in ("target_psnr_db", "tau0", "beta", "tau_min"):
                _check(getattr(self, key) is None, f"{prefix}{key}", getattr(self, key),
                       "null with method=specdiff (its level shares are set by cache.token_refresh / token_reuse)")
            for key in ("min_run", "probe_block", "metric"):
                _check(getattr(self, key) == getattr(CacheConfig, key), f"{prefix}{key}", getattr(self, key),
                       f"the default ({getattr(CacheConfig, key)}) with method=specdiff (it applies to speca)")
        if method == "fora" or self.order < 2:
            _check(self.extrapolation_ratio == CacheConfig.extrapolation_ratio, f"{prefix}extrapolation_ratio",
                   self.extrapolation_ratio, f"the default ({CacheConfig.extrapolation_ratio}) with method={method} and "
                   f"order={0 if method == 'fora' else self.order} (it applies to Taylor orders >= 2)")
        if method in ("fora", "taylorseer"):
            for key in ("target_psnr_db", "tau0", "beta", "tau_min"):
                _check(getattr(self, key) is None, f"{prefix}{key}", getattr(self, key),
                       f"null with method={method} (a fixed-interval method has no check; it applies to speca)")
        if method == "speca" and self.tau0 is not None:
            _check(self.target_psnr_db is None, f"{prefix}target_psnr_db", self.target_psnr_db,
                   f"null when {prefix}tau0 is set (tau0 selects a threshold schedule instead of a quality target)")
        if method == "speca" and self.tau0 is None:
            for key in ("beta", "tau_min"):
                _check(getattr(self, key) is None, f"{prefix}{key}", getattr(self, key),
                       f"null unless {prefix}tau0 is set (a quality target derives its own thresholds)")

    def validate(self, prefix: str = "cache.") -> None:
        _check(0 <= self.order <= 6, f"{prefix}order", self.order, "an integer 0..6")
        _check(self.extrapolation_ratio >= 0, f"{prefix}extrapolation_ratio", self.extrapolation_ratio,
               "a number >= 0 (0: never fall back to order 1)")
        _check(self.time in TIME_UNITS, f"{prefix}time", self.time, f"one of {list(TIME_UNITS)}")
        _check(self.interval >= 1, f"{prefix}interval", self.interval, "an integer >= 1")
        _check(self.granularity in GRANULARITIES, f"{prefix}granularity", self.granularity,
               f"one of {list(GRANULARITIES)}")
        _check(0.0 <= self.token_refresh <= 1.0, f"{prefix}token_refresh", self.token_refresh, "a number in [0, 1]")
        _check(0.0 <= self.token_reuse <= 1.0 - self.token_refresh, f"{prefix}token_reuse", self.token_reuse,
               f"a number in [0, 1 - token_refresh = {1.0 - self.token_refresh:g}]")
        _check(self.token_kv in TOKEN_KV, f"{prefix}token_kv", self.token_kv, f"one of {list(TOKEN_KV)}")
        _check(self.token_history >= 0.0, f"{prefix}token_history", self.token_history, "a number >= 0")
        _check(self.metric in METRICS, f"{prefix}metric", self.metric, f"one of {list(METRICS)}")
        _check(self.tau0 is None or self.tau0 >= 0, f"{prefix}tau0", self.tau0, "null or a number >= 0")
        _check(self.beta is None or 0 < self.beta <= 100, f"{prefix}beta", self.beta, "null or a number in (0, 100]")
        _check(self.tau_min is None or self.tau_min >= 0, f"{prefix}tau_min", self.tau_min, "null or a number >= 0")
        _check(self.target_psnr_db is None or 10.0 <= self.target_psnr_db <= 80.0, f"{prefix}target_psnr_db",
               self.target_psnr_db, "null or a PSNR in dB between 10 and 80")
        _check(self.calibration in CALIBRATION_MODES, f"{prefix}calibration", self.calibration,
               f"one of {list(CALIBRATION_MODES)}")
        _check(1 <= self.calibration_samples <= 64, f"{prefix}calibration_samples", self.calibration_samples,
               "an integer 1..64")
        _check(self.warmup >= 1, f"{prefix}warmup", self.warmup, "an integer >= 1 (the cache needs a full step)")
        _check(self.min_run >= 0, f"{prefix}min_run", self.min_run, "an integer >= 0")
        _check(self.max_run >= max(1, self.min_run), f"{prefix}max_run", self.max_run,
               f"an integer >= max(1, min_run={self.min_run})")
        _check(self.max_cache_bytes >= 0, f"{prefix}max_cache_bytes", self.max_cache_bytes, "an integer >= 0")
        _check(self.storage_dtype in STORAGE_DTYPE_NAMES, f"{prefix}storage_dtype", self.storage_dtype,
               f"one of {list(STORAGE_DTYPE_NAMES)}")
        _check(not self.host_offload or self.granularity == "block", f"{prefix}host_offload", self.host_offload,
               f"false with cache.granularity={self.granularity!r} (host offload streams block-level branches; "
               f"use cache.granularity=block)")
        _check(self.max_host_bytes >= 0, f"{prefix}max_host_bytes", self.max_host_bytes, "an integer >= 0")


def _compiles(pattern: str) -> bool:
    try:
        return re.compile(pattern) is not None
    except re.error:
        return False


@dataclass(kw_only=True)
class PeerConfig:
    """Knobs of the diffusers peers (defaults: diffusers' own); each is used by the method named."""

    fbcache_threshold: float = 0.05
    """fbcache: skip the other blocks when the first block's residual changed by less than this
    (relative mean absolute difference); 0 never skips."""
    taylorseer_cache_interval: int = 5
    """taylorseer: one full computation every this many steps after warm-up; 1 never forecasts."""
    taylorseer_max_order: int = 1
    """taylorseer: Taylor order of the forecast (0 = reuse)."""
    taylorseer_disable_cache_before_step: int = 3
    """taylorseer: leading steps always computed (they seed the Taylor factors)."""
    taylorseer_cache_identifiers: list[str] | None = None
    """taylorseer: regexes (``re.fullmatch`` on module names) of the modules to forecast. ``None``:
    each block (``transformer_blocks\\.\\d+`` …), so a forecast step runs no block; diffusers'
    default (``^transformer_blocks.*attn``) misses DiT's ``attn1``, on HunyuanVideo hooks attention only."""
    taylorseer_lite: bool = False
    """taylorseer: diffusers' lite mode (blocks return zeros, top-level ``proj_out`` forecast);
    overrides the identifiers; needs a ``proj_out`` module (not DiT)."""
    taylorseer_factors_dtype: str = "float32"
    """taylorseer: dtype of the stored Taylor factors (diffusers' default is bfloat16)."""
    magcache_threshold: float = 0.06
    """magcache: skip while the accumulated ratio error stays at or below this."""
    magcache_max_skip_steps: int = 3
    """magcache: at most this many consecutive skipped steps (K); 0 never skips."""
    magcache_retention_ratio: float = 0.2
    """magcache: leading fraction of the steps never skipped."""
    magcache_ratios: list[float] | None = None
    """magcache: per-step magnitude ratios (interpolated to the step count); ``None`` calibrates
    on the run's own inputs (:func:`calibrate_magcache`)."""
    pab_spatial_skip_range: int = 2
    """pab: each self-attention computes once every this many calls inside the timestep range;
    1 never skips."""
    pab_spatial_timestep_range: tuple[float, float] = (100.0, 800.0)
    """pab: attention is reused only for scheduler timesteps strictly inside this range."""

    def validate(self, prefix: str = "peer.") -> None:
        _check(self.fbcache_threshold >= 0, f"{prefix}fbcache_threshold", self.fbcache_threshold, "a number >= 0")
        _check(self.taylorseer_cache_interval >= 1, f"{prefix}taylorseer_cache_interval",
               self.taylorseer_cache_interval, "an integer >= 1")
        _check(0 <= self.taylorseer_max_order <= 6, f"{prefix}taylorseer_max_order", self.taylorseer_max_order,
               "an integer 0..6")
        _check(self.taylorseer_disable_cache_before_step >= 1, f"{prefix}taylorseer_disable_cache_before_step",
               self.taylorseer_disable_cache_before_step, "an integer >= 1 (the forecast needs a computed step)")
        ids = self.taylorseer_cache_identifiers
        _check(ids is None or (len(ids) > 0 and all(isinstance(p, str) and _compiles(p) for p in ids)),
               f"{prefix}taylorseer_cache_identifiers", ids, "null or a non-empty list of regular expressions")
        _check(self.taylorseer_factors_dtype in FACTOR_DTYPES, f"{prefix}taylorseer_factors_dtype",
               self.taylorseer_factors_dtype, f"one of {list(FACTOR_DTYPES)}")
        _check(self.magcache_threshold >= 0, f"{prefix}magcache_threshold", self.magcache_threshold, "a number >= 0")
        _check(self.magcache_max_skip_steps >= 0, f"{prefix}magcache_max_skip_steps", self.magcache_max_skip_steps,
               "an integer >= 0")
        _check(0 <= self.magcache_retention_ratio <= 1, f"{prefix}magcache_retention_ratio",
               self.magcache_retention_ratio, "a number in [0, 1]")
        r = self.magcache_ratios
        _check(r is None or (len(r) > 0 and all(0 < float(x) < float("inf") for x in r)),
               f"{prefix}magcache_ratios", r, "null or a non-empty list of positive numbers")
        _check(self.pab_spatial_skip_range >= 1, f"{prefix}pab_spatial_skip_range", self.pab_spatial_skip_range,
               "an integer >= 1")
        lo_hi = self.pab_spatial_timestep_range
        _check(len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1], f"{prefix}pab_spatial_timestep_range", lo_hi,
               "[low, high] scheduler timesteps with low <= high")


EXACT_DRAFTS = ("frozen", "taylor")
EXACT_SPACES = ("x0", "output")
"""``exact.draft`` values (:mod:`specdist.engine.exact`)."""


@dataclass(kw_only=True)
class ExactConfig:
    """Knobs of ``method: exact`` — exact speculative sampling for stochastic samplers (De Bortoli,
    Galashov, Gretton, Doucet, "Accelerated Diffusion Models via Speculative Sampling", ICML 2025;
    DESIGN §2.4). Each round drafts ``window`` Gaussian transitions, verifies every drafted state
    with one batched target call, keeps the drafts up to the first rejection and samples that step
    from the residual by reflection maximal coupling: the output law is exactly the target sampler's."""

    window: int = 4
    """Drafted steps per round (L); with ``adaptive`` the first round's window."""
    adaptive: bool = False
    """Choose each round's L from the sample's committed history: the smallest L whose chance of
    drafting past the window, ``â^L`` with ``â`` the smoothed acceptance rate so far, is below 0.1
    (capped at ``max_window``)."""
    max_window: int = 16
    """``adaptive``: the largest window."""
    draft: str = "frozen"
    """The draft's model output. ``frozen``: the target's output at the newest committed state
    (the paper's frozen-target draft; one step stale at a round's start). ``taylor``: the engine's
    Taylor forecaster (:class:`~specdist.engine.forecast.TaylorCache`) of the output over the
    committed evaluations, order ``order``, extrapolated to each drafted step."""
    order: int = 1
    """``draft: taylor``: the Taylor order (1..4)."""
    space: str = "x0"
    """What the draft carries forward from the committed evaluations: ``x0``, the clean sample the
    target predicted (converted back to a model output at each drafted state; steady late in
    sampling, where a reused raw output is badly off once the state has moved), or ``output``, the
    model output itself (the literal frozen-target draft)."""
    eta: float | None = None
    """``DDIMScheduler`` only: DDIM's η in (0, 1] (η = 0 is deterministic and refused)."""

    def validate(self, prefix: str = "exact.") -> None:
        _check(1 <= self.window <= 64, f"{prefix}window", self.window, "an integer 1..64")
        _check(1 <= self.max_window <= 64, f"{prefix}max_window", self.max_window, "an integer 1..64")
        _check(self.adaptive or self.max_window == 16, f"{prefix}max_window", self.max_window,
               "the default (16) unless exact.adaptive is true")
        _check(self.draft in EXACT_DRAFTS, f"{prefix}draft", self.draft, f"one of {list(EXACT_DRAFTS)}")
        _check(1 <= self.order <= 4, f"{prefix}order", self.order, "an integer 1..4")
        _check(self.draft == "taylor" or self.order == 1, f"{prefix}order", self.order,
               "the default (1) unless exact.draft is taylor (the frozen draft has no order)")
        _check(self.space in EXACT_SPACES, f"{prefix}space", self.space, f"one of {list(EXACT_SPACES)}")
        _check(self.eta is None or 0 < self.eta <= 1, f"{prefix}eta", self.eta,
               "null or a number in (0, 1] (DDIMScheduler only)")
