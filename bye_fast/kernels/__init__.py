"""Compute kernels: one file per kernel, each with its torch reference twin."""

from bye_fast.kernels.attn_entropy import (
    AttnImageStats,
    attn_image_stats,
    attn_image_stats_reference,
    attn_image_stats_torch,
    attn_image_stats_triton,
    head_mean_entropy,
)

__all__ = [
    "AttnImageStats",
    "attn_image_stats",
    "attn_image_stats_reference",
    "attn_image_stats_torch",
    "attn_image_stats_triton",
    "head_mean_entropy",
]
