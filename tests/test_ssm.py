"""hymate.ssm: every scan backend against a plain float64 loop, forward and all gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hymate.ssm import (
    ScanGradSink,
    available_backends,
    causal_conv1d,
    resolve_backend,
    selective_scan,
)

try:
    from hymate.ssm import cpu_kernel
except ImportError:  # numba missing: the cpu backend's tests skip
    cpu_kernel = None

CHUNK = cpu_kernel.CHUNK if cpu_kernel is not None else 64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def backend_param(name: str):
    return pytest.param(
        name,
        marks=pytest.mark.skipif(name not in available_backends(), reason=f"backend {name} not available here"),
    )


BACKENDS = [backend_param("cpu"), backend_param("torch"), backend_param("cuda")]


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The definition, in float64, one time step after another. Returns (y, last state)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (batch, d, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, h


def make_inputs(batch, dim, n, length, dtype, seed=0, optional=True):
    """Inputs near a Mamba initialisation: A ~ -(1..n), softplus(delta + bias) ~ 0.05-1."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length) - 1.0,
        "A": -torch.exp(rand(dim, n) * 0.5) * torch.arange(1, n + 1, dtype=torch.float64),
        "B": rand(batch, n, length),
        "C": rand(batch, n, length),
        "D": rand(dim) if optional else None,
        "z": rand(batch, dim, length) if optional else None,
        "delta_bias": rand(dim) * 0.5 if optional else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def run_with_grads(fn, inputs, weights, device="cpu"):
    """Forward y and last state, then gradients of a fixed random linear loss of both."""
    leaves = {k: None if v is None else v.detach().to(device).requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves)
    loss = (y.double() * weights[0].to(device)).sum()
    loss = loss + (last.double() * weights[1].to(device)).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return y.detach().cpu(), last.detach().cpu(), dict(zip(present, grads, strict=True))


def check_against_reference(backend, inputs, softplus, dtype):
    batch, dim, length = inputs["u"].shape
    g = torch.Generator().manual_seed(1)
    weights = (
        torch.randn(batch, dim, length, generator=g, dtype=torch.float64),
        torch.randn(batch, dim, inputs["A"].shape[1], generator=g, dtype=torch.float64),
    )
    device = "cuda" if backend == "cuda" else "cpu"
    y, last, grads = run_with_grads(
        lambda **kw: selective_scan(**kw, delta_softplus=softplus, return_last_state=True, backend=backend),
        inputs,
        weights,
        device,
    )
    ref_inputs = {k: None if v is None else v.double() for k, v in inputs.items()}
    y_ref, last_ref, grads_ref = run_with_grads(
        lambda **kw: reference_scan(**kw, delta_softplus=softplus), ref_inputs, weights
    )
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in grads.values())
    assert rel_err(y, y_ref) < tol, "y"
    assert rel_err(last, last_ref) < tol, "last state"
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert rel_err(grads[name], grads_ref[name]) < tol, f"grad of {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("length", [1, 17, CHUNK + 3, 1000])
@pytest.mark.parametrize("softplus", [False, True], ids=["raw", "softplus"])
def test_matches_reference_forward_and_all_gradients(backend, dtype, length, softplus):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("mamba_ssm's kernel is float32/16-bit only")
    batch, dim, n = (2, 3, 4) if length == 1000 else (2, 5, 6)
    inputs = make_inputs(batch, dim, n, length, dtype)
    if not softplus:  # dt = delta + bias must stay positive, or the state explodes
        inputs["delta"] = F.softplus(inputs["delta"])
        inputs["delta_bias"] = inputs["delta_bias"].abs() * 0.1
    check_against_reference(backend, inputs, softplus, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [17, CHUNK + 3])
