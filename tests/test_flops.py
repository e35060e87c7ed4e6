"""Analytic FLOPs against torch's FLOP counter on tiny random instances of the five families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from specdist.metrics import SUPPORTED_MODELS, block_flops, flops_breakdown, forward_flops

diffusers = pytest.importorskip("diffusers")

# name -> (model factory, video tokens, text tokens, forward thunk factory, number of blocks)
Case = tuple[Callable[[], Any], int, int, Callable[[Any], Callable[[], Any]], int]


def _dit() -> Any:
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, norm_num_groups=1)


def _pixart() -> Any:
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                              cross_attention_dim=16, caption_channels=24, norm_num_groups=1)


def _flux() -> Any:
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            pooled_projection_dim=10, axes_dims_rope=(2, 2, 4), guidance_embeds=True)


def _hunyuan() -> Any:
    return diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                    attention_head_dim=8, num_layers=1, num_single_layers=2,
                                                    num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                                    text_embed_dim=12, pooled_projection_dim=10,
                                                    rope_axes_dim=(2, 2, 4))


def _wan() -> Any:
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                           in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32,
                                           num_layers=2, rope_max_seq_len=32)


CASES: dict[str, Case] = {
    "DiTTransformer2DModel": (_dit, 16, 0, lambda m: lambda: m(
        torch.randn(1, 4, 8, 8), timestep=torch.tensor([5]), class_labels=torch.tensor([1])), 2),
    "PixArtTransformer2DModel": (_pixart, 16, 5, lambda m: lambda: m(
        torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 24), timestep=torch.tensor([5]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}), 2),
    "FluxTransformer2DModel": (_flux, 16, 6, lambda m: lambda: m(
        torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 6, 12), pooled_projections=torch.randn(1, 10),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3),
        guidance=torch.tensor([3.0])), 3),
    "HunyuanVideoTransformer3DModel": (_hunyuan, 32, 7, lambda m: lambda: m(
        torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 7, 12),
        encoder_attention_mask=torch.ones(1, 7), pooled_projections=torch.randn(1, 10),
        guidance=torch.tensor([3000.0])), 3),
    "WanTransformer3DModel": (_wan, 32, 7, lambda m: lambda: m(
        torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 7, 12)), 2),
}


def _counted(thunk: Callable[[], Any]) -> FlopCounterMode:
    """torch's FLOP counter after one call (math SDPA so attention decomposes into counted bmm calls)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        thunk()
    return counter


def _measured(thunk: Callable[[], Any]) -> int:
    """Matmul FLOPs counted by torch."""
    return int(_counted(thunk).get_total_flops())


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    torch.manual_seed(0)
    return {name: case[0]().eval() for name, case in CASES.items()}


def test_all_supported_families_covered() -> None:
    assert set(CASES) == set(SUPPORTED_MODELS)


@pytest.mark.parametrize("name", list(CASES))
def test_block_count_and_positive(models: dict[str, Any], name: str) -> None:
    _, n, t, _, n_blocks = CASES[name]
    blocks = block_flops(models[name], n, t)
    assert len(blocks) == n_blocks
    assert all(isinstance(b, int) and b > 0 for b in blocks)
    assert forward_flops(models[name], n, t) > sum(blocks)
    parts = flops_breakdown(models[name], n, t)
    assert parts["total"] == parts["blocks"] + parts["embed_and_head"] == forward_flops(models[name], n, t)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_every_block_match_torch_flop_counter_exactly(models: dict[str, Any], name: str) -> None:
    from specdist.models import adapter_for

    model = models[name]
    _, n, t, make_thunk, _ = CASES[name]
    counter = _counted(make_thunk(model))
    assert forward_flops(model, n, t) == int(counter.get_total_flops())
    per_module = counter.get_flop_counts()  # "<Class>.<block path>" -> {op: flops}
    measured = [int(sum(per_module[f"{type(model).__name__}.{b}"].values()))
                for b in adapter_for(model).block_names(model)]
    assert block_flops(model, n, t) == measured


def test_dit_block_matches_flop_counter(models: dict[str, Any]) -> None:
    model = models["DiTTransformer2DModel"]
    block = model.transformer_blocks[0]
    n = 64  # attention (4 N^2 D) is a large share here, so leaving it out would fail the check
    x = torch.randn(1, n, 16)
    measured = _measured(lambda: block(x, timestep=torch.tensor([5]), class_labels=torch.tensor([1])))
    analytic = block_flops(model, n, 0)[0]
    assert analytic == measured
    attention = 4 * n * n * 16
    assert abs(analytic - attention - measured) > 0.10 * measured


def test_dual_blocks_come_first(models: dict[str, Any]) -> None:
    for name in ("FluxTransformer2DModel", "HunyuanVideoTransformer3DModel"):
        blocks = block_flops(models[name], 32, 8)
        # dual-stream blocks carry two MLPs and full projections, single-stream ones fuse them
        assert blocks[0] != blocks[-1] and blocks[1] == blocks[2]


@pytest.mark.parametrize("name", list(CASES))
def test_scaling_with_video_tokens(models: dict[str, Any], name: str) -> None:
    model = models[name]
    t = 0 if name == "DiTTransformer2DModel" else 4
    small, big = block_flops(model, 256, t)[-1], block_flops(model, 512, t)[-1]
    # linear parts double, attention quadruples: the ratio lies strictly between 2 and 4
    assert 1.9 < big / small < 4.0
    tiny, double = block_flops(model, 2, t)[-1], block_flops(model, 4, t)[-1]
    assert double > tiny


def test_wan_i2v_image_tokens() -> None:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32,
                                            num_layers=1, rope_max_seq_len=32, image_dim=20, added_kv_proj_dim=16)
    measured = _measured(lambda: model(torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                                       encoder_hidden_states=torch.randn(1, 512, 12),
                                       encoder_hidden_states_image=torch.randn(1, 20, 20)))
    assert forward_flops(model, 32, 512, image_tokens=20) == measured
    assert forward_flops(model, 32, 512) > forward_flops(model, 32, 512, image_tokens=20)  # default 257


def test_unsupported_model_raises() -> None:
    with pytest.raises(ValueError, match=r"Linear.*DiTTransformer2DModel"):
        block_flops(torch.nn.Linear(2, 2), 4, 0)
    with pytest.raises(ValueError, match="video_tokens"):
        forward_flops(_dit(), -1, 0)
