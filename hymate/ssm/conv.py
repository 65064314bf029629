"""Mamba's short causal depthwise convolution, fused on CUDA when ``causal_conv1d`` is there."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hymate.ssm.cuda import causal_conv1d_fn

ACTIVATIONS = (None, "silu", "swish")
FUSED_WIDTHS = (2, 3, 4)  # the kernel widths causal_conv1d's CUDA kernel is built for


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """y[b, c, t] = act(bias[c] + sum_j weight[c, j] * x[b, c, t - k + 1 + j]), zeros before t=0.

    x: (batch, channels, L); weight: (channels, k); bias: (channels,); activation: None,
    "silu" or "swish" (the same). Output (batch, channels, L): position t sees only x[..., :t+1].
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    k = weight.shape[-1]
    fused = causal_conv1d_fn() if x.is_cuda and k in FUSED_WIDTHS else None
    if fused is not None:
        return fused(x, weight, bias, activation)
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y) if activation is not None else y
