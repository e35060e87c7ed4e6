"""Token-level caching (``cache.granularity: token``; DESIGN §2.3): which tokens a step between
full steps recomputes, and how a branch runs on those tokens only. Pure tensor code.

Every cached block keeps its block-level Taylor history (its residual branches over the full
steps, :mod:`~specdist.engine.forecast`). At a step between full steps each block's branch
outputs are, per token, one of three *levels*:

* **recompute** — the token's rows go through the branch for real (queries, attention output,
  MLP; keys and values of *every* token are projected from the block's current input, which for
  the other tokens already carries their forecast residuals);
* **forecast** — the Taylor forecast of the block-level history (re-gated by the block's current
  modulation, as at block level);
* **reuse** — the branch value of the last full step (order 0).

Two selections:

* :func:`rotating_index` (``taylorseer`` and ``speca``, ToCa-style fixed schedule): at the ``j``-th
  step after a full step the next ``k`` tokens of a fixed, spatially spread order (a golden-ratio
  stride) — every token is refreshed once per ``N / k`` steps; no reuse level; zero selection
  cost. speca compares the probe block's refreshed rows with their forecasts (its check costs
  nothing extra) and rolls a rejected step back as at block level.
* :func:`token_scores` + :func:`levels` (``specdiff``, self-speculation): the first cached block
  runs for real on every token (cost 1/L of a step, and that block is then exact); a token's
  score is its relative disagreement there between the forecast and the real branch outputs
  (normalised by the row's mean) — information from *this* step, the "speculative pass" of
  SpecDiff — plus ``token_history`` × the steps since the token was last computed (history).
  The top ``token_refresh`` share is recomputed in every later block, the bottom ``token_reuse``
  share reused, the rest forecast. One selection per step (not per block) keeps the overhead to
  one sort per stream. Why these choices: the first block's disagreement is the cheapest real
  signal of where the forecast is wrong at this step; the age term keeps a few high-error tokens
  from taking every refresh (measured on the tuning models: a pure error ranking lost to the
  fixed rotation, which refreshes every token in turn); tokens that barely move lose least by reuse.

Counts per stream are fixed (``round(share × tokens)``), so a batch's rows have equal shapes, and
every row is scored and selected on its own: a sample's result does not depend on its batch mates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.base import TokenBranch, gather_rows

JOINT_STREAMS = {"joint": ("video", "text"), "joint_text_first": ("text", "video")}
"""One sequence of several token streams, in its order: HunyuanVideo's single-stream blocks join
``[video, text]``, FLUX's ``[text, image]``."""


def _present(stream: str, lengths: dict[str, int]) -> list[tuple[str, int]]:
    """``(part, offset)`` of each stream present in joint stream ``stream``, in sequence order."""
    out, offset = [], 0
    for part in JOINT_STREAMS[stream]:
        if part in lengths:
            out.append((part, offset))
            offset += lengths[part]
    return out


def share_count(share: float, n: int) -> int:
    """Tokens of a stream of ``n`` at ``share`` (rounded half up, within ``0..n``)."""
    return max(0, min(n, int(math.floor(share * n + 0.5))))


def spread_order(n: int) -> torch.Tensor:
    """A fixed permutation of ``0..n-1`` whose prefixes are spread over the sequence: stride the
    golden ratio of ``n`` (the nearest stride coprime with ``n``)."""
    if n <= 1:
        return torch.arange(n)
    stride = max(1, round(n * 0.6180339887))
    while math.gcd(stride, n) != 1:
        stride += 1
    return (torch.arange(n) * stride) % n


