"""Optional CUDA kernels from the ``mamba_ssm`` and ``causal_conv1d`` packages.

Neither package is required: they are imported on first use, and only when CUDA is present,
so that importing ``hymate.ssm`` never needs them (or a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache
def mamba_selective_scan_fn() -> Callable | None:
    """mamba_ssm's fused ``selective_scan_fn``, or None without CUDA or mamba_ssm."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:  # not installed, or built against another torch/CUDA
        return None
    return selective_scan_fn


@functools.cache
def causal_conv1d_fn() -> Callable | None:
    """The ``causal_conv1d`` package's fused kernel, or None without CUDA or the package."""
    if not torch.cuda.is_available():
        return None
    try:
        from causal_conv1d import causal_conv1d_fn as fn
    except ImportError:
        return None
    return fn
