"""Numba kernels of the selective scan on CPU: a fused forward and a fused backward.

Why a hand-written kernel: on CPU every eager formulation streams (batch, L, d, n) tensors
through memory and stores them for the backward (about 2 GB at b=32, d=128, n=16, L=1024),
while the real work is a few multiply-adds per state element. Here one (batch, channel) row
keeps its state in a small local array, the forward saves the state only at chunk starts,
and the backward recomputes the states of one chunk at a time into buffers that stay in L1.

Array layout (prepared by ``cpu.py``); all arrays share one dtype, float32 or float64, and
are C-contiguous:
    u, delta, z, out, dout, du, ddelta, dz: (batch, dim, L)
    A: (dim, n)
    B, C: (batch, L * n), time-major, so the n values of one step are contiguous
    D, delta_bias: (dim,)
    chunk_states: (batch, dim, n_chunks, n), the state before each chunk of ``CHUNK`` steps
    dB, dC: (batch, groups, L * n), partial sums over the channels of each group

Everything the kernels inline (the exp included) lives in this one file on purpose: numba's
on-disk cache is invalidated only when the file defining the cached function changes.
"""

import importlib.util
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _writable_cache_dir() -> str | None:
    """A cache directory for numba when it cannot write beside this file, else None.

    numba itself falls back to ~/.cache/numba, but raises at import when that is not
    writable either (read-only home in a container); the temp dir always is.
    """
    if os.environ.get("NUMBA_CACHE_DIR") or os.access(Path(__file__).parent, os.W_OK):
        return None
    for candidate in (
        Path.home() / ".cache" / "hymate" / "numba",
        Path(tempfile.gettempdir()) / "hymate-numba",
    ):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return str(candidate)
    return None


# Both settings must be in place before numba's first parallel launch / first cached function.
# OpenMP lets numba's pool and torch's run one after another without oversubscription.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
# numba's pool is sized once, at import: as many threads as torch uses. A process confined to
# one thread (a Ray actor gets OMP_NUM_THREADS=1) then has no idle numba threads busy-waiting
# on the other cores; two single-thread trainings side by side took 20 s each that way,
# instead of 3 s.
os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))
_cache_dir = _writable_cache_dir()
if _cache_dir is not None:
    os.environ["NUMBA_CACHE_DIR"] = _cache_dir

import numba  # noqa: E402  (configured through the environment above)
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402


def sync_threads() -> int:
    """Give numba as many threads as torch uses now (its pool and torch's run one after another)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


# numba reads the environment at import; if it was imported before this module, set its config.
numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]
if numba.config.THREADING_LAYER == "omp" and not importlib.util.find_spec("numba.np.ufunc.omppool"):
    numba.config.THREADING_LAYER = "default"
if _cache_dir is not None:
    numba.config.CACHE_DIR = _cache_dir

CHUNK = 64
"""Steps between saved states. The backward's per-chunk buffers (a few CHUNK x n arrays)
stay in L1 for n <= 32, and saved state is 1/CHUNK of a full (batch, dim, L, n) history."""

_SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default: identity above it
# Reassociation lets sums over the state dimension vectorise; contraction allows FMAs.
_FASTMATH = {"reassoc", "contract"}


_SCALAR_OPTIONS = {"fastmath": {"contract"}, "error_model": "numpy"}
"""For the scalar functions below: contraction only (reassociation would destroy the exactness
of the range reductions), and IEEE division without Python's zero-division branch."""


# --- a vectorisable exp ----------------------------------------------------------------------
# The pip llvmlite has no SVML, so math.exp in a loop is a scalar libm call (about 8x slower
# than this). Range reduction exp(x) = 2^k exp(r), |r| <= ln2/2, then a polynomial for exp(r);
# 2^k is built from its bits, as 2^(k//2) * 2^(k - k//2) so that results down to the
# subnormals and up to the overflow to inf come out right. Accuracy against the correctly
# rounded result: at most ~1 ulp in float32 (Cephes' expf polynomial) and in float64
# (Taylor series to degree 13). Literal constants are typed so float32 stays float32.


