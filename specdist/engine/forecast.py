"""Feature forecasters (pure tensor math): reuse (FORA) and Taylor/Newton extrapolation (TaylorSeer).

A :class:`TaylorCache` keeps, for every cached feature and every row (sample, or sample × guidance
branch), the divided differences of the feature over the row's last ``m + 1`` *full* steps
(DESIGN §2.1). On a full step at time ``s`` (previous full steps at ``s_0 > s_1 > …``)::

    f_new[0]   = F(s)
    f_new[j+1] = (f_new[j] − f_old[j]) / (s − s_j)          (recursive divided differences)

and the forecast at time ``s*`` is the Newton form of the interpolating polynomial::

    F̂(s*) = f[0] + f[1]·(s* − s_0) + f[2]·(s* − s_0)(s* − s_1) + …

The order grows by one per full step up to ``m``. This is TaylorSeer's expansion with its
derivative estimates made consistent: at order 1 it is identical (``f[1] = (F(s) − F(s'))/Δ``,
forecast ``F + f[1]·k``); at higher orders TaylorSeer's ``Σ f[j] k^j / j!`` with gap-only
differences is off by O(Δ) even on a quadratic, while the Newton form is exact on every
polynomial of degree ≤ m, on any (non-uniform) grid. Order 0 is plain reuse (FORA).

**Order fallback** (``fallback_ratio`` ρ > 0). A term of order ≥ 2 divides by the gaps between the
full steps, so the noise in the features is amplified by about ``(distance / gap)²`` when the
forecast lies far beyond two full steps that are close together (after a rollback, or right after
the warm-up). A row whose forecast time lies more than ``ρ`` times the gap between its last two full
steps beyond the last one is forecast at order 1 instead (the terms of order ≥ 2 dropped). ρ = 0:
the plain Newton form. Measured (``benchmarks/results/schedule_sensitivity.md``, one window of 5
forecasts from adjacent full steps): plain order 2 costs up to 15 dB of worst-sample PSNR more than
order 1 there, ρ = 2 recovers most of it; on a fixed interval the full steps are ``interval``
apart and ρ = 2 never triggers after the first interval.

"Time" is whatever the caller passes: the step index (as the public code) or the scheduler's own
time (e.g. sigma). Rows are independent; nothing here knows about models.

**Storage** (:class:`CacheStorage`). The factors may be *stored* in another dtype than the features
are computed in (``bfloat16``, ``float16``, or fp8 ``float8_e4m3fn`` / ``float8_e5m2`` with one
float32 scale per token — per row and position but the last dimension — ``amax / fp8_max``), and in host memory instead of the compute
device (pinned when the compute device is CUDA). All arithmetic — the divided differences and the
Newton sum — runs in the features' own (compute) dtype on their own device: a stored factor is
converted back when read. With the default storage (the compute dtype, on the device) nothing is
converted or copied and the results are bit-identical to an unconverted cache.

**Block-level streaming.** Caching every block's branches of a large model is many tensors, and a
step needs them one block at a time. :meth:`TaylorCache.view` gives a read-only mapping whose
entries are forecast when first read (and not kept), and that starts copying the *next* entry's
factors to the device while the current one is used; :meth:`TaylorCache.sink` gives a mapping
that records each feature into the cache as soon as it is assigned (and prefetches the next
entry's old factors). A model call then holds one or two blocks' worth of factors on the device,
not all of them. On CUDA the host↔device copies run on one side stream of the cache (ordered
among themselves, synchronised with the compute stream by events); on CPU they are plain copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch

STORAGE_DTYPES: dict[str, torch.dtype | None] = {
    "compute": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
"""Storage dtype names (``cache.storage_dtype``); ``compute`` stores in the features' own dtype."""
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class CacheStorage:
    """How a :class:`TaylorCache` keeps its factors.

    Args:
        dtype: storage dtype; ``None`` keeps the features' own (compute) dtype.
        host: keep the factors in host memory (pinned when computing on CUDA) and copy each to the
            compute device when it is read.
    """

    dtype: torch.dtype | None = None
    host: bool = False
    host_capacity: int = 0  # host: bytes to page-lock at once, exactly (0: torch's per-tensor pinned allocator)

    @classmethod
    def named(cls, dtype: str = "compute", host: bool = False) -> "CacheStorage":
        """From a ``cache.storage_dtype`` name (see :data:`STORAGE_DTYPES`)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r} (allowed: {', '.join(STORAGE_DTYPES)})")
        return cls(STORAGE_DTYPES[dtype], host)

    @property
    def scaled(self) -> bool:
        """Whether stored factors carry scales (fp8: one per token)."""
        return self.dtype in _FP8

    def stored_bytes(self, nbytes: int, compute_itemsize: int) -> int:
        """Bytes that ``nbytes`` of features in a dtype of ``compute_itemsize`` bytes take when stored
        (fp8 scales, 4 bytes per token and factor — 0.13 % at HunyuanVideo's width — are not counted)."""
        if self.dtype is None:
            return nbytes
        return nbytes * torch.empty((), dtype=self.dtype).element_size() // compute_itemsize

    def describe(self) -> str:
        """``"bfloat16 on host"``-style label for reports."""
        name = "compute" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return f"{name} on {'host' if self.host else 'device'}"


class TaylorCache:
    """Per-row divided differences of a tuple of features.

    Args:
        order: maximum order ``m`` (0 = reuse).
        rows: number of rows.
        storage: how the factors are stored (default: the features' dtype, on their device). With
            ``host`` and ``host_capacity`` on CUDA, the factors come from one exact-size page-locked
            :class:`~specdist.engine.host_memory.PinnedArena` (torch's pinned allocator rounds each
            tensor up to a power of two); tensors beyond it fall back to that allocator.
        fallback_ratio: ρ of the order fallback (module doc); 0 = the plain Newton form.
    """

    def __init__(self, order: int, rows: int, storage: CacheStorage | None = None, fallback_ratio: float = 0.0) -> None:
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        if fallback_ratio < 0:
            raise ValueError(f"fallback_ratio must be >= 0, got {fallback_ratio}")
        self.order = order
        self.fallback_ratio = fallback_ratio
        self.rows = rows
        self.storage = storage or CacheStorage()
        self.factors: list[list[torch.Tensor]] = []  # [feature][j] -> [rows, ...] as stored
        self.scales: list[list[torch.Tensor] | None] = []  # fp8: [feature][j] -> [rows, ..., 1] float32 (device)
        self.kinds: list[tuple[torch.dtype, torch.device]] = []  # [feature] -> compute dtype and device
        self.nodes = torch.full((rows, order + 1), float("nan"), dtype=torch.float64)  # [rows, m+1] newest first
        self.filled = torch.zeros(rows, dtype=torch.long)  # [rows] full steps seen, capped at m+1
        self._staged: dict[int, tuple[torch.cuda.Event | None, list[torch.Tensor]]] = {}  # prefetched, as stored
        self._stream: torch.cuda.Stream | None = None  # host <-> CUDA copies (host storage only)
        self._arena = None  # PinnedArena, made on the first host allocation

    def close(self) -> None:
        """Release page-locked host memory (after the device finished its copies)."""
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def reset(self) -> None:
        """Forget everything (a new generation)."""
        self.factors, self.scales, self.kinds = [], [], []
        self._staged.clear()
        self.close()
        self.nodes.fill_(float("nan"))
        self.filled.zero_()

    def ready(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``[len(rows)]``: rows with at least one full step cached (can be forecast)."""
        filled = self.filled if rows is None else self.filled[rows.cpu()]
        return filled > 0

    @property
    def features(self) -> int:
        """Number of features recorded so far."""
        return len(self.factors)

    def nbytes(self) -> int:
        """Bytes held by the factors (and fp8 scales), wherever they are stored."""
        return self.host_bytes() + self.device_bytes()

    def host_bytes(self) -> int:
        """Bytes of factors kept in host memory (``storage.host``)."""
        return sum(t.numel() * t.element_size() for feat in self.factors for t in feat) if self.storage.host else 0

    def device_bytes(self) -> int:
        """Bytes of factors and scales kept on the compute device (staged prefetches not counted)."""
        scales = sum(t.numel() * t.element_size() for s in self.scales if s for t in s)
        if self.storage.host:
            return scales
        return scales + sum(t.numel() * t.element_size() for feat in self.factors for t in feat)

    def _all_rows(self, rows_cpu: torch.Tensor) -> bool:
        return len(rows_cpu) == self.rows and bool((rows_cpu == torch.arange(self.rows)).all())

    # ----- storage ---------------------------------------------------------------------------
    def _plain(self, feat: int) -> bool:
        """Whether feature ``feat`` is stored as computed (same dtype, on the device): no conversion,
        no copy. Host storage is never plain, also on a CPU run: there the host copies are real
        copies (so the path a GPU run takes, streams aside, runs on CPU too)."""
        dtype, _ = self.kinds[feat]
        return self.storage.dtype in (None, dtype) and not self.storage.host

    def _pinned(self, feat: int) -> bool:
        return self.storage.host and self.kinds[feat][1].type == "cuda"

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _host_ready(self) -> None:
        """Before the host reads stored factors itself: every queued copy into them is done."""
        if self._stream is not None:
            self._stream.synchronize()

    def _allocate(self, value: torch.Tensor) -> None:
        """Storage for a newly recorded feature shaped like ``value`` (``[n, ...]``)."""
        dtype, device = value.dtype, value.device
        self.kinds.append((dtype, device))
        feat = len(self.kinds) - 1
        shape = (self.rows, *value.shape[1:])
        sdtype = self.storage.dtype or dtype
        if self.storage.host:
            stored = [self._host_tensor(shape, sdtype, self._pinned(feat)) for _ in range(self.order + 1)]
        else:
            stored = [torch.zeros(shape, dtype=sdtype, device=device) for _ in range(self.order + 1)]
        self.factors.append(stored)
        self.scales.append([torch.ones((*shape[:-1], 1), dtype=torch.float32, device=device) for _ in stored]
                           if self.storage.scaled else None)

    def _host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """Zeroed host storage: from the exact-size arena when one is planned, else allocated alone."""
        from .host_memory import PinnedArena

        if self._arena is None and self.storage.host_capacity and pin:
            self._arena = PinnedArena(self.storage.host_capacity, pin=True)
        t = self._arena.take(shape, dtype) if self._arena is not None else None
        if t is not None:
            return t
        try:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)
        except RuntimeError as err:
            raise MemoryError(f"cannot keep a {list(shape)} {dtype} factor in pinned host memory "
                              f"({str(err).splitlines()[0]}); lower cache.max_host_bytes") from None

    def _encode(self, value: torch.Tensor, feat: int, j: int, rows: torch.Tensor | None) -> torch.Tensor:
        """``value`` (compute dtype, device) in the storage dtype, on the compute device; fp8 sets
        the rows' scales."""
        if self.storage.dtype is None or value.dtype == self.storage.dtype:
            return value
        if not self.storage.scaled:
            return value.to(self.storage.dtype)
        amax = value.detach().abs().amax(dim=-1, keepdim=True).float()  # per row and token: [n, ..., 1]
        scale = torch.where(amax > 0, amax / torch.finfo(self.storage.dtype).max, torch.ones_like(amax))
        if rows is None:
            self.scales[feat][j].copy_(scale)
        else:
            self.scales[feat][j][rows.to(scale.device)] = scale
        return (value.float() / scale).to(self.storage.dtype)

    def _decode(self, stored: torch.Tensor, feat: int, j: int, rows: torch.Tensor | None) -> torch.Tensor:
        """A stored factor (already on the compute device) in the compute dtype."""
        dtype, _ = self.kinds[feat]
        if not self.storage.scaled:
            return stored.to(dtype)
        scale = self.scales[feat][j]
        scale = scale if rows is None else scale[rows.to(scale.device)]
        return (stored.float() * scale).to(dtype)

    def _fetch(self, feat: int, rows: torch.Tensor, whole: bool) -> list[torch.Tensor]:
        """The stored factors of ``feat`` for ``rows`` on the compute device, still in the storage
        dtype: a prefetched copy when there is one, else a copy made now."""
        _, device = self.kinds[feat]
        staged = self._staged.pop(feat, None)
        if staged is not None and whole:
            event, tensors = staged
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in tensors:
                    t.record_stream(current)
            return tensors
        stored = self.factors[feat]
        if not self.storage.host:
            return stored if whole else [t[rows.to(t.device)] for t in stored]
        if whole and self._pinned(feat):  # pinned -> device, on the compute stream after the queued copies
            if self._stream is not None:
                torch.cuda.current_stream(device).wait_stream(self._stream)
            return [t.to(device, non_blocking=True) for t in stored]
        self._host_ready()
        rows_cpu = rows.cpu()
        return [(t if whole else t[rows_cpu]).to(device, copy=True) for t in stored]

    def _load(self, feat: int, rows: torch.Tensor, whole: bool) -> list[torch.Tensor]:
        """Factors ``0..m`` of ``feat`` for ``rows`` in the compute dtype on the compute device. For
        plain storage and every row these are the stored tensors themselves."""
        fetched = self._fetch(feat, rows, whole)
        if self._plain(feat):
            return fetched
        sel = None if whole else rows
        return [self._decode(t, feat, j, sel) for j, t in enumerate(fetched)]

    def _store(self, feat: int, new: list[torch.Tensor], rows: torch.Tensor, whole: bool) -> None:
        """Write factors ``new[0..m]`` (compute dtype and device) of ``feat`` for ``rows``."""
        factors = self.factors[feat]
        self._staged.pop(feat, None)  # a prefetched copy of the old values must not be read after this write
        if self._plain(feat):
            if whole:
                factors[0].copy_(new[0])
                factors[1:] = new[1:]
            else:
                for j in range(self.order + 1):
                    factors[j][rows] = new[j]
            return
        sel = None if whole else rows
        encoded = [self._encode(v, feat, j, sel) for j, v in enumerate(new)]
        if not self.storage.host:
            for j, v in enumerate(encoded):
                if whole:
                    factors[j].copy_(v)
                else:
                    factors[j][rows.to(v.device)] = v
            return
        device = self.kinds[feat][1]
        if whole and self._pinned(feat):  # device -> pinned on the copy stream, after the values are computed
            stream = self._copy_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for j, v in enumerate(encoded):
                    factors[j].copy_(v, non_blocking=True)
                    v.record_stream(stream)
            return
        self._host_ready()
        rows_cpu = rows.cpu()
        for j, v in enumerate(encoded):
            if whole:
                factors[j].copy_(v)
            else:
                factors[j][rows_cpu] = v.cpu()

    def prefetch(self, rows: torch.Tensor, features: range) -> None:
        """Start copying the factors of ``features`` for ``rows`` to the compute device (host storage
        on CUDA, all rows only; a no-op otherwise). The next read of those features uses the copy."""
        if not self.storage.host or not self._all_rows(rows.cpu()):
            return
        for feat in features:
            if feat >= len(self.factors) or feat in self._staged or not self._pinned(feat):
                continue
            device = self.kinds[feat][1]
            stream = self._copy_stream(device)
            with torch.cuda.stream(stream):
                tensors = [t.to(device, non_blocking=True) for t in self.factors[feat]]
                event = stream.record_event()
            self._staged[feat] = (event, tensors)

    # ----- recording -------------------------------------------------------------------------
    def update(self, rows: torch.Tensor, features: tuple[torch.Tensor, ...], time: float) -> None:
        """Record full-step ``features`` (each ``[len(rows), ...]``) of ``rows`` at ``time``."""
        self.write(rows, 0, features, time)
        self.advance(rows, time)

    def write(self, rows: torch.Tensor, first: int, features: tuple[torch.Tensor, ...], time: float) -> None:
        """Record features ``first, first + 1, …`` of a full step at ``time`` for ``rows`` (each
        ``[len(rows), ...]``), against the nodes before that step; :meth:`advance` closes the step.
        Features are numbered in the order they are first written."""
        rows_cpu = rows.cpu()
        whole = self._all_rows(rows_cpu)  # the common case: no gathers, factors replaced in place
        filled = self.filled[rows_cpu]
        gaps = time - self.nodes[rows_cpu]  # [n, m+1] float64; nan where no node
        for k, value in enumerate(features):
            feat = first + k
            if feat == len(self.factors):
                self._allocate(value)
            elif feat > len(self.factors):
                raise IndexError(f"feature {feat} written before feature {len(self.factors)}")
            shape = (-1,) + (1,) * (value.ndim - 1)
            old = self._load(feat, rows, whole) if self.order else []
            new = [value]
            for j in range(self.order):
                usable = filled > j
                inv = torch.where(usable, 1.0 / gaps[:, j], torch.zeros_like(gaps[:, j]))
                diff = torch.sub(new[j], old[j]).mul_(inv.to(value.device, value.dtype).view(shape))
                if not bool(usable.all()):
                    diff = torch.where(usable.to(value.device).view(shape), diff, torch.zeros_like(diff))
                new.append(diff)
            self._store(feat, new, rows, whole)

    def advance(self, rows: torch.Tensor, time: float) -> None:
        """Close a full step at ``time`` for ``rows``: its time becomes the newest node."""
        rows_cpu = rows.cpu()
        filled = self.filled[rows_cpu]
        shifted = torch.cat([torch.full((len(rows_cpu), 1), float(time), dtype=torch.float64),
                             self.nodes[rows_cpu, : self.order]], dim=1)
        self.nodes[rows_cpu] = shifted
        self.filled[rows_cpu] = torch.clamp(filled + 1, max=self.order + 1)

    # ----- forecasting -----------------------------------------------------------------------
    def forecast(self, rows: torch.Tensor, time: float) -> tuple[torch.Tensor, ...]:
        """Forecast every feature for ``rows`` at ``time`` (rows must be :meth:`ready`)."""
        return self.forecast_features(rows, time, range(len(self.factors)))

    def forecast_features(self, rows: torch.Tensor, time: float, features: range) -> tuple[torch.Tensor, ...]:
        """Forecast features ``features`` for ``rows`` at ``time`` (in the compute dtype and device)."""
        if not self.factors:
            raise RuntimeError("TaylorCache.forecast called before any full step was recorded")
        rows_cpu = rows.cpu()
        whole = self._all_rows(rows_cpu)
        offsets = torch.nan_to_num(time - self.nodes[rows_cpu], nan=0.0)  # [n, m+1] float64
        coeffs = torch.cumprod(offsets[:, : self.order], dim=1)  # [n, m]: Newton basis products
        if self.fallback_ratio > 0 and self.order >= 2:  # far beyond two close full steps: order 1
            nodes = self.nodes[rows_cpu]
            gap = (nodes[:, 0] - nodes[:, 1]).abs()
            far = torch.isfinite(gap) & (offsets[:, 0].abs() > self.fallback_ratio * gap)
            coeffs[far, 1:] = 0.0
        out = []
        for feat in features:
            stored_as_is = self._plain(feat) and whole and feat not in self._staged
            feats = self._load(feat, rows, whole)  # every row of plain storage: the stored tensors themselves
            ref = feats[0]
            shape = (-1,) + (1,) * (ref.ndim - 1)
            if self.order == 0:  # reuse: a copy, never the cache's own storage
                out.append(ref.clone() if stored_as_is else ref)
                continue
            c = coeffs.to(ref.device, ref.dtype)
            total = torch.addcmul(feats[0], feats[1], c[:, 0].view(shape))
            for j in range(2, self.order + 1):
                total.addcmul_(feats[j], c[:, j - 1].view(shape))
            out.append(total)
        return tuple(out)

    def base_features(self, rows: torch.Tensor, features: range) -> tuple[torch.Tensor, ...]:
        """The last full step's values (factor 0) of ``features`` for ``rows``, in the compute dtype
        (the reuse forecast; token level's ``reuse`` tokens)."""
        rows_cpu = rows.cpu()
        whole = self._all_rows(rows_cpu)
        return tuple(self._load(feat, rows, whole)[0] for feat in features)

    def view(self, rows: torch.Tensor, time: float, layout: list[tuple[str, int]]) -> "ForecastView":
        """A lazy mapping name → forecast tuple for the features laid out as ``layout`` (names and
        feature counts, in feature order); see :class:`ForecastView`."""
        return ForecastView(self, rows, time, layout)

    def sink(self, rows: torch.Tensor, time: float, layout: list[tuple[str, int]] | None = None) -> "RecordSink":
        """A mapping that records each assigned name's features at once; see :class:`RecordSink`."""
        return RecordSink(self, rows, time, layout)


def _ranges(layout: list[tuple[str, int]]) -> dict[str, range]:
    out, k = {}, 0
    for name, n in layout:
        out[name], k = range(k, k + n), k + n
    return out


class ForecastView(Mapping):
    """Forecasts of a :class:`TaylorCache`'s named features, computed when read and not kept.

    Reading ``view[name]`` first starts prefetching the factors of the entry after ``name`` (layout
    order, i.e. the order in which the model reads them), then forecasts ``name``. The first entry
    is prefetched when the view is made. Reading an entry twice forecasts it twice (same result).
    """

    def __init__(self, cache: TaylorCache, rows: torch.Tensor, time: float, layout: list[tuple[str, int]]) -> None:
        self.cache, self.rows, self.time = cache, rows, time
        self.ranges = _ranges(layout)
        names = list(self.ranges)
        self.next = dict(zip(names, names[1:]))
        if names:
            cache.prefetch(rows, self.ranges[names[0]])

    def __getitem__(self, name: str) -> tuple[torch.Tensor, ...]:
        feats = self.ranges[name]
        following = self.next.get(name)
        if following is not None:
            self.cache.prefetch(self.rows, self.ranges[following])
        return self.cache.forecast_features(self.rows, self.time, feats)

    def base(self, name: str) -> tuple[torch.Tensor, ...]:
        """The last full step's values of ``name`` (not a forecast; read-only)."""
        return self.cache.base_features(self.rows, self.ranges[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)


class RecordSink(MutableMapping):
    """Assigning ``sink[name] = tensors`` records them in a :class:`TaylorCache` at once (one full
    step at ``time`` for ``rows``), so a full model call never holds all of its recorded features.

    Names new to ``layout`` get the next feature numbers, in the order they arrive; when a name of a
    known layout arrives, the next name's old factors are prefetched. :meth:`finish` closes the
    step (:meth:`TaylorCache.advance`) and returns the layout. Reading returns nothing (the values
    are in the cache).
    """

    def __init__(self, cache: TaylorCache, rows: torch.Tensor, time: float,
                 layout: list[tuple[str, int]] | None = None) -> None:
        self.cache, self.rows, self.time = cache, rows, time
        self.layout: list[tuple[str, int]] = list(layout or [])
        self.ranges = _ranges(self.layout)
        names = list(self.ranges)
        self.next = dict(zip(names, names[1:]))
        self.written: set[str] = set()
        if names:
            cache.prefetch(rows, self.ranges[names[0]])

    def __setitem__(self, name: str, tensors: tuple[torch.Tensor, ...]) -> None:
        if name not in self.ranges:
            first = sum(n for _, n in self.layout)
            self.layout.append((name, len(tensors)))
            self.ranges[name] = range(first, first + len(tensors))
        following = self.next.get(name)
        if following is not None:
            self.cache.prefetch(self.rows, self.ranges[following])
        self.cache.write(self.rows, self.ranges[name].start, tuple(tensors), self.time)
        self.written.add(name)

    def finish(self) -> list[tuple[str, int]]:
        """Close the full step; returns the layout (names and feature counts in feature order)."""
        missing = [name for name in self.ranges if name not in self.written]
        if missing:
            raise RuntimeError(f"full step recorded without features {missing[:3]} (the model skipped them?)")
        self.cache.advance(self.rows, self.time)
        return list(self.layout)

    def __getitem__(self, name: str):
        raise KeyError(f"{name!r}: recorded features go straight into the cache")

    def __delitem__(self, name: str) -> None:
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.written)

    def __len__(self) -> int:
        return len(self.written)
