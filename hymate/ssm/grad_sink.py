"""Where a scan backend leaves per-sample gradients of A and D for differential privacy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ScanGradSink:
    """Filled by the backward of a scan called with ``grad_sink=``; read right after it.

    DP-SGD clips each sample's gradient, so it needs A's and D's gradient per sample, not
    only their sum over the batch. ``dA[i]`` (batch, d, n) and ``dD[i]`` (batch, d) are
    sample i's contributions; ``dA.sum(0)`` and ``dD.sum(0)`` are what the scan adds to
    ``A.grad`` and ``D.grad``. ``dD`` stays None when the scan had no D. A later backward
    through the same call overwrites both.
    """

    dA: Tensor | None = None
    dD: Tensor | None = None
