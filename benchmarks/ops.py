"""Speed of the SRU recurrence: naive spec vs the fused CPU kernel (and the authors' `sru` CPU forward).

Prints a table and writes benchmarks/results/ops.json. Every ratio compares timings taken in this run.

Bandwidth model (float32, per element of [T, B, D]):
  forward, inference (no grad): reads u (3) + x (1), writes h (1)            = 5 values = 20 bytes
  forward, training:            the same + writes c for backward (1)         = 6 values = 24 bytes
  backward:                     reads u (3) + x (1) + c (1) + grad_h (1),
                                writes grad_u (3) + grad_x (1)               = 10 values = 40 bytes
Copy bandwidth is (read + write bytes) / time of ``dst.copy_(src)`` on a 256 MiB buffer, timed in turn with
the op's runs (the machine may be shared, and its memory bandwidth moves). Every time is the shortest of its
runs; every bandwidth fraction is the median over the rounds of a run's bandwidth over that of the copy run
beside it. ``--isa all`` times every kernel variant this CPU can run (the naive and authors' columns only for
the first).

    python -m benchmarks.ops            # T=512 B=16 D=512 and two more shapes
    python -m benchmarks.ops --quick    # tiny shapes, for the smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.baselines import load_authors
from benchmarks.common import RESULTS, authors_u, require_agreement, time_it, write_json
from srupp.ops import cpu, library, output_cache, sru_recurrence

SHAPES = [(512, 16, 512), (256, 32, 1024), (1024, 4, 256)]
QUICK_SHAPES = [(16, 2, 32)]
FORWARD_INFER_BYTES, FORWARD_TRAIN_BYTES, BACKWARD_BYTES = 20, 24, 40


def fastest(fn, *, repeats: int, min_seconds: float = 0.0) -> float:
    """The shortest of the timed runs: on a shared machine the other runs measure the neighbours."""
    return time_it(fn, repeats=repeats, min_seconds=min_seconds, statistic=min)


def interleaved(fns: dict[str, object], *, rounds: int, min_seconds: float = 0.0) -> dict[str, list[float]]:
    """The seconds of every run of each of ``fns``, timed in turn round after round (after one untimed round), so
    that each op run has a copy run beside it: this VM's memory bandwidth moved between 28 and 63 GB/s from one
    minute to the next, so a bandwidth fraction is taken per round, from runs seconds apart."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start_all = time.perf_counter()
    while len(times[next(iter(fns))]) < rounds or time.perf_counter() - start_all < min_seconds:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def copy_step(megabytes: int):
    """A copy of ``megabytes`` MiB and the bytes it moves (read + write)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src), 2 * src.numel() * 4


@contextlib.contextmanager
def no_output_cache():
    """The public op as it was before it kept its outputs for reuse: every output a fresh allocation."""
    previous = os.environ.get("SRUPP_CPU_CACHE_MB")
    os.environ["SRUPP_CPU_CACHE_MB"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SRUPP_CPU_CACHE_MB")
        else:
            os.environ["SRUPP_CPU_CACHE_MB"] = previous


def kernel_steps(u, x, v, b, c0, grad_h):
    """The C kernels alone on buffers allocated once: what the op costs without torch's dispatch and
    without first-touching fresh output memory (which the public path pays on every call)."""
    forward_pass, backward_pass = (cpu.kernel_function(name, torch.float32) for name in ("forward", "backward"))
    threads = torch.get_num_threads()
    steps, batch, hidden = x.shape
    h, c_all, c_last, grad_u, grad_x = (torch.empty_like(t) for t in (x, x, c0, u, x))
    grad_vb, grad_c0 = x.new_empty(batch, 4, hidden), torch.empty_like(c0)
    p = [t.data_ptr() for t in (u, x, v, b, c0)]
    shape = (steps, batch, hidden, 0, threads)

    def forward():
        forward_pass(*p, None, None, h.data_ptr(), c_all.data_ptr(), c_last.data_ptr(), *shape)

    def backward():
        backward_pass(
            *p,
            None,
            None,
            c_all.data_ptr(),
            grad_h.data_ptr(),
            c_last.data_ptr(),
            grad_u.data_ptr(),
            grad_x.data_ptr(),
            grad_vb.data_ptr(),
            grad_c0.data_ptr(),
            *shape,
        )

    return forward, backward


def bench_shape(steps, batch, hidden, repeats, official, with_naive=True, copy_megabytes=256):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(steps, batch, 3 * hidden, generator=gen)
    x = torch.randn(steps, batch, hidden, generator=gen)
    v = torch.rand(2, hidden, generator=gen) * 2 - 1
    b = torch.zeros(2, hidden)
    c0 = torch.zeros(batch, hidden)
    leaves = [t.clone().requires_grad_() for t in (u, x, v, b)]
    grad_h = torch.randn(steps, batch, hidden, generator=gen)

    def forward(backend):
        with torch.no_grad():
            return sru_recurrence(u, x, v, b, c0, backend=backend)

    def train_step(backend):
        for leaf in leaves:
            leaf.grad = None  # as optimizer.zero_grad() leaves them: no accumulation pass is timed
        h, _ = sru_recurrence(*leaves, c0, backend=backend)
        h.backward(grad_h)

    def train_forward(backend):
        return sru_recurrence(*leaves, c0, backend=backend)

    def train_step_fresh():
        with no_output_cache():
            train_step("cpu")

    info = library.cpu_kernel_info()
    row = {"T": steps, "B": batch, "D": hidden, "isa": info["isa"], "threading": info["threading"]}
    naive_repeats = max(2, repeats // 2)
    if with_naive:
        row["naive_forward_s"] = fastest(lambda: forward("naive"), repeats=naive_repeats)
        row["naive_train_s"] = fastest(lambda: train_step("naive"), repeats=naive_repeats)
    copy, copy_bytes = copy_step(copy_megabytes)
    kernel_forward, kernel_backward = kernel_steps(u, x, v, b, c0, grad_h)
    times = interleaved(
        {
            "copy": copy,
            "cpu_forward_s": lambda: forward("cpu"),
            "cpu_train_forward_s": lambda: train_forward("cpu"),
            "cpu_train_s": lambda: train_step("cpu"),
            "cpu_train_uncached_s": train_step_fresh,
            "kernel_forward_s": kernel_forward,
            "kernel_backward_s": kernel_backward,
        },
        rounds=repeats,
        min_seconds=2.0,
    )
    output_cache.empty_cpu_cache()
    add_bandwidths(row, times, copy_bytes, steps * batch * hidden, with_naive)
    if official is not None and with_naive:
        h_ours, _ = forward("cpu")
        add_authors(row, official, (u, x, v, b, c0), h_ours, repeats)
    return row


def add_bandwidths(row: dict, times: dict[str, list[float]], copy_bytes: int, elements: int, with_naive: bool) -> None:
    """The fastest time of each run in ``times``, and from them speed-ups, bandwidths in GB/s and the medians of
    each run's bandwidth over that of the copy beside it, into ``row``."""
    row["copy_GBps"] = copy_bytes / min(times["copy"]) / 1e9
    row.update({name: min(values) for name, values in times.items() if name != "copy"})

    def fraction(name: str, nbytes: int) -> float:
        """Median over the rounds of (this run's bandwidth / the copy's beside it)."""
        return statistics.median(nbytes * c / (copy_bytes * t) for t, c in zip(times[name], times["copy"], strict=True))

    row["cpu_forward_bw_fraction"] = fraction("cpu_forward_s", elements * FORWARD_INFER_BYTES)
    row["cpu_train_bw_fraction"] = fraction("cpu_train_s", elements * (FORWARD_TRAIN_BYTES + BACKWARD_BYTES))
    row["cpu_train_uncached_bw_fraction"] = fraction(
        "cpu_train_uncached_s", elements * (FORWARD_TRAIN_BYTES + BACKWARD_BYTES)
    )
    row["kernel_train_forward_bw_fraction"] = fraction("kernel_forward_s", elements * FORWARD_TRAIN_BYTES)
    row["kernel_backward_bw_fraction"] = fraction("kernel_backward_s", elements * BACKWARD_BYTES)
    row["cpu_backward_s"] = max(row["cpu_train_s"] - row["cpu_train_forward_s"], 1e-9)
    if with_naive:
        row["forward_speedup"] = row["naive_forward_s"] / row["cpu_forward_s"]
        row["train_speedup"] = row["naive_train_s"] / row["cpu_train_s"]
    row["cpu_forward_GBps"] = elements * FORWARD_INFER_BYTES / row["cpu_forward_s"] / 1e9
    row["cpu_train_GBps"] = elements * (FORWARD_TRAIN_BYTES + BACKWARD_BYTES) / row["cpu_train_s"] / 1e9
    row["cpu_train_uncached_GBps"] = (
        elements * (FORWARD_TRAIN_BYTES + BACKWARD_BYTES) / row["cpu_train_uncached_s"] / 1e9
    )
    row["kernel_train_forward_GBps"] = elements * FORWARD_TRAIN_BYTES / row["kernel_forward_s"] / 1e9
    row["kernel_backward_GBps"] = elements * BACKWARD_BYTES / row["kernel_backward_s"] / 1e9


