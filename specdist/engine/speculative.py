"""The caching sampling loop: forecast, verify, accept or roll back — per sample (DESIGN §2.2).

For each step ``i`` at time ``s_i`` and each sample ``b`` of the batch:

1. If ``b`` must be computed fully (warm-up, empty cache, run too long; see
   :mod:`~specdist.engine.decision`), skip to 3.
2. *Speculate*: forecast the probe block's input streams (and its output) from ``b``'s full steps
   with the Taylor cache; run the model with every block skipped except the probe, which runs for
   real on the forecast input. Error ``e_b`` = distance(forecast probe output, true probe output).
   Accept when ``e_b < τ(i / (N−1))`` and the output is finite: ``b``'s model output for this step
   is the head applied to the probe's true output. At ``block`` granularity every block runs its
   norms and modulation on the forecast branches and the probe block's branches are the ones
   computed and compared (:mod:`~specdist.engine.hooks`). The first ``min_run`` forecasts after a
   full step are accepted unchecked: those samples speculate in their own call, without the probe.
3. *Full* (scheduled, or rejected in 2 — the rollback): compute the whole model for ``b`` at the
   *same* state ``x_i``; its features refresh ``b``'s cache; its output replaces any speculation.
4. ``x_{i+1} = scheduler.step(output, s_i, x_i)`` for the whole batch.

Only the samples that need it are computed in 2 and 3 (sub-batches), so an easy sample costs
less than a hard one, and a sample's decisions do not depend on its batch mates. The accept mask
is the only host synchronisation of a step. Fixed-interval methods (``fora``, ``taylorseer``) run
the same loop with the probe skipped and every forecast accepted. At ``token`` granularity a
speculative call also recomputes a share of the tokens in every cached block
(:mod:`~specdist.engine.tokens`; ``specdiff`` chooses them by self-speculation, the others by a
fixed rotation) and books the FLOPs that really ran per sample (``CacheStats.token_cost``).
"""

from __future__ import annotations

import time as time_module
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..models.base import Conditioning, ModelAdapter
from ..sampling import SampleResult, fresh_scheduler, init_latents, model_device, model_dtype, scale_input
from .calibration import Calibration
from .config import CacheConfig
from .cache_memory import plan_block_cache, storage_for
from .forecast import CacheStorage, RecordSink, TaylorCache
from .hooks import SpeculationHooks
from .tokens import TokenPlan, call_cost, level_shares
from .decision import Rule, forecaster_time, make_rule
from .verify import ONE_DEVICE, Agreement, combine_rows


@dataclass
class CacheStats:
    """What happened to each sample (``decisions[b][i]``: ``F`` full, ``A`` accepted forecast,
    ``R`` rejected forecast then recomputed fully)."""

    decisions: list[list[str]]
    errors: list[list[float | None]]  # probe error per sample and step (None where not verified)
    thresholds: list[float | None]
    cache_bytes: int
    effective_order: int
    spec_calls: int = 0  # speculative model calls (batched)
    full_calls: int = 0  # full model calls (batched)
    spec_seconds: float = 0.0  # wall time of the speculative calls, each up to its decision
    probed: list[int] = field(default_factory=list)  # per sample: speculative steps the probe checked
    extra: dict = field(default_factory=dict)
    rule: dict = field(default_factory=dict)  # the rule's summary (per-sample lists, then scalars)
    token_cost: list[float] = field(default_factory=list)  # token level, per sample: full forwards' FLOPs spent speculating
    token_levels: list[list[tuple[int, float, float, float]]] = field(default_factory=list)
    """token level, per sample: (step, recompute, forecast, reuse shares) of each speculative step"""
    select_seconds: float = 0.0  # token level: wall time of scoring and selecting tokens

    @staticmethod
    def concat(parts: list["CacheStats"]) -> "CacheStats":
        """Stats of several batches of one job, samples in batch order."""
        return CacheStats(
            decisions=[d for p in parts for d in p.decisions],
            errors=[e for p in parts for e in p.errors],
            thresholds=parts[0].thresholds,
            cache_bytes=max(p.cache_bytes for p in parts),
            effective_order=min(p.effective_order for p in parts),
            spec_calls=sum(p.spec_calls for p in parts),
            full_calls=sum(p.full_calls for p in parts),
            spec_seconds=sum(p.spec_seconds for p in parts),
            probed=[n for p in parts for n in p.probed],
            extra={k: (max if k.endswith("_bytes") else min)(p.extra[k] for p in parts) for k in parts[0].extra},
            rule={k: ([x for p in parts for x in p.rule[k]] if isinstance(v, list) else v)
                  for k, v in parts[0].rule.items()},
            token_cost=[c for p in parts for c in p.token_cost],
            token_levels=[lv for p in parts for lv in p.token_levels],
            select_seconds=sum(p.select_seconds for p in parts),
        )

    def per_sample(self) -> list[dict]:
        """Counts per sample: full, accepted, rejected, mean accepted run length."""
        rows = []
        for dec in self.decisions:
            runs, cur = [], 0
            for d in dec:
                if d == "A":
                    cur += 1
                elif cur:
                    runs.append(cur)
                    cur = 0
            if cur:
                runs.append(cur)
            rows.append({
                "full_steps": dec.count("F") + dec.count("R"),
                "accepted": dec.count("A"),
                "rejected": dec.count("R"),
                "mean_accepted_run": (sum(runs) / len(runs)) if runs else 0.0,
                "decisions": "".join(dec),
            })
        return rows