@intrinsic
def _bits_as_float(typingctx, bits):
    """Reinterpret an int32/int64 bit pattern as float32/float64 (no conversion)."""
    if bits == types.int32:
        result, llvm_type = types.float32, ir.FloatType()
    elif bits == types.int64:
        result, llvm_type = types.float64, ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return result(bits), codegen


_F32 = np.float32
_X32_MIN, _X32_MAX = _F32(-104.0), _F32(89.0)  # beyond: 0 and inf
_LOG2E32, _HALF32, _ONE32 = _F32(1.4426950408889634), _F32(0.5), _F32(1.0)
_LN2_HI32, _LN2_LO32 = _F32(0.693359375), _F32(-2.12194440e-4)
_P0, _P1, _P2, _P3, _P4, _P5 = (
    _F32(1.9875691500e-4),
    _F32(1.3981999507e-3),
    _F32(8.3334519073e-3),
    _F32(4.1665795894e-2),
    _F32(1.6666665459e-1),
    _F32(5.0000001201e-1),
)
_I32_ONE, _I32_BIAS, _I32_SHIFT = np.int32(1), np.int32(127), np.int32(23)

_X64_MIN, _X64_MAX = -746.0, 710.0
_LOG2E64 = 1.4426950408889634
_LN2_HI64, _LN2_LO64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_Q = tuple(1.0 / math.factorial(k) for k in range(14))
_I64_ONE, _I64_BIAS, _I64_SHIFT = np.int64(1), np.int64(1023), np.int64(52)


def fast_exp(x):
    """exp(x) for float32/float64 scalars inside numba kernels (see the overload below)."""
    raise NotImplementedError("fast_exp is only callable from numba-compiled code")


@overload(fast_exp, inline="always", jit_options=_SCALAR_OPTIONS)
def _fast_exp_impl(x):
    if x == types.float32:

        def exp32(x):
            x = min(max(x, _X32_MIN), _X32_MAX)
            k = np.floor(x * _LOG2E32 + _HALF32)
            r = x - k * _LN2_HI32 - k * _LN2_LO32
            p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
            y = p * (r * r) + r + _ONE32
            k1 = np.int32(np.int32(k) >> _I32_ONE)
            k2 = np.int32(np.int32(k) - k1)
            scale1 = _bits_as_float(np.int32((k1 + _I32_BIAS) << _I32_SHIFT))
            scale2 = _bits_as_float(np.int32((k2 + _I32_BIAS) << _I32_SHIFT))
            return y * scale1 * scale2

        return exp32
    if x == types.float64:

        def exp64(x):
            x = min(max(x, _X64_MIN), _X64_MAX)
            k = np.floor(x * _LOG2E64 + 0.5)
            r = x - k * _LN2_HI64 - k * _LN2_LO64
            y = _Q[13]
            for i in range(12, -1, -1):  # Horner; unrolled by LLVM (constant trip count)
                y = y * r + _Q[i]
            k1 = np.int64(k) >> _I64_ONE
            k2 = np.int64(k) - k1
            scale1 = _bits_as_float(np.int64((k1 + _I64_BIAS) << _I64_SHIFT))
            scale2 = _bits_as_float(np.int64((k2 + _I64_BIAS) << _I64_SHIFT))
            return y * scale1 * scale2

        return exp64
    return None


# softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(y) = 2 atanh(s), s = y / (2 + y) in
# (0, 1/3]: the atanh series 2 s (1 + s^2/3 + s^4/5 + ...) has positive terms only, so it is
# accurate for every x, and it vectorises (no log call). Terms kept: (1/9)^k / (2k+1) < ulp.
_ATANH32 = tuple(_F32(1.0 / (2 * k + 1)) for k in range(8))
_ATANH64 = tuple(1.0 / (2 * k + 1) for k in range(18))


def softplus_and_grad(x):
    """(softplus(x), sigmoid(x)) with torch's threshold, inside numba kernels."""
    raise NotImplementedError("softplus_and_grad is only callable from numba-compiled code")


