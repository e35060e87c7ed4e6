"""What each rank of a multi-process gang test runs (real gloo process groups on CPU).

:func:`run_world` starts ``world`` processes from a forkserver that has imported torch and diffusers
once (so a layout starts in well under a second after the first), joins them with a deadline and
re-raises a rank's traceback in the test. Each rank function asserts by itself; its rank 0 may
return a JSON-able summary that :func:`run_world` hands back.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

from specdist.engine.verify import forecast_error
from specdist.models import adapter_for
from specdist.models.base import Conditioning
from specdist.models.context_parallel import remove_hunyuan_video_mask
from specdist.runtime import agree
from specdist.runtime.gang import GangFailure, build_gangs, enable_context_parallel, gang_call, serve_gang, stop_gang
from specdist.runtime.parallel_dims import ParallelDims

HEADS, TEXT = 4, 8  # every tiny model: 4 heads (Ulysses up to 4), 8 text tokens (divisible by 2 and 4)
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "diffusers", "gang_ranks"])


# ----- tiny models and their inputs ----------------------------------------------------------
def tiny(family: str) -> torch.nn.Module:
    """A tiny random-weight transformer (the same weights on every rank)."""
    torch.manual_seed(0)
    if family == "flux":
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=HEADS, joint_attention_dim=16,
                                      pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[2, 2, 4]).eval()
    if family == "wan":
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=8,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2,
                                     rope_max_seq_len=32).eval()
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                          attention_head_dim=8, num_layers=1, num_single_layers=2,
                                          num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=False,
                                          text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()


def inputs(family: str, model: torch.nn.Module) -> tuple[torch.Tensor, Conditioning]:
    """Latents ``[2, ...]`` and guided conditioning (cond + uncond in one batch of 4) with 8 text
    tokens; HunyuanVideo's prompts are padded differently per sample (masks with 5, 1, 8, 3 valid)."""
    g = torch.Generator().manual_seed(1)
    adapter = adapter_for(model)
    shape = adapter.latent_shape(model, *((8, 8, 1) if family == "flux" else (8, 8, 3) if family == "wan" else (4, 4, 3)))
    latents = torch.randn(2, *shape, generator=g)
    if family == "flux":
        draw = lambda: (torch.randn(2, TEXT, 16, generator=g), torch.randn(2, 8, generator=g))
        return latents, adapter.conditioning(*draw(), uncond=draw(), guidance_scale=4.0)
    if family == "wan":
        return latents, adapter.conditioning(torch.randn(2, TEXT, 16, generator=g), torch.randn(2, TEXT, 16, generator=g), 4.0)

    def draw(valid: list[int]):
        mask = torch.arange(TEXT)[None] < torch.tensor(valid)[:, None]
        return torch.randn(2, TEXT, 16, generator=g), mask, torch.randn(2, 8, generator=g)
    return latents, adapter.conditioning(*draw([5, 1]), uncond=draw([8, 3]), guidance_scale=4.0)


def predict(model: torch.nn.Module, family: str, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    with torch.no_grad():
        return adapter_for(model).predict(model, latents, torch.tensor(700.0), cond)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----- the process harness ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world, *args)
        Path(f"{out}.{rank}.json").write_text(json.dumps({"ok": True, "result": result}))
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        Path(f"{out}.{rank}.json").write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        os._exit(1)


def run_world(fn: Callable, world: int, tmp: Path, *args: Any, deadline_s: float = 120.0,
              hung: set[int] = frozenset()) -> list[dict]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns each rank's record (``ok``,
    ``result`` or ``error``, ``exitcode``, ``alive_after``: it outlived the deadline).

    Ranks in ``hung`` are expected to block: once the others have ended they are killed, as a pool
    ends a failed gang (``reaped``).
    """
    port, out = _free_port(), str(tmp / f"{fn.__name__}")
    procs = [_CTX.Process(target=_entry, args=(fn, r, world, port, out, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for r, p in enumerate(procs):
        if r not in hung:
            p.join(max(end - time.monotonic(), 0.1))
    records = []
    for r, p in enumerate(procs):
        alive = p.is_alive()
        if alive:
            p.kill()
            p.join(5)
        path = Path(f"{out}.{r}.json")
        rec = json.loads(path.read_text()) if path.exists() else {"ok": False, "error": "no result"}
        rec.update(exitcode=p.exitcode, alive_after=alive and r not in hung, reaped=alive and r in hung)
        records.append(rec)
    return records


def check(records: list[dict]) -> list[Any]:
    """Every rank's result, or the first rank's traceback as the failure."""
    for r, rec in enumerate(records):
        assert rec["ok"], f"rank {r} failed:\n{rec['error']}"
    return [rec["result"] for rec in records]


# ----- rank functions --------------------------------------------------------------------------
def _gang(dims: ParallelDims, rank: int, timeout_s: float = 30.0):
    return build_gangs(dims, rank, torch.device("cpu"), timeout_s)


def equivalence(rank: int, world: int, families: list[str]) -> dict:
    """Gang of ``world`` (Ulysses ``world``): every family's CP output vs its single-process output."""
    gang = _gang(ParallelDims(workers=1, gang_size=world, ulysses_degree=world, coordinator=False), rank).gang
    out = {}
    for family in families:
        model = tiny(family)
        latents, cond = inputs(family, model)
        ref = predict(model, family, latents, cond)
        enable_context_parallel(model, adapter_for(model), gang)
        got = predict(model, family, latents, cond)
        out[family] = rel(got, ref)
        assert out[family] < 1e-5, (family, out[family])
        if family == "hunyuan_video":  # the model's own local mask is wrong once the text is split
            remove_hunyuan_video_mask(model)
            out["hunyuan_video_without_mask_hook"] = rel(predict(model, family, latents, cond), ref)
            assert out["hunyuan_video_without_mask_hook"] > 1e-3
    return out