def test_without_optional_inputs(backend, length):
    inputs = make_inputs(2, 3, 5, length, torch.float32, seed=3, optional=False)
    check_against_reference(backend, inputs, True, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_large_decay_underflows_without_nan(backend, dtype):
    """dt up to 50 and A down to -100: exp(dt A) underflows to 0; nothing may be NaN/inf."""
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("mamba_ssm's kernel is float32/16-bit only")
    inputs = make_inputs(2, 4, 8, 2 * CHUNK + 5, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    inputs["delta"] = (torch.rand(2, 4, 2 * CHUNK + 5, generator=g) * 50).to(dtype)
    inputs["A"] = -(torch.rand(4, 8, generator=g) * 100 + 0.01).to(dtype)
    inputs["delta_bias"] = None
    check_against_reference(backend, inputs, False, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_growing_state_does_not_crash(backend):
    """A > 0 is outside Mamba's use (the state explodes), but must not raise."""
    inputs = make_inputs(1, 2, 3, 40, torch.float32, seed=6)
    inputs["A"] = inputs["A"].abs() * 10
    device = "cuda" if backend == "cuda" else "cpu"
    args = {k: v.to(device) for k, v in inputs.items()}
    y = selective_scan(**args, delta_softplus=True, backend=backend)
    assert y.shape == (1, 2, 40)


@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("torch")])
@pytest.mark.parametrize("with_d", [True, False])
def test_grad_sink_gives_per_sample_gradients(backend, with_d):
    batch, dim, n, length = 3, 4, 5, CHUNK + 3
    inputs = make_inputs(batch, dim, n, length, torch.float64, seed=7)
    if not with_d:
        inputs["D"] = None
    weights = torch.randn(batch, dim, length, dtype=torch.float64)

    def grads_of_A_and_D(sample: slice, sink: ScanGradSink | None):
        A = inputs["A"].clone().requires_grad_()
        D = None if inputs["D"] is None else inputs["D"].clone().requires_grad_()
        per_sample = {k: inputs[k][sample] for k in ("u", "delta", "B", "C", "z") if inputs[k] is not None}
        y = selective_scan(
            A=A, D=D, delta_bias=inputs["delta_bias"], delta_softplus=True,
            backend=backend, grad_sink=sink, **per_sample,
        )  # fmt: skip
        (y * weights[sample]).sum().backward()
        return A.grad, None if D is None else D.grad

    sink = ScanGradSink(dA=torch.zeros(1), dD=torch.zeros(1))  # stale values must go
    dA, dD = grads_of_A_and_D(slice(None), sink)
    assert sink.dA.shape == (batch, dim, n)
    torch.testing.assert_close(sink.dA.sum(0), dA, rtol=1e-12, atol=1e-12)
    if with_d:
        assert sink.dD.shape == (batch, dim)
        torch.testing.assert_close(sink.dD.sum(0), dD, rtol=1e-12, atol=1e-12)
    else:
        assert sink.dD is None
    for i in range(batch):
        dA_i, dD_i = grads_of_A_and_D(slice(i, i + 1), None)
        torch.testing.assert_close(sink.dA[i], dA_i, rtol=1e-10, atol=1e-12)
        if with_d:
            torch.testing.assert_close(sink.dD[i], dD_i, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_last_state_flag(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    args = {k: v.to(device) for k, v in make_inputs(2, 3, 4, 9, torch.float32).items()}
    y = selective_scan(**args, backend=backend)
    y2, last = selective_scan(**args, return_last_state=True, backend=backend)
    assert isinstance(y, torch.Tensor) and torch.equal(y, y2)
    assert last.shape == (2, 3, 4)


@pytest.mark.skipif("cpu" not in available_backends(), reason="numba not available")
def test_cpu_backend_saves_only_chunk_checkpoints():
    """Beyond its inputs the cpu backend keeps only the states at chunk starts for backward;
    the eager torch backend keeps O(batch * d * n * L)."""
    batch, dim, n, length = 2, 8, 16, 1000
    inputs = {k: v.requires_grad_() for k, v in make_inputs(batch, dim, n, length, torch.float32).items()}

    def saved_numel(backend: str) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan(**inputs, delta_softplus=True, backend=backend)
        return sum(sizes)

    input_numel = sum(v.numel() for v in inputs.values())
    checkpoints = batch * dim * n * math.ceil(length / CHUNK)
    assert saved_numel("cpu") <= input_numel + checkpoints
    assert saved_numel("torch") > batch * dim * n * length


def test_resolve_backend_rules():
    x = torch.zeros(1, 2, 3)
    expected = "cpu" if "cpu" in available_backends() else "torch"
    assert resolve_backend("auto", x) == expected
    assert resolve_backend("auto", x.double()) == expected
    assert resolve_backend("auto", x.half()) == "torch"
    assert resolve_backend("torch", x) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast", x)
    with pytest.raises(ValueError, match="per-sample"):
        resolve_backend("cuda", x, grad_sink=ScanGradSink())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cpu"):
            resolve_backend("cuda", x)
    if "cpu" in available_backends():
        with pytest.raises(ValueError, match="float32 and float64"):
            resolve_backend("cpu", x.half())


def test_shape_errors_name_the_argument():
    args = make_inputs(2, 3, 4, 5, torch.float32)
    args["B"] = args["B"][:, :, :4]
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**args)


def test_bfloat16_falls_back_to_torch_and_keeps_dtype():
    args = {k: v.bfloat16() for k, v in make_inputs(1, 2, 3, 6, torch.float32).items()}
    y = selective_scan(**args, delta_softplus=True)
    y_ref, _ = reference_scan(**args, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 2e-2


def test_functorch_transforms_fall_back_to_torch():
    """vmap/grad cannot enter the fused kernels' Function; "auto" must still work."""
    args = make_inputs(1, 2, 3, 20, torch.float64)

    def loss(A):
        return selective_scan(**{**args, "A": A}, delta_softplus=True).sum()

    A = args["A"].clone().requires_grad_()
    loss(A).backward()
    torch.testing.assert_close(torch.func.grad(loss)(args["A"]), A.grad, rtol=1e-10, atol=0)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_conv1d_matches_loop(activation, with_bias):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64) if with_bias else None
    expected = torch.zeros_like(x)
    for t in range(10):
        for j in range(4):
            if t - 3 + j >= 0:
                expected[:, :, t] += weight[:, j] * x[:, :, t - 3 + j]
    if bias is not None:
        expected += bias[:, None]
    if activation:
        expected = F.silu(expected)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation), expected)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, "relu")