def add_authors(row: dict, official, inputs: tuple, h_ours, repeats: int) -> None:
    """The authors' CPU forward on the same ``inputs`` (u, x, v, b, c0): its agreement with ``h_ours`` (required),
    its fastest time and ours against it, into ``row``."""
    u, x, v, b, c0 = inputs
    steps, batch, hidden = x.shape
    u_official = authors_u(u)
    weight_c, bias = v.reshape(-1).contiguous(), b.reshape(-1).contiguous()

    def official_forward():
        with torch.no_grad():
            return official.ops.elementwise_recurrence_inference(
                u_official, x, weight_c, bias, c0, 0, hidden, False, True
            )

    h_official, _ = official_forward()
    row["official_max_abs_diff"] = require_agreement(h_official, h_ours, f"forward at {steps, batch, hidden}", 1e-4)
    row["official_forward_s"] = fastest(official_forward, repeats=repeats, min_seconds=0.3)
    row["forward_vs_official"] = row["official_forward_s"] / row["cpu_forward_s"]


def table_line(isa: str, row: dict) -> str:
    """One row of the printed table ('-' where a column was not timed)."""
    official_cols = (
        f"{row['official_forward_s'] * 1e3:7.2f}m {row['forward_vs_official']:6.2f}"
        if "official_forward_s" in row
        else f"{'-':>8} {'-':>6}"
    )
    naive_fwd = f"{row['naive_forward_s'] * 1e3:8.1f}m" if "naive_forward_s" in row else f"{'-':>9}"
    fwd_x = f"{row['forward_speedup']:6.1f}" if "forward_speedup" in row else f"{'-':>6}"
    train_x = f"{row['train_speedup']:6.1f}" if "train_speedup" in row else f"{'-':>6}"
    naive_train = f"{row['naive_train_s'] * 1e3:8.1f}m" if "naive_train_s" in row else f"{'-':>9}"
    return (
        f"{isa:>8} {row['T']:5d} {row['B']:4d} {row['D']:5d} | {row['copy_GBps']:5.1f} | "
        f"{naive_fwd} {row['cpu_forward_s'] * 1e3:7.2f}m {fwd_x} | "
        f"{naive_train} {row['cpu_train_s'] * 1e3:7.2f}m {train_x} | "
        f"{row['cpu_forward_bw_fraction']:6.0%} {row['cpu_train_bw_fraction']:6.0%}"
        f" {row['cpu_train_uncached_bw_fraction']:6.0%}"
        f" | {row['kernel_train_forward_bw_fraction']:6.0%} {row['kernel_backward_bw_fraction']:6.0%}"
        f" | {official_cols}"
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    parser.add_argument("--no-official", action="store_true", help="skip the authors' sru package")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops.json)")
    parser.add_argument(
        "--isa",
        default=None,
        help="CPU kernel variant to time: baseline, avx2, avx512 or 'all' (default: the one this CPU picks)",
    )
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 2 if args.quick else 7
    official = None if args.no_official else load_authors()
    info = library.cpu_kernel_info()
    isas = info["available"][::-1] if args.isa == "all" else [args.isa or info["isa"]]
    print(f"threads={torch.get_num_threads()}  CPU kernel variants {info['available']}, timing {isas}")
    print(
        "bytes per element of [T, B, D] (float32): forward for training 24 (reads u 3, x 1; writes h 1, c 1), "
        "backward 40 (reads u 3, x 1, c 1, grad_h 1; writes grad_u 3, grad_x 1): f+b 64"
    )
    header = (
        f"{'isa':>8} {'T':>5} {'B':>4} {'D':>5} | {'copy':>5} | {'naive fwd':>9} {'cpu fwd':>8} {'x':>6} | "
        f"{'naive f+b':>9} {'cpu f+b':>8} {'x':>6} | {'fwd BW':>7} {'f+b BW':>7} {'fresh':>6} | "
        f"{'kernel fwd':>6} {'bwd BW':>6} | {'sru fwd':>8} {'ours x':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for index, isa in enumerate(isas):
        os.environ["SRUPP_CPU_ISA"] = isa
        library.reset()
        for steps, batch, hidden in shapes:
            row = bench_shape(
                steps, batch, hidden, repeats, official, with_naive=index == 0, copy_megabytes=16 if args.quick else 256
            )
            rows.append(row)
            print(table_line(isa, row), flush=True)
    os.environ.pop("SRUPP_CPU_ISA", None)
    library.reset()
    print("times in ms (fastest run); copy in GB/s (read+write, fastest run, timed in turn with the op);")
    print("x = speed-up over naive; BW = achieved bandwidth / that of the copy run beside it, median over the")
    print("rounds, through the public op (allocation and first touch of the outputs included);")
    print("fresh = f+b BW with SRUPP_CPU_CACHE_MB=0 (every output a new allocation);")
    print("kernel BW = the C kernels alone on reused buffers;")
    print("'ours x' = the authors' CPU forward time / ours")
    payload = {
        "cpu_kernel": info,
        "bytes_per_element": {
            "forward_inference": FORWARD_INFER_BYTES,
            "forward_train": FORWARD_TRAIN_BYTES,
            "backward": BACKWARD_BYTES,
        },
        "rows": rows,
    }
    path = write_json(Path(args.out) if args.out else RESULTS / "ops.json", payload, "ops", argv)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