def _softplus_impl(coefficients, dtype):
    zero, one, two = dtype(0.0), dtype(1.0), dtype(2.0)
    threshold = dtype(_SOFTPLUS_THRESHOLD)
    last = len(coefficients) - 1

    def softplus(x):
        y = fast_exp(-abs(x))
        s = y / (two + y)
        s2 = s * s
        series = coefficients[last]
        for i in range(last - 1, -1, -1):
            series = series * s2 + coefficients[i]
        value = max(x, zero) + two * s * series
        sigmoid_x = (one if x >= zero else y) / (one + y)
        # Above the threshold torch returns x and gradient 1 exactly; so do we.
        return (x, one) if x > threshold else (value, sigmoid_x)

    return softplus


@overload(softplus_and_grad, inline="always", jit_options=_SCALAR_OPTIONS)
def _softplus_and_grad_impl(x):
    if x == types.float32:
        return _softplus_impl(_ATANH32, _F32)
    if x == types.float64:
        return _softplus_impl(_ATANH64, np.float64)
    return None


def sigmoid(x):
    """1 / (1 + exp(-x)) inside numba kernels; 0 and 1 at the extremes, never NaN."""
    raise NotImplementedError("sigmoid is only callable from numba-compiled code")


@overload(sigmoid, inline="always", jit_options=_SCALAR_OPTIONS)
def _sigmoid_impl(x):
    if x in (types.float32, types.float64):
        one = _F32(1.0) if x == types.float32 else 1.0

        def impl(x):
            return one / (one + fast_exp(-x))

        return impl
    return None


# --- per-chunk steps shared by the forward and the backward -----------------------------------
# Loop-writing rules that decide whether LLVM vectorises (each measured 2-5x on this code):
# - numba wraps negative indices (a select on every access) unless it can prove an index is
#   non-negative, which it mostly cannot for t * n + k: inner loops index with uint64 (_U).
# - numba arrays may alias as far as LLVM knows: load per-step scalars (x[t], dy[t]) into
#   locals before the inner loop, and keep each loop to a few arrays.
# - error_model="numpy" keeps divisions free of Python's zero-division branch.
_U = np.uint64


@njit(fastmath=_FASTMATH, error_model="numpy")
def _discretise(delta_row, bias, softplus, t0, steps, dt, dt_grad):
    """dt = softplus?(delta + bias) for one chunk, and d dt / d delta into dt_grad."""
    one = dt.dtype.type(1.0)
    if softplus:
        for t in range(steps):
            dt[t], dt_grad[t] = softplus_and_grad(delta_row[_U(t0 + t)] + bias)
    else:
        for t in range(steps):
            dt[t] = delta_row[_U(t0 + t)] + bias
            dt_grad[t] = one


@njit(fastmath=_FASTMATH, error_model="numpy")
def _decays(dt, a_row, steps, decay):
    """decay[t*n + k] = exp(dt[t] * A[k]) for one chunk; one flat loop so the exp vectorises."""
    n = a_row.shape[0]
    for t in range(steps):
        dtt = dt[t]
        for k in range(n):
            decay[_U(t * n + k)] = dtt * a_row[k]
    for j in range(steps * n):
        decay[_U(j)] = fast_exp(decay[_U(j)])