@dataclass
class CachedResult(SampleResult):
    stats: CacheStats | None = None


def _effective_order(method: str, cfg: CacheConfig) -> int:
    return 0 if method == "fora" else cfg.order


def _fit_order(order: int, per_order_bytes: int, cap: int) -> int:
    if cap <= 0:
        return order
    fit = cap // max(per_order_bytes, 1) - 1
    if fit < 0:
        from ..errors import ConfigError

        raise ConfigError(f"invalid value for 'cache.max_cache_bytes': {cap} (allowed: >= {per_order_bytes} bytes, "
                          f"the size of one copy of the cached features for this batch)")
    return min(order, fit)


def fit_region(order: int, region_bytes: Callable[[int], int], last_start: int, cap: int) -> tuple[int, int]:
    """Block level: ``(order, start)`` — the highest order ``<= order`` and then the largest cached
    region (smallest first cached block ``start <= last_start``) whose ``(order + 1) ×
    region_bytes(start)`` fits in ``cap`` bytes (0 = no cap: every block at ``order``).

    Raises:
        ConfigError: not even reuse of block ``last_start``'s branches fits.
    """
    if cap <= 0:
        return order, 0
    for m in range(order, -1, -1):
        for start in range(last_start + 1):
            if (m + 1) * region_bytes(start) <= cap:
                return m, start
    from ..errors import ConfigError

    raise ConfigError(f"invalid value for 'cache.max_cache_bytes': {cap} (allowed: >= {region_bytes(last_start)} "
                      f"bytes, one copy of the probe block's branches for this batch)")


