"""DP-SGD step vs plain step on HyMaTE: time ratio and peak memory, same model and batch.

    python bench/dp.py [--batch-sizes 32 64] [--d-model 64] [--repeats 7] [--threads N] [--profile]
    OMP_WAIT_POLICY=passive python bench/dp.py   # see below

Batch: ``B`` stays drawn at random (as Poisson sampling draws them: no length bucketing) from
the synthetic dataset, capped at 880 events, padded to the longest; both modes train on the
very same Batch. Model: HyMaTE at the project defaults (d_model 64, 2 Mamba layers, d_state 16,
1 attention layer, 4 heads, dropout 0.2), float32, ``auto`` scan backend (the numba kernel).

- plain: ``zero_grad``, forward, BCE loss, backward, ``clip_grad_norm_`` (1.0), AdamW step.
- DP: the same through ``hymate.privacy.make_private`` (Opacus hooks, per-sample clipping at
  1.0, noise 1.0, Poisson-ready optimizer); per-sample gradients of A_log/D come from the scan.
  The batch goes through as one physical batch: the cost of DP itself on the same work.
- DP sorted: the same DP step with the batch cut into length-sorted physical batches of 16
  stays (``physical_batch_size=16``, what ``train_private_round`` does), each padded only to
  its own longest stay. Plain training buckets stays by length and pays little padding;
  Poisson batches cannot be bucketed, so this column is the fair per-step comparison for
  training as it runs. ``real`` is the share of real (unpadded) events in the batch.

OpenMP: torch and numba's kernels each bring an OpenMP runtime whose idle threads spin. On a
loaded 2-core machine that made every step 4-6x slower here (a 2-stay, 8-event step: 1.8 s
spinning vs 11 ms passive); set OMP_WAIT_POLICY=passive in the environment (it must be set
before torch is imported) to compare. The header prints the policy in effect.

Time: median of --repeats steps after two warm-up steps; plain and DP steps alternate in this
one process, so machine load hits both alike. Memory: each (mode, B) runs again in a fresh
subprocess, which reports its peak resident memory over three steps minus its resident
memory once the model, optimizer, batch and a warm-up step on a tiny batch exist (Linux
VmHWM, reset via /proc/self/clear_refs; glibc told to unmap large freed blocks so RSS
follows live memory): what the training step itself adds (activations, per-sample
gradients, temporaries, optimizer state), not the interpreter, libraries or weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from hymate.data import MomentSums, load_dataset  # noqa: E402
from hymate.data.batches import Batch, StayDataset, collate_stays  # noqa: E402
from hymate.model import HyMaTE, ModelOptions  # noqa: E402
from hymate.privacy import make_private  # noqa: E402
from hymate.privacy.dp_sgd import split_by_length  # noqa: E402
from hymate.train import TrainConfig, make_optimizer  # noqa: E402

MODES = ("plain", "dp", "dp-sorted")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def make_data(n_stays: int = 400, seed: int = 0) -> StayDataset:
    table = load_dataset("synthetic", cache_dir=None, n_sites=1, stays_per_site=n_stays, seed=seed)
    return StayDataset(table, MomentSums.from_table(table).to_normalizer(), max_events=880)


def random_batch(dataset: StayDataset, size: int, seed: int = 0) -> Batch:
    rows = np.random.default_rng(seed).choice(len(dataset), size=size, replace=False)
    return collate_stays([dataset[int(i)] for i in rows])


def make_step(mode: str, dataset: StayDataset, batch: Batch, d_model: int) -> Callable[[], None]:
    """One training step of ``mode`` on ``batch``, with its own model (same initial weights)."""
    torch.manual_seed(0)
    model = HyMaTE(ModelOptions(d_model=d_model).for_table(dataset.table)).train()
    optimizer = make_optimizer(model, TrainConfig())
    if mode == "plain":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        return step

    chunk = 16 if mode == "dp-sorted" else None
    dp = make_private(
        model, optimizer, dataset, sample_rate=len(batch) / len(dataset), steps_per_epoch=1,
        noise_multiplier=1.0, max_grad_norm=1.0, physical_batch_size=chunk,
    )  # fmt: skip
    parts = split_by_length(batch, chunk) if chunk else [batch]

    def dp_step() -> None:
        for i, part in enumerate(parts):  # what LengthSortedChunks + train_epoch do
            dp.optimizer.signal_skip_step(do_skip=i < len(parts) - 1)
            dp.optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(dp.model(part), part.label).backward()
            dp.optimizer.step()

    return dp_step


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_peak_mb(mode: str, batch_size: int, d_model: int) -> float:
    dataset = make_data()
    batch = random_batch(dataset, batch_size)
    warm_up = Batch(**{f: t[:4, :8] if t.dim() == 2 and f in ("times", "variables", "values", "mask") else t[:4]
                       for f, t in vars(batch).items()})  # fmt: skip
    make_step(mode, dataset, warm_up, d_model)()  # imports, JIT cache, thread pools (small: RSS stays low)
    step = make_step(mode, dataset, batch, d_model)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    for _ in range(3):
        step()
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb(mode: str, batch_size: int, d_model: int, threads: int) -> float:
    command = [sys.executable, __file__, "--child", mode, "--batch-sizes", str(batch_size)]
    command += ["--d-model", str(d_model), "--threads", str(threads)]
    # glibc then returns every large block to the OS when freed, so RSS follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def profile(step: Callable[[], None], rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of both steps")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps({"peak_mb": child_peak_mb(args.child, args.batch_sizes[0], args.d_model)}))
        return

    dataset = make_data()
    print(
        f"HyMaTE d_model={args.d_model} (2 Mamba + 1 attention layers), synthetic stays, float32, "
        f"{args.threads} threads; median of {args.repeats} steps after 2 warm-ups, modes alternating; "
        f"MB: peak RSS added by 3 steps, fresh process; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    header = f"{'B':>4} {'L':>5} {'real':>5}" + "".join(f" {m + ' ms':>14}" for m in MODES)
    header += f" {'DP/plain':>9} {'sorted/plain':>13}" + "".join(f" {m + ' MB':>14}" for m in MODES)
    print(header)
    for size in args.batch_sizes:
        batch = random_batch(dataset, size)
        steps = {mode: make_step(mode, dataset, batch, args.d_model) for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(args.repeats + 2):
            for mode in MODES:
                start = time.perf_counter()
                steps[mode]()
                if i >= 2:
                    times[mode].append(time.perf_counter() - start)
        median = {mode: statistics.median(t) * 1e3 for mode, t in times.items()}
        memory = {m: float("nan") for m in MODES}
        if not args.no_memory:
            memory = {mode: peak_mb(mode, size, args.d_model, args.threads) for mode in MODES}
        real = batch.mask.float().mean().item()
        row = f"{size:>4} {batch.times.shape[1]:>5} {real:>5.2f}" + "".join(f" {median[m]:>14.0f}" for m in MODES)
        row += f" {median['dp'] / median['plain']:>8.2f}x {median['dp-sorted'] / median['plain']:>12.2f}x"
        print(row + "".join(f" {memory[m]:>14.0f}" for m in MODES), flush=True)
        if args.profile:
            for mode in MODES:
                print(f"--- {mode}, B={size}")
                profile(steps[mode])


if __name__ == "__main__":
    main()