@njit(fastmath=_FASTMATH, error_model="numpy")
def _states(decay, x, B_row, base, steps, hs):
    """hs[(t+1)*n + k] = decay * hs[t*n + k] + x[t] B[t, k]: the recurrence, from hs[:n].

    base (uint64) is the chunk's offset t0 * n into the time-major row of B."""
    n = _U(hs.shape[0] // (CHUNK + 1))
    for t in range(steps):
        xt = x[t]
        for k in range(n):
            j = _U(t) * n + k
            hs[j + n] = decay[j] * hs[j] + xt * B_row[base + j]


@njit(fastmath=_FASTMATH, error_model="numpy")
def _outputs(C_row, hs, u_row, D_d, base, t0, steps, y):
    """y[t] = C_t . h_t + D u_t, without the gate."""
    n = _U(hs.shape[0] // (CHUNK + 1))
    for t in range(steps):
        acc = y.dtype.type(0.0)
        for k in range(n):
            j = _U(t) * n + k
            acc += C_row[base + j] * hs[j + n]
        y[t] = acc + D_d * u_row[_U(t0 + t)]


# --- forward ----------------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, has_z, out, chunk_states, last_state):
    """Writes y (gated by silu(z) when has_z) into out, chunk_states and last_state."""
    batch, dim, length = u.shape
    n = A.shape[1]
    n_chunks = chunk_states.shape[2]
    for row in prange(batch * dim):
        b = row // dim
        d = row - b * dim
        u_row, out_row = u[b, d], out[b, d]
        dt = np.empty(CHUNK, dtype=u.dtype)
        dt_grad = np.empty(CHUNK, dtype=u.dtype)
        x = np.empty(CHUNK, dtype=u.dtype)  # dt * u
        y = np.empty(CHUNK, dtype=u.dtype)
        decay = np.empty(CHUNK * n, dtype=u.dtype)
        hs = np.zeros((CHUNK + 1) * n, dtype=u.dtype)  # hs[t*n:(t+1)*n]: state before step t
        for c in range(n_chunks):
            t0 = c * CHUNK
            steps = min(CHUNK, length - t0)
            chunk_states[b, d, c, :] = hs[:n]
            _discretise(delta[b, d], delta_bias[d], softplus, t0, steps, dt, dt_grad)
            _decays(dt, A[d], steps, decay)
            for t in range(steps):
                x[t] = dt[t] * u_row[_U(t0 + t)]
            _states(decay, x, B[b], _U(t0 * n), steps, hs)
            _outputs(C[b], hs, u_row, D[d], _U(t0 * n), t0, steps, y)
            if has_z:
                z_row = z[b, d]
                for t in range(steps):
                    zt = z_row[_U(t0 + t)]
                    y[t] *= zt * sigmoid(zt)
            out_row[t0 : t0 + steps] = y[:steps]
            hs[:n] = hs[steps * n : (steps + 1) * n]
        last_state[b, d, :] = hs[:n]


# --- backward ---------------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def scan_backward(
    u, delta, A, B, C, D, z, delta_bias, softplus, has_z, chunk_states, dout, dlast,
    du, ddelta, dz, dA, dD, dbias, dB, dC,
):  # fmt: skip
    """Gradients of every input, given dout (grad of out) and dlast (grad of the last state).

    dA (batch, dim, n), dD and dbias (batch, dim) are written per sample; dB and dC, which
    sum over channels, are accumulated (+=) into one partial sum per (sample, channel group),
    so parallel tasks never write the same memory. The adjoint of the state runs backwards:
    lam_t = C_t dy_t + exp(dt_{t+1} A) lam_{t+1}, with lam_{L-1} = C dy + dlast.
    """
    batch, dim, length = u.shape
    n = A.shape[1]
    nu = _U(n)
    n_chunks = chunk_states.shape[2]
    groups = dB.shape[1]
    per_group = (dim + groups - 1) // groups
    one = u.dtype.type(1.0)
    zero = u.dtype.type(0.0)
    for task in prange(batch * groups):
        b = task // groups
        g = task - b * groups
        B_row, C_row, dB_row, dC_row = B[b], C[b], dB[b, g], dC[b, g]
        dt = np.empty(CHUNK, dtype=u.dtype)
        dt_grad = np.empty(CHUNK, dtype=u.dtype)
        x = np.empty(CHUNK, dtype=u.dtype)  # dt * u
        dy = np.empty(CHUNK, dtype=u.dtype)  # grad of the ungated output
        s_a = np.empty(CHUNK, dtype=u.dtype)  # sum_k q A: grad of dt through the decay
        s_b = np.empty(CHUNK, dtype=u.dtype)  # sum_k lam B: grad of dt * u
        # One spare row each: the adjoint reads row `steps` as (decay 1, carried-in lam).
        decay = np.empty((CHUNK + 1) * n, dtype=u.dtype)
        lam = np.empty((CHUNK + 1) * n, dtype=u.dtype)
        hs = np.empty((CHUNK + 1) * n, dtype=u.dtype)  # hs[t*n:(t+1)*n]: state before step t
        carry = np.empty(n, dtype=u.dtype)  # exp(dt_{t0} A) lam_{t0}, handed to the chunk before
        dA_acc = np.empty(n, dtype=u.dtype)
        for d in range(g * per_group, min(dim, (g + 1) * per_group)):
            u_row, dout_row, du_row, ddelta_row = u[b, d], dout[b, d], du[b, d], ddelta[b, d]
            a_row = A[d]
            D_d = D[d]
            carry[:] = dlast[b, d]
            dA_acc[:] = zero
            dD_acc = zero
            dbias_acc = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * CHUNK
                steps = min(CHUNK, length - t0)
                base = _U(t0 * n)
                _discretise(delta[b, d], delta_bias[d], softplus, t0, steps, dt, dt_grad)
                _decays(dt, a_row, steps, decay)
                for t in range(steps):
                    x[t] = dt[t] * u_row[_U(t0 + t)]
                hs[:n] = chunk_states[b, d, c]
                _states(decay, x, B_row, base, steps, hs)

                for t in range(steps):
                    dy[t] = dout_row[_U(t0 + t)]
                if has_z:  # through the gate y * silu(z), with y recomputed into s_a
                    z_row, dz_row = z[b, d], dz[b, d]
                    _outputs(C_row, hs, u_row, D_d, base, t0, steps, s_a)
                    for t in range(steps):
                        zt = z_row[_U(t0 + t)]
                        sig = sigmoid(zt)
                        gt = dy[t]
                        dz_row[_U(t0 + t)] = gt * s_a[t] * sig * (one + zt * (one - sig))
                        dy[t] = gt * zt * sig

                lam[steps * n : (steps + 1) * n] = carry
                decay[steps * n : (steps + 1) * n] = one
                for rt in range(steps):
                    t = _U(steps - 1 - rt)
                    gt = dy[t]
                    for k in range(nu):
                        j = t * nu + k
                        lam[j] = C_row[base + j] * gt + decay[j + nu] * lam[j + nu]
                carry[:] = decay[:n] * lam[:n]

                # q = lam * decay * h_{t-1}, the grad of log(decay), in place of decay.
                for j in range(steps * n):
                    decay[_U(j)] = lam[_U(j)] * decay[_U(j)] * hs[_U(j)]
                for t in range(steps):
                    acc = zero
                    for k in range(nu):
                        acc += decay[_U(t) * nu + k] * a_row[k]
                    s_a[t] = acc
                t = 0
                while t + 4 <= steps:  # dA += sum_t dt q: four steps per pass over dA_acc
                    d0, d1, d2, d3 = dt[t], dt[t + 1], dt[t + 2], dt[t + 3]
                    for k in range(nu):
                        j = _U(t) * nu + k
                        dA_acc[k] += (d0 * decay[j] + d1 * decay[j + nu]) + (
                            d2 * decay[j + 2 * nu] + d3 * decay[j + 3 * nu]
                        )
                    t += 4
                while t < steps:
                    dtt = dt[t]
                    for k in range(nu):
                        dA_acc[k] += dtt * decay[_U(t) * nu + k]
                    t += 1
                for t in range(steps):
                    acc = zero
                    for k in range(nu):
                        j = _U(t) * nu + k
                        acc += lam[j] * B_row[base + j]
                    s_b[t] = acc
                for t in range(steps):
                    ut = u_row[_U(t0 + t)]
                    du_row[_U(t0 + t)] = dy[t] * D_d + dt[t] * s_b[t]
                    g_delta = (s_a[t] + ut * s_b[t]) * dt_grad[t]
                    ddelta_row[_U(t0 + t)] = g_delta
                    dbias_acc += g_delta
                    dD_acc += dy[t] * ut

                for t in range(steps):
                    xt = x[t]
                    for k in range(nu):
                        j = _U(t) * nu + k
                        dB_row[base + j] += lam[j] * xt
                for t in range(steps):
                    gt = dy[t]
                    for k in range(nu):
                        j = _U(t) * nu + k
                        dC_row[base + j] += gt * hs[j + nu]

            dA[b, d, :] = dA_acc
            dD[b, d] = dD_acc
            dbias[b, d] = dbias_acc