class SpeculativeStepper:
    """The per-generation state of a caching method and one step of forecast → verify → accept or
    roll back, for ``samples`` samples whose model calls carry ``branches`` rows each (2 when
    guidance runs conditional and unconditional rows in one batch, ordered ``[cond…, uncond…]``).

    The model is reached only through ``call(samples) -> output`` (a sub-batch of sample indices,
    CPU long tensor → float output ``[len(samples), ...]``), so the same stepper serves specdist's
    own loop and a stock diffusers pipeline (:mod:`specdist.engine.pipeline`). ``agreement``
    (:class:`~specdist.engine.verify.Agreement`): how the ranks of a gang running the model
    context-parallel compute the verifier's error and agree on the step's values (one device: as they are).
    """

    def __init__(self, hooks: SpeculationHooks, method: str, cfg: CacheConfig, samples: int, branches: int = 1, *,
                 rule: Rule, cache_cls: type[TaylorCache] = TaylorCache, agreement: Agreement = ONE_DEVICE) -> None:
        self.hooks, self.method, self.cfg, self.rule = hooks, method, cfg, rule
        self.agreement = agreement
        self.verify = rule.verify
        self.samples, self.branches = samples, branches
        self.cache_cls = cache_cls
        self.storage = CacheStorage.named(cfg.storage_dtype, cfg.host_offload)
        self.cache: TaylorCache | None = None  # probe features: rows = samples x branches
        self.out_cache: TaylorCache | None = None  # lite: the (guided) call output, rows = samples
        self.layout: list[tuple[str, int]] = []
        self.start = 0  # block level: first block whose branches are cached (sized on the first full call)
        self.sized = not self.block_level
        self.run_len = torch.zeros(samples, dtype=torch.long)
        self.stats = CacheStats([[] for _ in range(samples)], [[] for _ in range(samples)], [], 0,
                                _effective_order(method, cfg), probed=[0] * samples)
        if self.token_level:
            self.stats.token_cost = [0.0] * samples
            self.stats.token_levels = [[] for _ in range(samples)]
        self._step = 0
        self.token_age: dict[str, torch.Tensor] = {}  # specdiff: stream -> [rows, n] steps since last computed

    @property
    def lite(self) -> bool:
        """Whether the model output itself is forecast (``granularity: output``)."""
        return self.cfg.granularity == "output"

    @property
    def block_level(self) -> bool:
        """Whether every block's residual branches are cached (``granularity: block``)."""
        return self.cfg.granularity in ("block", "token")

    @property
    def token_level(self) -> bool:
        """Whether the steps between full ones compute selected tokens (``granularity: token``)."""
        return self.cfg.granularity == "token"

    def _token_plan(self, group: torch.Tensor) -> TokenPlan:
        cfg = self.cfg
        kv = cfg.token_kv == "forecast"
        if self.method == "specdiff":
            rows = self.rows_of(group)
            return TokenPlan(cfg.token_refresh, cfg.token_reuse, cfg.token_history, spec_block=self.start,
                             kv_forecast=kv, age={s: a[rows] for s, a in self.token_age.items()})
        # taylorseer, speca: the ToCa-style rotation (speca checks the probe block's refreshed rows)
        return TokenPlan(cfg.token_refresh, phase=self.run_len[group].repeat(self.branches), kv_forecast=kv)

    def _age_tokens(self, group: torch.Tensor, tokens: TokenPlan) -> None:
        """specdiff: one step older for every token of ``group``, 0 for the recomputed ones."""
        rows = self.rows_of(group)
        for stream, n in tokens.lengths.items():
            age = self.token_age.setdefault(stream, torch.zeros((self.samples * self.branches, n)))
            grown = age[rows] + 1
            grown.scatter_(1, tokens.stream_index(stream).cpu(), 0.0)
            age[rows] = grown

    def _book_tokens(self, group: torch.Tensor, tokens: TokenPlan) -> None:
        if self.method == "specdiff":
            self._age_tokens(group, tokens)
        cost = call_cost(self.hooks.model, tokens, self.start)
        shares = level_shares(tokens)
        for sample in group.tolist():
            self.stats.token_cost[sample] += cost
            self.stats.token_levels[sample].append((self._step, *shares))
        self.stats.select_seconds += tokens.select_seconds

    @property
    def uses_probe(self) -> bool:
        """Whether the probe features are cached: always, except for unverified lite forecasts."""
        return self.verify or not self.lite

    def rows_of(self, samples: torch.Tensor) -> torch.Tensor:
        """Feature-cache rows of ``samples`` (one per branch)."""
        return torch.cat([samples + k * self.samples for k in range(self.branches)])

    def _forecast(self, spec: torch.Tensor, time: float) -> dict[str, tuple[torch.Tensor, ...]]:
        if self.block_level:  # each block's branches forecast when the block reads them (forecast.py)
            return self.cache.view(self.rows_of(spec), time, self.layout)
        forecast: dict[str, tuple[torch.Tensor, ...]] = {}
        if self.uses_probe:
            flat, k = self.cache.forecast(self.rows_of(spec), time), 0
            for name, n in self.layout:
                forecast[name], k = tuple(flat[k:k + n]), k + n
            if not self.block_level:
                forecast.setdefault("probe_out", forecast["last_out"])
        if self.lite:
            forecast["output"] = self.out_cache.forecast(spec, time)
        return forecast

    def _size_region(self, sizes: dict[str, int], itemsize: int = 4) -> None:
        """Block level, after the measuring call: choose the order and the cached region."""
        rows = self.samples * self.branches
        plan = plan_block_cache(self.hooks, sizes, rows, itemsize, self.stats.effective_order,
                                self.hooks.probe if self.verify else self.hooks.last, self.storage,
                                self.cfg.max_cache_bytes, self.cfg.max_host_bytes)
        order, self.start = plan.order, plan.start
        self.stats.effective_order = order
        self.cache = self._new_cache(order, rows, storage_for(plan, self.storage, self.cfg.max_host_bytes))
        self.stats.extra["cached_blocks"] = self.hooks.last + 1 - self.start
        self.sized = True

    def _new_cache(self, order: int, rows: int, storage: CacheStorage | None = None) -> TaylorCache:
        """A forecaster of ``order`` for ``rows`` (the stepper's storage unless given), with the
        config's order fallback."""
        return self.cache_cls(order, rows, storage=self.storage if storage is None else storage,
                              fallback_ratio=self.cfg.extrapolation_ratio)

    def _record(self, redo: torch.Tensor, time: float, recorded: dict, output: torch.Tensor) -> None:
        if isinstance(recorded, RecordSink):  # block level: the features went into the cache during the call
            self.layout = recorded.finish()
            self._count_bytes()
            return
        names = self.hooks.feature_names(self.start) if self.uses_probe else ()
        feats = [recorded[name] for name in names]
        flat = tuple(s for f in feats for s in f)
        if self.cache is None and self.out_cache is None:  # first recorded step: size and create
            self.layout = [(name, len(f)) for name, f in zip(names, feats)]
            per_order = sum(s[0].numel() * s.element_size() for s in flat) * self.samples * self.branches
            per_order = self.storage.stored_bytes(per_order, flat[0].element_size()) if flat else per_order
            if self.lite:
                per_order += self.storage.stored_bytes(output[0].numel() * output.element_size() * self.samples,
                                                       output.element_size())
            order = _fit_order(self.stats.effective_order, per_order, self.cfg.max_cache_bytes)
            self.stats.effective_order = order
            self.cache = self._new_cache(order, self.samples * self.branches) if self.uses_probe else None
            self.out_cache = self._new_cache(order, self.samples) if self.lite else None
        if self.cache is not None:
            self.cache.update(self.rows_of(redo), flat, time)
        if self.out_cache is not None:
            self.out_cache.update(redo, (output,), time)
        self._count_bytes()

    def _count_bytes(self) -> None:
        caches = [c for c in (self.cache, self.out_cache) if c is not None]
        self.stats.cache_bytes = sum(c.nbytes() for c in caches)
        self.stats.extra["cache_host_bytes"] = sum(c.host_bytes() for c in caches)

    def _ready(self) -> torch.Tensor:
        cache = self.cache if self.cache is not None else self.out_cache
        b = self.samples
        return cache.ready(torch.arange(b)) if cache is not None else torch.zeros(b, dtype=torch.bool)

    def speculate(self, group: torch.Tensor, time: float, verify: bool,
                  call: Callable[[torch.Tensor], torch.Tensor],
                  unchecked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One speculative call for the samples ``group`` (they must be :meth:`ready`): (output,
        per-sample verifier error, NaN without ``verify``). ``unchecked`` (block level, with
        ``verify``): bool per sample of ``group`` whose check is waived — its probe block keeps the
        forecast, so its output is the one an unverified call gives it, and its error is NaN."""
        forecast = self._forecast(group, time)
        if self.uses_probe and (verify or not self.lite):
            tokens = self._token_plan(group) if self.token_level else None
            keep = None if unchecked is None else unchecked.repeat(self.branches)
            plan = self.hooks.plan("speculate", verify=verify, forecast=forecast, start=self.start, tokens=tokens,
                                   keep_forecast=keep)
            o = call(group)
            self.stats.spec_calls += 1
            if tokens is not None:
                self._book_tokens(group, tokens)
        if self.lite:  # the forecast is the output (unverified lite: no model call at all)
            o = forecast["output"][0]
        if not verify:
            return o, torch.full((len(group),), float("nan"), device=o.device)
        names = self.hooks.verified_features()
        true = torch.cat([s.flatten(1) for n in names for s in plan.recorded[n]], dim=1)
        # token level: the probe block's refreshed rows against their forecasts (no extra compute)
        pred_of = (lambda n: plan.recorded[f"forecast:{n}"]) if self.token_level else (lambda n: forecast[n])
        pred = torch.cat([s.flatten(1) for n in names for s in pred_of(n)], dim=1)
        err = combine_rows(self.agreement.error(pred, true, self.cfg.metric), len(group))
        if unchecked is not None:
            err = torch.where(unchecked.to(err.device), torch.full_like(err, float("nan")), err)
        return o, err

    def step(self, i: int, steps: int, time: float, call: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Model output ``[samples, ...]`` for step ``i`` of ``steps`` at forecaster time ``time``.

        The decisions are the rule's (:mod:`~specdist.engine.decision`): who computes fully, who
        speculates with or without the check, which forecasts are accepted; a rejected forecast is
        recomputed fully at the same state (rollback)."""
        rule, b, stats = self.rule, self.samples, self.stats
        self._step = i
        stats.thresholds.append(rule.threshold(i) if self.verify else None)
        full = rule.must_compute(i, self.run_len, self._ready())
        errors: list[float | None] = [None] * b
        out = None
        spec = (~full).nonzero().flatten()
        if len(spec):
            out = self._speculative_step(i, time, spec, full, errors, call)
        redo = full.nonzero().flatten()
        for sample in redo.tolist():
            if len(stats.decisions[sample]) == i:
                stats.decisions[sample].append("F")
        if len(redo):
            o = self.compute_full(redo, time, call)
            if out is None:
                out = o.new_empty((b, *o.shape[1:]))
            out[redo.to(o.device)] = o
            self.run_len[redo] = 0
            rule.observe_full(redo)
            for age in self.token_age.values():
                age[self.rows_of(redo)] = 0.0
        for sample in range(b):
            stats.errors[sample].append(errors[sample])
        if i == steps - 1:
            stats.rule = rule.summary()
        self.hooks.plan("off")
        return out

    def _speculative_step(self, i: int, time: float, spec: torch.Tensor, full: torch.Tensor,
                          errors: list[float | None], call: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Speculate for ``spec``; marks rejected samples in ``full``; returns the output buffer
        holding the accepted forecasts."""
        rule, stats, run_len = self.rule, self.stats, self.run_len[spec]
        began = time_module.perf_counter()
        # a waived check's output is the forecast's, never the probe's: a sample's output does not
        # depend on whether a batch mate needed the probe. Block level: one call for both (the waived
        # rows' probe block keeps its forecast); elsewhere the waived samples get their own call
        waived = rule.waive(i, spec, run_len) if self.verify else torch.ones(len(spec), dtype=torch.bool)
        if self.block_level and not self.token_level and waived.any() and (~waived).any():
            o, err = self.speculate(spec, time, True, call, unchecked=waived)
        else:
            parts = [(spec[m], v) for m, v in ((~waived, True), (waived, False)) if m.any()]
            results = [self.speculate(group, time, verify, call) for group, verify in parts]
            where = torch.cat([(~waived).nonzero().flatten(), waived.nonzero().flatten()])
            back = torch.argsort(where)
            o = torch.cat([r[0] for r in results])[back.to(results[0][0].device)]
            err = torch.cat([r[1] for r in results])[back.to(results[0][1].device)]
        finite = torch.isfinite(o.flatten(1)).all(dim=1)
        # the step's one host synchronisation; on a gang the values every decision rests on are made
        # identical on every rank (a non-finite output anywhere fails the row everywhere)
        host = self.agreement.max(torch.stack([(~finite).float(), err.float()]).cpu())
        stats.spec_seconds += time_module.perf_counter() - began
        ok = host[0] == 0
        err_host = torch.where(ok, host[1], torch.full_like(host[1], float("inf")))
        waived = waived & ok
        accept = ok & rule.accept(i, spec, torch.where(waived, torch.full_like(err_host, float("nan")), err_host),
                                  waived, run_len)
        for j, sample in enumerate(spec.tolist()):
            errors[sample] = None if waived[j] else float(host[1, j])
            stats.probed[sample] += int(self.verify and not waived[j])
            stats.decisions[sample].append("A" if accept[j] else "R")
        out = o.new_empty((self.samples, *o.shape[1:]))
        acc = spec[accept]
        out[acc.to(o.device)] = o[accept.to(o.device)]
        self.run_len[acc] += 1
        full[spec[~accept]] = True
        return out

    def compute_full(self, samples: torch.Tensor, time: float, call: Callable[[torch.Tensor], torch.Tensor],
                     record: bool = True) -> torch.Tensor:
        """A full model call for ``samples``; with ``record`` its features refresh their cache."""
        mode = ("record" if self.sized else "measure") if (record and self.uses_probe) else "off"
        # block level: each recorded branch goes into the cache as it is produced (a RecordSink)
        sink = self.cache.sink(self.rows_of(samples), time, self.layout) if (
            mode == "record" and self.block_level and self.sized and self.cache is not None) else None
        plan = self.hooks.plan(mode, start=self.start, recorded=sink)
        o = call(samples)
        self.stats.full_calls += 1
        if mode == "measure":
            self._size_region(plan.sizes, plan.itemsize)
        elif mode == "record":
            self._record(samples, time, plan.recorded, o)
        elif record:  # unverified lite: only the output is cached
            self._record(samples, time, {}, o)
        self.hooks.plan("off")
        return o


def sample_cached(
    model: nn.Module,
    adapter: ModelAdapter,
    scheduler,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int,
    method: str,
    cfg: CacheConfig,
    *,
    progress: bool = True,
    desc: str = "sampling",
    threshold_fn: Callable[[int], float] | None = None,
    cache_cls: type[TaylorCache] = TaylorCache,
    calibration: Calibration | None = None,
    on_step: Callable[[int], None] | None = None,
    agreement: Agreement = ONE_DEVICE,
    on_latents: Callable[[int, torch.Tensor], None] | None = None,
) -> CachedResult:
    """Sample with a caching method (``fora``, ``taylorseer``, ``speca`` or ``specdiff``); see the module doc.

    ``calibration``: the model's calibration, needed by ``speca`` with a quality target (see
    :func:`specdist.engine.calibration.ensure_calibration`). ``threshold_fn(step) -> τ`` replaces
    the decisions by that threshold schedule (ablations, tests); ``cache_cls`` is the forecaster
    class (a :class:`TaylorCache` or subclass); ``on_step(step)`` is called after each step and
    ``on_latents(step, latents)`` with the latents after it (studies of the trajectory);
    ``agreement``: the gang's when the model runs context-parallel (see :class:`SpeculativeStepper`).
    """
    cfg = cfg.resolved(method)
    device, dtype = model_device(model), model_dtype(model)
    sched = fresh_scheduler(scheduler)
    adapter.set_timesteps(sched, steps, tuple(noise.shape[1:]), device)
    timesteps = list(sched.timesteps)
    latents = init_latents(sched, noise, device)
    cond = cond.to(device, dtype)
    b = noise.shape[0]
    guided = cond.uncond_kwargs is not None and cond.guidance_scale > 1.0
    train_t = float(getattr(sched.config, "num_train_timesteps", 1000))
    hooks = SpeculationHooks(model, adapter, cfg.probe_block, cfg.granularity, cfg.token_kv)
    rule = make_rule(method, cfg, steps, b, calibration=calibration, threshold_fn=threshold_fn)
    stepper = SpeculativeStepper(hooks, method, cfg, b, 2 if guided else 1, rule=rule, cache_cls=cache_cls,
                                 agreement=agreement)
    start = time_module.perf_counter()
    try:
        with torch.inference_mode():
            for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
                x_in = scale_input(sched, latents, t).to(dtype)

                def call(idx: torch.Tensor) -> torch.Tensor:
                    return adapter.predict(model, x_in[idx.to(device)], t, cond.select(idx)).float()

                out = stepper.step(i, steps, forecaster_time(cfg, i, t, train_t), call)
                latents = sched.step(out, t, latents, return_dict=False)[0]
                if on_step is not None:
                    on_step(i)
                if on_latents is not None:
                    on_latents(i, latents)
    finally:
        hooks.remove()
    per = stepper.stats.per_sample()
    return CachedResult(
        latents=latents.float().cpu(),
        nfe=sum(r["full_steps"] for r in per) / b,
        wall_s=time_module.perf_counter() - start,
        timesteps=[float(t) for t in timesteps],
        stats=stepper.stats,
    )
