"""Selective scan on CPU: forward + backward time and peak memory, ours vs mambapy's pscan.

    python bench/scan.py [--lengths 64 256 1024] [--repeats 5] [--threads N] [--step-length 430] [--no-step]

Methods, all computing y = scan(u, delta, A, B, C) + D u and its gradient w.r.t. every input
(delta given positive, no gate), float32:
- cpu: hymate.ssm.selective_scan(backend="cpu"), the fused numba kernels.
- torch: hymate.ssm.selective_scan(backend="torch"), the eager reference loop.
- mambapy: mambapy.pscan (Blelloch), with its inputs exp(delta A) and delta B u built in its
  (batch, L, d, n) layout inside the timed region, as mambapy's own selective_scan does.

Time: median of --repeats forward+backward calls after one warm-up, all methods side by side
in this process. Memory: each (method, L) runs once more in a fresh subprocess, which reports
its peak resident memory during one forward+backward minus its resident memory just before
(Linux VmHWM after resetting it via /proc/self/clear_refs; elsewhere ru_maxrss, which can only
under-report). Inputs, outputs and gradients allocated by the call all count.

Then the model's training step at a typical batch (bench/dp.py's steps: HyMaTE d_model 64,
2 Mamba blocks, 1 attention layer, synthetic stays, b=32, all cut to --step-length events so
the batch is L x 32 real events as a length-bucketed P12 batch is): plain and DP-SGD
(Opacus hooks, per-sample clipping) medians side by side, and where the plain step's time
goes by torch.profiler (self CPU time summed per component).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout (bench.dp too)

from hymate.ssm import available_backends, selective_scan  # noqa: E402

try:
    from mambapy.pscan import pscan
except ImportError:
    pscan = None

METHODS = ("cpu", "torch", "mambapy")


def make_inputs(batch: int, dim: int, n: int, length: int, seed: int = 0) -> dict:
    """Inputs in our layout (u, delta: (b, d, L); B, C: (b, n, L)) at a Mamba-like scale."""
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.nn.functional.softplus(torch.randn(batch, dim, length, generator=g) - 2),
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, n, length, generator=g),
        "C": torch.randn(batch, n, length, generator=g),
        "D": torch.randn(dim, generator=g),
    }


def mambapy_scan(u, delta, A, B, C, D):
    """mambapy's selective_scan on its layout: u, delta (b, L, d); B, C (b, L, n)."""
    deltaA = torch.exp(delta.unsqueeze(-1) * A)  # (b, L, d, n)
    BX = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)  # (b, L, d, n)
    hs = pscan(deltaA, BX)
    return (hs @ C.unsqueeze(-1)).squeeze(3) + D * u


def step_fn(method: str, inputs: dict) -> Callable[[], None]:
    """One forward + backward of `method` on leaf copies of `inputs`, gradients of all."""
    if method == "mambapy":
        inputs = {k: v.transpose(1, 2).contiguous() if v.dim() == 3 else v for k, v in inputs.items()}
    leaves = [v.clone().requires_grad_() for v in inputs.values()]
    names = list(inputs)
    grad_out = torch.ones(inputs["u"].shape)
    ours = functools.partial(selective_scan, backend=method)
    scan = mambapy_scan if method == "mambapy" else ours

    def step() -> None:
        y = scan(**dict(zip(names, leaves, strict=True)))
        torch.autograd.grad(y, leaves, grad_out)

    return step


def runnable(method: str) -> bool:
    return pscan is not None if method == "mambapy" else method in available_backends()


