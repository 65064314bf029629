"""Mamba's selective scan with interchangeable backends, and its causal convolution.

``selective_scan`` has the signature and tensor layout of mamba_ssm's ``selective_scan_fn``;
``backend`` picks the implementation:

- ``cpu``: fused numba kernels (``cpu_kernel.py``), forward and backward, memory O(b*d*n*L/64)
  beyond the inputs; hands out per-sample gradients of A and D. Default for CPU tensors.
- ``torch``: eager PyTorch (``reference.py``), the definition of the result and the fallback
  for every device and dtype.
- ``cuda``: mamba_ssm's kernel, for CUDA tensors when ``mamba_ssm`` is importable.
- ``auto``: the fastest of these that can run the call (see ``resolve_backend``).

Importing this package needs neither numba, mamba_ssm nor CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from hymate.ssm.conv import causal_conv1d
from hymate.ssm.cuda import mamba_selective_scan_fn
from hymate.ssm.grad_sink import ScanGradSink
from hymate.ssm.reference import selective_scan_torch

__all__ = [
    "BACKENDS",
    "Backend",
    "ScanGradSink",
    "available_backends",
    "causal_conv1d",
    "resolve_backend",
    "selective_scan",
]

Backend = Literal["auto", "cpu", "torch", "cuda"]
BACKENDS: tuple[str, ...] = ("auto", "cpu", "torch", "cuda")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # mamba_ssm's kernel


@functools.cache
def _cpu_scan() -> Callable | None:
    """The numba backend, imported on first use (numba import + JIT cache load), or None."""
    try:
        from hymate.ssm.cpu import selective_scan_cpu
    except ImportError:
        return None
    return selective_scan_cpu


def available_backends() -> list[str]:
    """Backends that can run on this machine (for some inputs), fastest first; never "auto"."""
    found = ["cuda"] if mamba_selective_scan_fn() is not None else []
    if _cpu_scan() is not None:
        found.append("cpu")
    return [*found, "torch"]


def _under_functorch(tensors: tuple[Tensor | None, ...]) -> bool:
    """True inside vmap/grad transforms, which the fused kernels' Functions do not support."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return is_wrapped is not None and any(t is not None and is_wrapped(t) for t in tensors)


def _why_not(backend: str, u: Tensor, wrapped: bool, grad_sink: ScanGradSink | None) -> str:
    """Why ``backend`` cannot run this call, or "" when it can."""
    if backend == "cpu":
        if _cpu_scan() is None:
            return "numba is not importable"
        if u.device.type != "cpu":
            return f"the tensors are on {u.device}"
        if u.dtype not in _CPU_DTYPES:
            return f"it supports float32 and float64, not {u.dtype}"
    elif backend == "cuda":
        if grad_sink is not None:
            return "mamba_ssm's kernel gives no per-sample gradients for grad_sink"
        if not u.is_cuda:
            return f"the tensors are on {u.device}"
        if u.dtype not in _CUDA_DTYPES:
            return f"mamba_ssm's kernel takes float32, float16 and bfloat16, not {u.dtype}"
        if mamba_selective_scan_fn() is None:
            return "mamba_ssm is not importable (pip install 'hymate-fl[cuda]')"
    if wrapped and backend != "torch":
        return "its autograd Function has no functorch (vmap/grad) rule"
    return ""


def resolve_backend(backend: str = "auto", *tensors: Tensor | None, grad_sink: ScanGradSink | None = None) -> str:
    """The backend that runs a scan over ``tensors`` (u first): "cpu", "torch" or "cuda".

    "auto" takes the first of cuda, cpu, torch that can run the call: the fused kernels are
    ruled out by dtypes they do not take, a functorch transform, and (cuda) a grad_sink.
    An explicit backend that cannot run raises ValueError saying why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    u = tensors[0]
    wrapped = _under_functorch(tensors)
    if backend == "auto":
        return next(b for b in ("cuda", "cpu", "torch") if not _why_not(b, u, wrapped, grad_sink))
    reason = _why_not(backend, u, wrapped, grad_sink)
    if reason:
        raise ValueError(f"backend={backend!r} cannot run this scan: {reason}")
    return backend


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or u.shape[-1] == 0:
        raise ValueError(f"u must be (batch, d, L) with L >= 1, got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (d, n) = ({dim}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    expected = {
        "delta": (delta, (batch, dim, length)),
        "B": (B, (batch, n, length)),
        "C": (C, (batch, n, length)),
        "D": (D, (dim,)),
        "z": (z, (batch, dim, length)),
        "delta_bias": (delta_bias, (dim,)),
    }
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} given u {tuple(u.shape)} and A {tuple(A.shape)}"
                f", got {tuple(t.shape)} (only input-dependent B and C are supported)"
            )


def selective_scan(
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
    *,
    backend: Backend = "auto",
    grad_sink: ScanGradSink | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba's selective scan, as mamba_ssm's ``selective_scan_ref`` defines it.

    u, delta, z: (batch, d, L); A: (d, n); B, C: (batch, n, L); D, delta_bias: (d,).
    dt = softplus(delta + delta_bias) (softplus only if delta_softplus);
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, h_{-1} = 0;  y_t = C_t . h_t + D u_t;
    y = y * silu(z) if z is given. Returns y (batch, d, L) in u's dtype, and with
    return_last_state also h at the last step (batch, d, n).

    grad_sink: a ``ScanGradSink`` that the backward fills with per-sample gradients of A
    and D (for DP-SGD); supported by the cpu and torch backends.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    chosen = resolve_backend(backend, *args[:8], grad_sink=grad_sink)
    if grad_sink is not None:  # nothing stale survives a call whose backward never runs
        grad_sink.dA = grad_sink.dD = None
    if chosen == "cuda":
        return mamba_selective_scan_fn()(*args)
    if chosen == "cpu":
        return _cpu_scan()(*args, grad_sink=grad_sink)
    return selective_scan_torch(*args, grad_sink=grad_sink)
