"""The latency rule against an independent, hand-computable reference.

The "transformer" here is analytic: its output at step ``i`` is ``g(i) · u`` whatever the state, with
``g(i) = 1 + q·i²``. An output-level order-1 forecast from the last two anchors ``a < b`` is then the
straight line through ``(a, g(a))`` and ``(b, g(b))``, and its rel-L2 error at step ``i`` is
``|ĝ(i) − g(i)| / g(i)`` in closed form. :func:`expected` replays the documented semantics with
those numbers (warm-up anchors, windows of K drafts verified in order, the first rejection or the
window's last step becomes the next anchor, K doubling after a fully accepted window and shrinking
to j*+1 after a rejection at j*), and the scheduler loop gives the final latents from the outputs
that were committed. A bug in :class:`~specdist.runtime.rule.Trajectory` that every backend shares
(``run_sequential`` is the reference of the backend tests) fails here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from specdist.engine.config import CacheConfig
from specdist.engine.decision import make_rule
from specdist.runtime.rule import Trajectory, run_sequential
from specdist.sampling import fresh_scheduler, init_latents

STEPS, Q, TAU = 16, 0.005, 0.0195  # TAU sits between two closed-form errors (0.01897, 0.02)
U = torch.linspace(0.5, 1.5, 16).reshape(1, 1, 4, 4)


def g(i: int) -> float:
    return 1.0 + Q * i * i


def line(a: int, b: int, i: int) -> float:
    return g(b) + (g(b) - g(a)) * (i - b) / (b - a)


def expected(lookahead: int, warmup: int, adaptive: bool) -> tuple[str, list[float], list[int]]:
    """Decisions, the committed output scale of every step and the window sizes, from the closed form."""
    decisions, outputs, anchors, windows = [], [], [], [1] * (warmup - 1)
    for i in range(warmup):
        decisions.append("F")
        outputs.append(g(i))
        anchors.append(i)
    c, k = warmup - 1, lookahead
    while c < STEPS - 1:
        size = min(k, STEPS - 1 - c)
        windows.append(size)
        a, b = anchors[-2], anchors[-1]
        for j in range(1, size + 1):
            i = c + j
            err = abs(line(a, b, i) - g(i)) / g(i)
            passed = err < TAU
            if passed and j < size:
                decisions.append("A")
                outputs.append(line(a, b, i))
                continue
            decisions.append("F" if passed else "R")
            outputs.append(g(i))
            anchors.append(i)
            if adaptive:
                k = min(lookahead, 2 * k) if passed else max(1, min(lookahead, j + 1))
            c = i
            break
    return "".join(decisions), outputs, windows


def scheduler_run(outputs: list[float]) -> torch.Tensor:
    sched = fresh_scheduler(DDIMScheduler(clip_sample=False))
    sched.set_timesteps(STEPS)
    x = init_latents(sched, torch.ones(1, 1, 4, 4), torch.device("cpu"))
    for i, t in enumerate(sched.timesteps):
        x = sched.step(outputs[i] * U, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("lookahead, warmup, adaptive", [(4, 3, True), (4, 3, False), (8, 2, True), (1, 2, True)])
def test_rule_equals_the_closed_form(lookahead, warmup, adaptive):
    cache = CacheConfig(granularity="output", order=1, tau0=TAU, beta=1.0, warmup=warmup)
    sched = fresh_scheduler(DDIMScheduler(clip_sample=False))
    sched.set_timesteps(STEPS)
    latents = init_latents(sched, torch.ones(1, 1, 4, 4), torch.device("cpu"))
    rule = make_rule("speca", cache, STEPS, 1, signal="output")
    traj = Trajectory(sched, latents, cache, rule, lookahead, adaptive=adaptive, reuse=False)
    calls = []

    def model(request):  # the analytic transformer: g(step) · u at any state
        calls.append(request.step)
        assert request.kind == "full"  # output level: the draft is the forecast, no model call
        return g(request.step) * U, (), {}

    final = run_sequential(traj, model)
    want, outputs, windows = expected(lookahead, warmup, adaptive)
    assert "".join(traj.stats.decisions) == want
    assert traj.stats.windows == windows  # K shrinks to j*+1 after a rejection, doubles after a full window
    if lookahead > 1:  # the case exercises acceptance and rejection (a window of 1 only commits anchors)
        assert "A" in want and "R" in want
    assert traj.stats.anchors == want.count("F") + want.count("R")
    torch.testing.assert_close(final, scheduler_run(outputs), rtol=1e-5, atol=1e-6)
    assert calls.count(0) == 1 and set(calls) <= set(range(STEPS))


def test_a_broken_window_rule_is_caught():
    """The reference is not a copy of the rule: committing the first rejected draft's *forecast*
    (instead of its reference output) would change the final latents, and the comparison sees it."""
    want, outputs, _ = expected(4, 3, True)
    j = want.index("R")
    a = [i for i, d in enumerate(want[:j]) if d in "FR"][-2:]
    broken = list(outputs)
    broken[j] = line(a[0], a[1], j)
    assert not torch.allclose(scheduler_run(broken), scheduler_run(outputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_run", [2, 5])
def test_max_run_bounds_committed_runs_as_in_the_engine(max_run):
    """The window asks the engine's rule before judging a draft: with every check passing, at most
    ``cache.max_run`` consecutive drafts are committed, then the step is an anchor (its reference
    output), exactly where the single-device engine would compute it fully."""
    cache = CacheConfig(granularity="output", order=1, tau0=1e9, beta=1.0, warmup=2, max_run=max_run)
    sched = fresh_scheduler(DDIMScheduler(clip_sample=False))
    sched.set_timesteps(STEPS)
    latents = init_latents(sched, torch.ones(1, 1, 4, 4), torch.device("cpu"))
    traj = Trajectory(sched, latents, cache, make_rule("speca", cache, STEPS, 1, signal="output"), 8, reuse=False)
    run_sequential(traj, lambda request: (g(request.step) * U, (), {}))
    decisions = "".join(traj.stats.decisions)
    runs = [len(r) for r in decisions.replace("R", "F").split("F") if r]
    assert max(runs) == max_run and "A" * (max_run + 1) not in decisions
    # the engine's pattern: warm-up, then max_run forecasts between full steps
    assert decisions[:2 + max_run + 1] == "FF" + "A" * max_run + "F"