def _registry(model: torch.nn.Module) -> dict:
    return {name: sorted(getattr(m, "_diffusers_hook").hooks) for name, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks}


def fallback_is_enable_parallelism(rank: int, world: int) -> dict:
    """Without an accelerator, :func:`enable_context_parallel` leaves the model exactly as diffusers'
    ``enable_parallelism`` (run here with the accelerator count patched to 1) does."""
    from unittest import mock

    gang = _gang(ParallelDims(workers=1, gang_size=world, ulysses_degree=world, coordinator=False), rank).gang
    a, b = tiny("hunyuan_video"), tiny("hunyuan_video")
    latents, cond = inputs("hunyuan_video", a)
    enable_context_parallel(a, adapter_for(a), gang)
    with mock.patch("torch.accelerator.device_count", return_value=1):
        enable_context_parallel(b, adapter_for(b), gang)  # takes model.enable_parallelism
    assert _registry(a) == _registry(b)
    procs = lambda m: [type(mod.processor).__name__ for mod in m.modules()
                       if getattr(getattr(mod, "processor", None), "_parallel_config", None) is not None]
    assert procs(a) == procs(b) and len(procs(a)) == 3  # dual + 2 single blocks; the refiner stays local
    assert torch.equal(predict(a, "hunyuan_video", latents, cond), predict(b, "hunyuan_video", latents, cond))
    return {"hooked_modules": len(_registry(a))}


def _fn(model: torch.nn.Module, cond: Conditioning) -> Callable[[dict, Any], torch.Tensor]:
    adapter = adapter_for(model)

    def fn(meta: dict, xs: Any) -> torch.Tensor:  # gang_call passes the inputs as a tuple
        x = xs[0] if isinstance(xs, tuple) else xs
        with torch.no_grad():
            return adapter.predict(model, x, torch.tensor(meta["timestep"]), cond.select(torch.tensor([meta["sample"]])))
    return fn


def gangs_of_a_world(rank: int, world: int) -> dict | None:
    """torchrun layout: coordinator (rank 0) + 2 gangs of 2. Each gang's leader runs its own job
    (speculation across gangs) with :func:`gang_call`; members get the inputs by broadcast; every
    leader's output equals the single-process call; decisions are agreed inside each gang."""
    dims = ParallelDims(workers=2, gang_size=2, ulysses_degree=2)
    view = _gang(dims, rank)
    assert dims.world_size == world and view.world_ctrl is not None
    if view.gang is None:  # the coordinator: no gang, no model
        dist.barrier(group=view.world_ctrl)
        return {"coordinator": rank}
    gang = view.gang
    model = tiny("hunyuan_video")
    latents, cond = inputs("hunyuan_video", model)
    fn = _fn(model, cond)
    meta = {"sample": gang.index, "timestep": 300.0 + 100 * gang.index}  # a different job per gang
    x = latents[gang.index:gang.index + 1]
    second = {**meta, "timestep": 50.0}
    ref, ref2 = fn(meta, x), fn(second, x)
    enable_context_parallel(model, adapter_for(model), gang)
    result = {}
    if gang.is_leader:
        out = gang_call(gang, fn, meta, x)
        result["rel"] = rel(out, ref)
        assert result["rel"] < 1e-5
        out2 = gang_call(gang, fn, second, x)  # a second job on the same gang
        assert rel(out2, ref2) < 1e-5, rel(out2, ref2)
        stop_gang(gang)
    else:
        assert serve_gang(gang, fn) == 2
    result.update(decisions(gang))
    dist.barrier(group=view.world_ctrl)
    return result