def rotating_index(phase: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[rows, k]`` sorted token positions refreshed at the ``phase[r]``-th step after row ``r``'s
    last full step: entries ``phase·k … phase·k + k − 1`` (cyclically) of :func:`spread_order`."""
    order = spread_order(n)
    if k == 0 or n == 0:
        return torch.zeros((len(phase), 0), dtype=torch.long)
    pos = (phase.long()[:, None] * k + torch.arange(k)[None, :]) % n  # [rows, k]
    return order[pos].sort(dim=1).values


def _per_token_sq(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).flatten(2).sum(-1)  # [rows, n]


def token_scores(true: list[torch.Tensor], pred: list[torch.Tensor], age: torch.Tensor | None,
                 history: float, eps: float = 1e-12) -> torch.Tensor:
    """``[rows, n]`` score per token of one stream: the relative L2 disagreement of the forecast
    ``pred`` with the real outputs ``true`` (summed over the block's branches, each
    ``[rows, n, ...]``), divided by its mean over the row, plus ``history`` × ``age [rows, n]``
    (steps since the token was last computed)."""
    err = sum(_per_token_sq(t - p) for t, p in zip(true, pred))
    ref = sum(_per_token_sq(t) for t in true)
    score = torch.sqrt(err / (ref + eps))
    score = score / (score.mean(dim=1, keepdim=True) + eps)
    if history and age is not None:
        score = score + history * age.to(score.device, score.dtype)
    return score


def levels(score: torch.Tensor, refresh: float, reuse: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [rows, k] sorted, reuse [rows, n] bool)``: the ``refresh`` share of highest scores
    is recomputed, the ``reuse`` share of lowest reused (ties: lower position first)."""
    rows, n = score.shape
    k, u = share_count(refresh, n), share_count(reuse, n)
    u = min(u, n - k)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    index = order[:, :k].sort(dim=1).values
    mask = torch.zeros((rows, n), dtype=torch.bool, device=score.device)
    if u:
        mask.scatter_(1, order[:, n - u:], True)
    return index, mask


def scatter_rows(full: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``full [B, N, ...]`` with rows ``index [B, k]`` replaced by ``rows [B, k, ...]`` (a new tensor)."""
    if index.shape[1] == 0:
        return full
    idx = index.to(full.device).reshape(*index.shape, *([1] * (full.ndim - 2))).expand(-1, -1, *full.shape[2:])
    return torch.scatter(full, 1, idx, rows.to(full.dtype))


@dataclass
class TokenPlan:
    """The token levels of one speculative call (rows = the call's batch rows).

    Fixed schedule: ``phase [rows]`` set, the index made per stream when a block first asks.
    Self-speculation: ``spec_block`` set; the block hook fills ``index`` / ``reuse`` after that
    block ran (:meth:`select`)."""

    refresh: float
    reuse_share: float = 0.0
    history: float = 0.0
    phase: torch.Tensor | None = None  # [rows] steps since the last full step - 1 (fixed schedule)
    spec_block: int | None = None
    lengths: dict[str, int] = field(default_factory=dict)  # stream -> tokens
    context_tokens: int = 0  # tokens of a conditioning sequence attended to, never refreshed (PixArt's text)
    index: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> [rows, k] sorted
    reuse: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> [rows, n] bool
    age: dict[str, torch.Tensor] = field(default_factory=dict)  # stream -> [rows, n] steps since last computed
    select_seconds: float = 0.0
    kv_forecast: bool = False  # keys/values of unselected tokens forecast (cache.token_kv) rather than projected

    def stream_index(self, stream: str) -> torch.Tensor:
        """``[rows, k]`` selected positions of ``stream`` (a joint stream: each part's positions
        offset by the lengths of the parts before it, e.g. ``joint``: video, then text + N)."""
        if stream in JOINT_STREAMS:
            return torch.cat([self.stream_index(s) + offset for s, offset in _present(stream, self.lengths)], dim=1)
        if stream not in self.index:
            if self.phase is None:
                raise RuntimeError(f"token plan: stream {stream!r} used before the selection ran")
            n = self.lengths[stream]
            self.index[stream] = rotating_index(self.phase, n, share_count(self.refresh, n))
        return self.index[stream]

    def reuse_mask(self, stream: str) -> torch.Tensor | None:
        """``[rows, n]`` reused tokens of ``stream`` (``None`` where none)."""
        if stream in JOINT_STREAMS:
            present = [s for s, _ in _present(stream, self.lengths)]
            masks = [self.reuse.get(s) for s in present]
            if all(m is None for m in masks):
                return None
            ref = next(m for m in masks if m is not None)
            return torch.cat([m if m is not None else ref.new_zeros((ref.shape[0], self.lengths[s]))
                              for m, s in zip(masks, present)], dim=1)
        return self.reuse.get(stream)

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per stream ``(recomputed, reused)`` tokens of each row."""
        out = {}
        for s, n in self.lengths.items():
            k = self.stream_index(s).shape[1]
            r = self.reuse.get(s)
            out[s] = (k, 0 if r is None else int(r[0].sum()))
        return out

    def select(self, score: dict[str, torch.Tensor]) -> None:
        """Self-speculation: levels from the scores ``[rows, n]`` of each stream."""
        for s, sc in score.items():
            self.index[s], mask = levels(sc, self.refresh, self.reuse_share)
            if mask.any():
                self.reuse[s] = mask


def split_streams(values: tuple[torch.Tensor, ...], branch: TokenBranch, lengths: dict[str, int]) -> dict[str, list]:
    """A cached branch's outputs by stream (joint outputs cut into their parts by the lengths)."""
    out: dict[str, list] = {}
    for value, stream in zip(values, branch.streams):
        if stream in JOINT_STREAMS:
            for part, offset in _present(stream, lengths):
                if value.shape[1] > offset:
                    out.setdefault(part, []).append(value[:, offset:offset + lengths[part]])
        else:
            out.setdefault(stream, []).append(value)
    return out


def mix_reuse(forecast: tuple[torch.Tensor, ...], base: tuple[torch.Tensor, ...] | None, branch: TokenBranch,
              plan: TokenPlan) -> tuple[torch.Tensor, ...]:
    """``forecast`` with the reused tokens' rows taken from ``base`` (the last full step's values)."""
    if base is None or not plan.reuse:
        return forecast
    out = []
    for f, b, stream in zip(forecast, base, branch.streams):
        mask = plan.reuse_mask(stream)
        out.append(f if mask is None else torch.where(mask.to(f.device)[..., None], b, f))
    return tuple(out)


def run_branch(branch: TokenBranch, adapter: Any, module: Any, run: Any, args: tuple, kwargs: dict,
               plan: TokenPlan, forecast: tuple[torch.Tensor, ...] | None, is_tuple: bool) -> Any:
    """Run one branch submodule on the selected tokens. ``forecast`` (cached branches): its values
    for every token, into which the computed rows are scattered; ``None`` for a submodule that
    only feeds a cached branch (it returns the selected rows only)."""
    pack = (lambda t: tuple(t) if is_tuple else t[0])
    if branch.kind == "pass":
        return run(*args, **kwargs)
    if branch.kind == "rows":
        idx = plan.stream_index(branch.streams[0])
        if forecast is not None and idx.shape[1] == 0:
            return pack(forecast)
        x = args[0] if args else kwargs["hidden_states"]
        rest = args[1:] if args else ()
        kw = kwargs if args else {k: v for k, v in kwargs.items() if k != "hidden_states"}
        sub = run(gather_rows(x, idx), *rest, **kw)
        return sub if forecast is None else pack((scatter_rows(forecast[0], idx, sub),))
    if branch.kind == "gathered":
        idx = plan.stream_index(branch.streams[0])
        if idx.shape[1] == 0:
            return pack(forecast)
        return pack((scatter_rows(forecast[0], idx, run(*args, **kwargs)),))
    if branch.kind == "attention":
        index = {s: plan.stream_index(s) for s in (*plan.lengths, *branch.streams)}  # joint streams too
        if forecast is not None and all(i.shape[1] == 0 for i in index.values()):
            return pack(forecast)
        subs = adapter.token_attention(module, run, args, kwargs, index)
        if forecast is None:
            return subs if len(subs) > 1 else subs[0]
        return pack(tuple(scatter_rows(f, plan.stream_index(s), o) for f, s, o in zip(forecast, branch.streams, subs)))
    raise ValueError(f"unknown token branch kind {branch.kind!r}")


def call_cost(model: Any, plan: TokenPlan, start: int) -> float:
    """FLOPs of one token-level speculative call per row, as a fraction of a full forward: the
    embeddings and head, nothing for the uncached blocks before ``start``, the self-speculation
    block in full, every later block on its selected tokens
    (:func:`specdist.metrics.flops.token_block_flops`)."""
    from ..metrics.flops import block_flops, flops_breakdown, token_block_flops

    n, t = plan.lengths.get("video", 0), plan.lengths.get("text", plan.context_tokens)
    counts = plan.counts()
    kv, kt = counts.get("video", (0, 0))[0], counts.get("text", (0, 0))[0]
    full = flops_breakdown(model, n, t)
    partial = token_block_flops(model, n, t, kv, kt, kv_forecast=plan.kv_forecast)
    whole = block_flops(model, n, t)
    blocks = sum(whole[b] if b == plan.spec_block else partial[b] for b in range(start, len(partial)))
    return (full["embed_and_head"] + blocks) / full["total"]


def level_shares(plan: TokenPlan) -> tuple[float, float, float]:
    """``(recompute, forecast, reuse)`` shares of all tokens of a row in the partial blocks."""
    counts = plan.counts()
    total = sum(plan.lengths.values()) or 1
    k = sum(c[0] for c in counts.values())
    u = sum(c[1] for c in counts.values())
    return k / total, (total - k - u) / total, u / total