@pytest.mark.skipif(cpu_kernel is None, reason="numba not available")
def test_kernel_exp_and_softplus_accuracy():
    from numba import njit

    @njit
    def apply(x, exp_out, softplus_out, sigmoid_out):
        for i in range(x.shape[0]):
            exp_out[i] = cpu_kernel.fast_exp(x[i])
            softplus_out[i], sigmoid_out[i] = cpu_kernel.softplus_and_grad(x[i])

    for dtype, lo, hi, ulps in ((np.float32, -87.0, 88.0, 2), (np.float64, -700.0, 700.0, 2)):
        x = np.concatenate([np.linspace(lo, hi, 200_001), np.linspace(-30, 30, 100_001)])
        x = x.astype(dtype)
        exp_out, sp_out, sig_out = (np.empty_like(x) for _ in range(3))
        apply(x, exp_out, sp_out, sig_out)
        exact = np.exp(x.astype(np.float64))
        err_ulp = np.abs(exp_out - exact) / np.spacing(exact.astype(dtype)).astype(np.float64)
        assert err_ulp.max() <= ulps, dtype
        eps = np.finfo(dtype).eps
        xt = torch.from_numpy(x.astype(np.float64))
        # torch's softplus is the identity above 20, with gradient exactly 1 there.
        grad = torch.where(xt > 20, 1.0, torch.sigmoid(xt))
        assert np.allclose(sp_out, F.softplus(xt).numpy(), rtol=4 * eps, atol=0), dtype
        assert np.allclose(sig_out, grad.numpy(), rtol=4 * eps, atol=0), dtype
        # Past the representable range: 0 and inf, never NaN.
        edges = np.array([-1e4, 1.2 * lo - 20, 1.2 * hi + 20, 1e4], dtype=dtype)
        edge_out = np.empty_like(edges)
        apply(edges, edge_out, np.empty_like(edges), np.empty_like(edges))
        assert edge_out.tolist() == [0.0, 0.0, math.inf, math.inf], dtype