def decisions(gang) -> dict:
    """Every rank holds a different shard and different local errors; the agreed errors and reject
    masks are identical on all ranks, equal the whole tensor's, and the branch taken on them (a
    collective only on rejected rows) completes on every rank."""
    g = torch.Generator().manual_seed(5)
    true = torch.randn(3, 2 * gang.size, 16, generator=g)
    noise = torch.randn(3, 2 * gang.size, 16, generator=g)
    # rank-dependent forecast quality: row 0 bad only on the leader's shard, row 1 good, row 2 bad on the last shard
    scale = torch.full((3, gang.size), 0.01)
    scale[0, 0], scale[2, gang.size - 1] = 1.0, 1.0
    pred = true + noise * scale.repeat_interleave(2, dim=1)[..., None]
    shard = lambda t: t.chunk(gang.size, dim=1)[gang.member]
    out = {}
    for metric in ("rel_l1", "rel_l2", "cosine"):
        local = forecast_error(shard(pred), shard(true), metric)
        agreed = agree.sharded_error(shard(pred), shard(true), metric, gang.ctrl)
        whole = forecast_error(pred, true, metric)
        assert torch.allclose(agreed, whole, rtol=1e-5, atol=1e-7), (metric, agreed, whole)
        everyone = [torch.empty_like(agreed) for _ in range(gang.size)]
        dist.all_gather(everyone, agreed, group=gang.ctrl)
        assert all(torch.equal(e, agreed) for e in everyone)
        tau = float(whole[1] * 3)  # between the good row and the bad ones
        mine = ~(local <= tau)
        dist.all_gather(everyone, mine.float(), group=gang.ctrl)
        assert not all(torch.equal(e, everyone[0]) for e in everyone)  # alone, the ranks would branch apart
        reject = agree.agree_any(mine, gang.ctrl)
        dist.all_gather(everyone, reject.float(), group=gang.ctrl)
        assert all(torch.equal(e, reject.float()) for e in everyone)
        assert reject.tolist() == [True, False, True]
        for row in range(3):  # a data-dependent branch with a collective inside: no hang
            if reject[row]:
                t = torch.ones(1)
                dist.all_reduce(t, group=gang.ctrl)
                assert int(t) == gang.size
        out[metric] = [float(v) for v in agreed]
        # the engine's view of the same (SpeculativeStepper's agreement): the whole tensor's error,
        # and the values its decisions rest on identical on every rank
        engine = agree.GangAgreement(gang.ctrl)
        assert torch.equal(engine.error(shard(pred), shard(true), metric), agreed)
        same = engine.max(torch.stack([local, mine.float()]))
        dist.all_gather(everyone, same[0], group=gang.ctrl)
        assert all(torch.equal(e, same[0]) for e in everyone)
        assert same[1].bool().tolist() == [True, False, True]
    out["cancel"] = agree.agree_flag(gang.is_leader, gang.ctrl)  # the leader saw a cancel: everyone stops
    assert out["cancel"]
    return out


def member_fails(rank: int, world: int, how: str, timeout_s: float) -> dict:
    """A gang of ``world``: the last member dies (``kill``: SIGKILL) or hangs (``hang``) inside a
    block of the second call. The other ranks raise :class:`GangFailure` and return."""
    gang = _gang(ParallelDims(workers=1, gang_size=world, ulysses_degree=world, coordinator=False), rank,
                 timeout_s).gang
    model = tiny("hunyuan_video")
    latents, cond = inputs("hunyuan_video", model)
    enable_context_parallel(model, adapter_for(model), gang)
    calls = {"n": 0}
    if gang.member == world - 1:
        def sabotage(module, args):
            calls["n"] += 1
            if calls["n"] == 2:  # the second call's dual block
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
        model.transformer_blocks[0].register_forward_pre_hook(sabotage)
    fn = _fn(model, cond)
    start = time.perf_counter()
    try:
        if gang.is_leader:
            gang_call(gang, fn, {"sample": 0, "timestep": 500.0}, latents[:1])
            start = time.perf_counter()
            gang_call(gang, fn, {"sample": 0, "timestep": 400.0}, latents[:1])
        else:
            serve_gang(gang, fn)
    except GangFailure as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}
    raise AssertionError("the gang call survived a failed member")




def zoo_generation(rank: int, world: int, steps: int) -> dict:
    """The trained video zoo model (2 heads, 512 video tokens, 8 text tokens, real prompts padded to
    8): a ``full`` generation run SPMD on a gang (every rank runs the sampler, each model call is a
    collective) ends where the single-process generation ends."""
    from specdist.loading import load_model
    from specdist.metrics.quality import psnr
    from specdist.sampling import initial_noise, sample_full

    gang = _gang(ParallelDims(workers=1, gang_size=world, ulysses_degree=world, coordinator=False), rank).gang
    bundle = load_model("hunyuan-shapes-video")
    prompts = ["red square moving right", "blue circle moving up"]
    cond = bundle.encode(prompts, [], bundle.default_guidance, 0)
    assert not bool(cond.kwargs["encoder_attention_mask"].all())  # padded prompts: the mask hook matters
    noise = initial_noise(bundle.latent_shape(None, None, None), [0, 1])
    run = lambda: sample_full(bundle.transformer, bundle.adapter, bundle.scheduler, cond, noise, steps,
                              progress=False).latents
    with torch.no_grad():
        ref = run()
        enable_context_parallel(bundle.transformer, bundle.adapter, gang)
        got = run()
    out = {"rel": rel(got, ref), "psnr_worst": float(psnr(got.clamp(-1, 1), ref.clamp(-1, 1)).min())}
    assert out["rel"] < 1e-5, out
    return out