def time_ms(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up (JIT cache load, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_peak_mb(method: str, sizes: dict, length: int) -> float:
    """In a fresh process: peak extra resident memory of one forward + backward, in MB."""
    step_fn(method, make_inputs(**{**sizes, "length": 8}))()  # imports, JIT cache, thread pools
    step = step_fn(method, make_inputs(**sizes, length=length))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kb("VmRSS")
        step()
        return (_rss_kb("VmHWM") - before) / 1024
    except OSError:  # not Linux: the lifetime peak, which the warm-up may already have raised
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def peak_mb(method: str, sizes: dict, length: int, threads: int) -> float:
    command = [sys.executable, __file__, "--child", method, "--lengths", str(length)]
    command += ["--threads", str(threads)]
    command += [f"--{k}={v}" for k, v in sizes.items()]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--step-length", type=int, default=430, help="events per stay in the model-step batch")
    parser.add_argument("--no-step", action="store_true", help="skip the model training step")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    sizes = {"batch": args.batch, "dim": args.dim, "n": args.n}
    if args.child:
        print(json.dumps({"peak_mb": child_peak_mb(args.child, sizes, args.lengths[0])}))
        return

    methods = [m for m in args.methods if runnable(m)]
    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} CPUs"
    )
    if pscan is None:
        print("mambapy is not installed (pip install mambapy==1.2.0): no pscan column, no ratios")
    print(
        f"selective scan forward+backward, b={args.batch} d={args.dim} n={args.n} float32, "
        f"{args.threads} threads, median of {args.repeats} after a warm-up"
    )
    print(f"{'L':>5} {'method':>8} {'time ms':>10} {'vs pscan':>9} {'peak MB':>9}")
    for length in args.lengths:
        inputs = make_inputs(**sizes, length=length)
        times = {m: time_ms(step_fn(m, inputs), args.repeats) for m in methods}
        for m in methods:
            ratio = f"{times['mambapy'] / times[m]:8.1f}x" if "mambapy" in times else f"{'-':>9}"
            peak = peak_mb(m, sizes, length, args.threads)
            print(f"{length:>5} {m:>8} {times[m]:>10.1f} {ratio} {peak:>9.0f}", flush=True)
    if not args.no_step:
        model_step(args.step_length, args.repeats)
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


# torch.profiler op names -> the component they belong to in the HyMaTE step (first match wins).
COMPONENTS = (
    ("scan (numba kernels)", ("hymate::scan",)),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("linear layers (matmul)", ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("depthwise conv", ("convolution", "conv1d", "conv_depthwise")),
    ("layer norm", ("layer_norm",)),
    ("dropout / random", ("dropout", "bernoulli", "uniform_", "native_dropout")),
    ("optimizer + clipping", ("_foreach", "adamw", "norm", "clip")),
    ("copies / layout", ("copy_", "contiguous", "clone", "to_copy", "cat", "transpose", "reshape", "view")),
)


def component_breakdown(step: Callable[[], None]) -> list[tuple[str, float]]:
    """Self CPU time of one step per component (ms), largest first; the rest is elementwise
    ops (activations, gates, residuals), reductions and autograd overhead."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        component = next(
            (label for label, keys in COMPONENTS if any(k.lower() in name.lower() for k in keys)),
            "elementwise, reductions, autograd",
        )
        totals[component] = totals.get(component, 0.0) + event.self_cpu_time_total / 1e3
    return sorted(totals.items(), key=lambda item: -item[1])


def model_step(length: int, repeats: int) -> None:
    """Plain and DP training steps of HyMaTE at b=32, L=length, and the plain step's profile."""
    from bench.dp import make_data, make_step, random_batch
    from hymate.data.batches import Batch

    dataset = make_data()
    batch = random_batch(dataset, 32)
    # Synthetic stays are of mixed length: repeat each stay's events up to `length`, so every
    # row is `length` real events, as in a length-bucketed batch of real stays.
    rows = batch.mask.sum(1).clamp(min=1)
    index = torch.arange(length)[None, :] % rows[:, None]
    events = {f: getattr(batch, f).gather(1, index) for f in ("times", "variables", "values")}
    batch = Batch(**{**vars(batch), **events, "mask": torch.ones(32, length, dtype=torch.bool)})
    steps = {mode: make_step(mode, dataset, batch, 64) for mode in ("plain", "dp")}
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for i in range(repeats + 2):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= 2:
                times[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(t) * 1e3 for mode, t in times.items()}
    print(
        f"\nHyMaTE training step, b=32 L={batch.times.shape[1]} d_model=64 (2 Mamba + 1 attention), "
        f"median of {repeats} after 2 warm-ups: plain {median['plain']:.0f} ms, "
        f"DP-SGD {median['dp']:.0f} ms ({median['dp'] / median['plain']:.2f}x)"
    )
    breakdown = component_breakdown(steps["plain"])
    total = sum(ms for _, ms in breakdown)
    print(f"plain step by component (torch.profiler self CPU time, one profiled step, {total:.0f} ms in all):")
    for label, ms in breakdown:
        print(f"  {label:<36} {ms:>8.1f} ms {100 * ms / total:>5.1f} %")


if __name__ == "__main__":
    main()
