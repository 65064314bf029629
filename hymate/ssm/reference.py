"""The ``torch`` backend: plain eager PyTorch that defines what the scan means.

A sequential loop over time with autograd doing the backward; it runs on any device and
dtype and is the fallback when no fused kernel applies. The loop walks ``unbind()`` slices:
indexing ``x[:, :, t]`` inside an autograd loop makes the backward O(L^2), because every
slice's backward allocates a zero tensor of the full input's size. On CPU a loop like this
beats the parallel (Blelloch) and chunked closed forms, which stream whole (batch, L, d, n)
tensors through memory; it still stores O(batch * L * d * n) for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hymate.ssm.grad_sink import ScanGradSink


def _per_sample(param: Tensor, batch: int, store) -> Tensor:
    """A copy of ``param`` per sample whose gradient (batch, *param.shape) goes to ``store``.

    Autograd sums the copies' gradients back into ``param``, so ``param.grad`` is unchanged.
    """
    copies = param.unsqueeze(0).expand(batch, *param.shape).clone()
    if copies.requires_grad:
        copies.register_hook(store)
    return copies


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    grad_sink: ScanGradSink | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``hymate.ssm.selective_scan``; computes in float32 for 16-bit inputs."""
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    batch, dim, _ = u.shape
    if grad_sink is not None:
        A = _per_sample(A, batch, lambda g: setattr(grad_sink, "dA", g))  # (batch, d, n)
        if D is not None:
            D = _per_sample(D.to(compute), batch, lambda g: setattr(grad_sink, "dD", g))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    h = u.new_zeros(batch, dim, A.shape[-1])
    ys = []
    for u_t, dt_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        decay = torch.exp(dt_t.unsqueeze(-1) * A)  # (batch, d, n)
        h = torch.addcmul((dt_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1), decay, h)
        ys.append(torch.bmm(h, C_t.unsqueeze(-1)).squeeze(-1))  # (batch, d)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, h.to(dtype_in)) if return_last_state else y
