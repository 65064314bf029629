"""The ``cpu`` backend: an autograd Function around the numba kernels of ``cpu_kernel``.

The kernels run on numpy views of the tensors (no copies). The Function uses the
``setup_context`` style (forward without ctx), which functorch requires of any Function it
meets; it has no vmap rule, so under vmap/grad transforms ``auto`` picks the torch backend.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hymate.ssm import cpu_kernel
from hymate.ssm.grad_sink import ScanGradSink


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _or_zeros(t: Tensor | None, shape: tuple[int, ...], like: Tensor) -> np.ndarray:
    """The kernels take every array; absent optional inputs become zeros of the right dtype."""
    return _np(t) if t is not None else np.zeros(shape, dtype=_np(like).dtype)


class _SelectiveScanCpu(torch.autograd.Function):
    """Inputs as prepared by ``selective_scan_cpu``: contiguous, one dtype, B/C time-major."""

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_sink):
        batch, dim, length = u.shape
        n = A.shape[1]
        n_chunks = math.ceil(length / cpu_kernel.CHUNK)
        out = torch.empty_like(u)
        chunk_states = u.new_empty(batch, dim, n_chunks, n)
        last_state = u.new_empty(batch, dim, n)
        cpu_kernel.sync_threads()
        with torch.profiler.record_function("hymate::scan_forward"):  # else torch.profiler misses it
            cpu_kernel.scan_forward(
                _np(u), _np(delta), _np(A), _np(B), _np(C),
                _or_zeros(D, (dim,), u), _or_zeros(z, (1, 1, 1), u), _or_zeros(delta_bias, (dim,), u),
                delta_softplus, z is not None,
                _np(out), _np(chunk_states), _np(last_state),
            )  # fmt: skip
        return out, last_state, chunk_states

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_sink = inputs
        chunk_states = output[2]
        ctx.mark_non_differentiable(chunk_states)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
        ctx.delta_softplus = delta_softplus
        ctx.grad_sink = grad_sink

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast, _dchunk_states):
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        batch, dim, length = u.shape
        n = A.shape[1]
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dlast = u.new_zeros(batch, dim, n) if dlast is None else dlast.contiguous()
        threads = cpu_kernel.sync_threads()
        # Channel groups per sample: enough parallel tasks for every thread even at batch 1,
        # while the partial sums of dB/dC (batch * groups * L * n) stay small.
        groups = min(dim, max(1, math.ceil(4 * threads / batch)))
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else u.new_empty(1, 1, 1)
        dA, dD, dbias = u.new_empty(batch, dim, n), u.new_empty(batch, dim), u.new_empty(batch, dim)
        dB, dC = u.new_zeros(batch, groups, length * n), u.new_zeros(batch, groups, length * n)
        with torch.profiler.record_function("hymate::scan_backward"):
            cpu_kernel.scan_backward(
                _np(u), _np(delta), _np(A), _np(B), _np(C),
                _or_zeros(D, (dim,), u), _or_zeros(z, (1, 1, 1), u), _or_zeros(delta_bias, (dim,), u),
                ctx.delta_softplus, z is not None, _np(chunk_states), _np(dout), _np(dlast),
                _np(du), _np(ddelta), _np(dz), _np(dA), _np(dD), _np(dbias), _np(dB), _np(dC),
            )  # fmt: skip
        sink: ScanGradSink | None = ctx.grad_sink
        if sink is not None:
            sink.dA = dA
            sink.dD = dD if D is not None else None
        needs = ctx.needs_input_grad
        return (
            du if needs[0] else None,
            ddelta if needs[1] else None,
            dA.sum(0) if needs[2] else None,
            dB.sum(1) if needs[3] else None,
            dC.sum(1) if needs[4] else None,
            dD.sum(0) if needs[5] else None,
            dz if needs[6] else None,
            dbias.sum(0) if needs[7] else None,
            None,
            None,
        )


def selective_scan_cpu(
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
    """Selective scan with the fused numba kernels; float32/float64 CPU tensors of u's dtype.

    Memory kept for the backward beyond the inputs: the states at chunk starts,
    (batch, dim, ceil(L / CHUNK), n), plus time-major copies of B and C.
    """
    dtype = u.dtype
    batch, n, length = B.shape

    def prepared(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    def time_major(t: Tensor) -> Tensor:  # (batch, n, L) -> (batch, L * n)
        return t.to(dtype).transpose(1, 2).reshape(batch, length * n)

    out, last_state, _ = _SelectiveScanCpu.apply(
        u.contiguous(), prepared(delta), prepared(A), time_major(B), time_major(C),
        prepared(D), prepared(z), prepared(delta_bias), delta_softplus, grad_sink,
    )  # fmt: skip
    return (out, last_state) if return_last_state else out
