"""Measurement helpers: output quality, analytic FLOPs and GPU telemetry (DESIGN.md §6)."""

from .flops import SUPPORTED_MODELS, block_flops, flops_breakdown, forward_flops
from .quality import QualitySummary, compare, psnr, rel_l2, ssim
from .telemetry import GpuTelemetry, gpu_inventory

__all__ = [
    "SUPPORTED_MODELS",
    "GpuTelemetry",
    "QualitySummary",
    "block_flops",
    "compare",
    "flops_breakdown",
    "forward_flops",
    "gpu_inventory",
    "psnr",
    "rel_l2",
    "ssim",
]
