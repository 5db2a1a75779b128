"""Speed of the SRU recurrence: naive spec vs the fused CPU kernel (and the authors' `sru` CPU forward).

Prints a table and writes benchmarks/results/ops.json. Every ratio compares timings taken in this run.

Bandwidth model (float32, per element of [T, B, D]):
  forward, inference (no grad): reads u (3) + x (1), writes h (1)            = 5 values = 20 bytes
  forward, training:            the same + writes c for backward (1)         = 6 values = 24 bytes
  backward:                     reads u (3) + x (1) + c (1) + grad_h (1),
                                writes grad_u (3) + grad_x (1)               = 10 values = 40 bytes
Copy bandwidth is (read + write bytes) / time of ``dst.copy_(src)`` on a 256 MiB buffer.

    python benchmarks/ops.py            # T=512 B=16 D=512 and two more shapes
    python benchmarks/ops.py --quick    # tiny shapes, for the smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_it, write_json  # noqa: E402
from srupp.ops import cpu as cpu_backend  # noqa: E402
from srupp.ops import sru_recurrence  # noqa: E402

SHAPES = [(512, 16, 512), (256, 32, 1024), (1024, 4, 256)]
QUICK_SHAPES = [(16, 2, 32)]
FORWARD_INFER_BYTES, FORWARD_TRAIN_BYTES, BACKWARD_BYTES = 20, 24, 40


def copy_bandwidth(megabytes: int) -> float:
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), repeats=5)
    return 2 * src.numel() * 4 / seconds


def load_official():
    try:
        import sru.ops as official  # compiles its C++ at first import
    except Exception as err:  # noqa: BLE001 - any failure means "not available", reported as such
        print(f"authors' sru package not available ({type(err).__name__}: {err}); skipping its column")
        return None
    return official


def time_kernels(u, x, v, b, c0, grad_h, repeats):
    """The C kernels alone on buffers allocated once: what the op costs without torch's dispatch and
    without first-touching fresh output memory (which the public path pays on every call)."""
    lib, threads = cpu_backend._library(), torch.get_num_threads()
    steps, batch, hidden = x.shape
    h, c_all, c_last, grad_u, grad_x = (torch.empty_like(t) for t in (x, x, c0, u, x))
    grad_vb, grad_c0 = x.new_empty(batch, 4, hidden), torch.empty_like(c0)
    p = [t.data_ptr() for t in (u, x, v, b, c0)]
    shape = (steps, batch, hidden, 0, threads)

    def forward():
        lib.srupp_sru_forward_f32(*p, None, None, h.data_ptr(), c_all.data_ptr(), c_last.data_ptr(), *shape)

    def backward():
        lib.srupp_sru_backward_f32(*p, None, None, c_all.data_ptr(), grad_h.data_ptr(), c_last.data_ptr(),
                                   grad_u.data_ptr(), grad_x.data_ptr(), grad_vb.data_ptr(), grad_c0.data_ptr(),
                                   *shape)  # fmt: skip

    return time_it(forward, repeats=repeats, min_seconds=0.3), time_it(backward, repeats=repeats, min_seconds=0.3)


def bench_shape(steps, batch, hidden, repeats, official):
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

    row = {"T": steps, "B": batch, "D": hidden}
    naive_repeats = max(2, repeats // 2)
    row["naive_forward_s"] = time_it(lambda: forward("naive"), repeats=naive_repeats)
    row["naive_train_s"] = time_it(lambda: train_step("naive"), repeats=naive_repeats)
    row["cpu_forward_s"] = time_it(lambda: forward("cpu"), repeats=repeats, min_seconds=0.3)
    row["cpu_train_forward_s"] = time_it(lambda: train_forward("cpu"), repeats=repeats, min_seconds=0.3)
    row["cpu_train_s"] = time_it(lambda: train_step("cpu"), repeats=repeats, min_seconds=0.3)
    row["cpu_backward_s"] = max(row["cpu_train_s"] - row["cpu_train_forward_s"], 1e-9)
    row["forward_speedup"] = row["naive_forward_s"] / row["cpu_forward_s"]
    row["train_speedup"] = row["naive_train_s"] / row["cpu_train_s"]
    elements = steps * batch * hidden
    row["cpu_forward_GBps"] = elements * FORWARD_INFER_BYTES / row["cpu_forward_s"] / 1e9
    row["cpu_train_GBps"] = elements * (FORWARD_TRAIN_BYTES + BACKWARD_BYTES) / row["cpu_train_s"] / 1e9
    kernel_forward_s, kernel_backward_s = time_kernels(u, x, v, b, c0, grad_h, repeats)
    row["kernel_train_forward_GBps"] = elements * FORWARD_TRAIN_BYTES / kernel_forward_s / 1e9
    row["kernel_backward_GBps"] = elements * BACKWARD_BYTES / kernel_backward_s / 1e9
    if official is not None:
        u_official = u.view(steps, batch, 3, hidden).transpose(2, 3).contiguous()  # their [.., D, 3] interleave
        weight_c, bias = v.reshape(-1).contiguous(), b.reshape(-1).contiguous()

        def official_forward():
            with torch.no_grad():
                return official.elementwise_recurrence_inference(
                    u_official, x, weight_c, bias, c0, 0, hidden, False, True
                )

        h_official, _ = official_forward()
        h_ours, _ = forward("cpu")
        row["official_max_abs_diff"] = (h_official - h_ours).abs().max().item()
        row["official_forward_s"] = time_it(official_forward, repeats=repeats, min_seconds=0.3)
        row["forward_vs_official"] = row["official_forward_s"] / row["cpu_forward_s"]
    return row


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    parser.add_argument("--no-official", action="store_true", help="skip the authors' sru package")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops.json)")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 2 if args.quick else 7
    official = None if args.no_official else load_official()
    copy = copy_bandwidth(16 if args.quick else 256)
    print(f"threads={torch.get_num_threads()}  copy bandwidth {copy / 1e9:.1f} GB/s (read+write)")
    header = (f"{'T':>5} {'B':>4} {'D':>5} | {'naive fwd':>9} {'cpu fwd':>8} {'x':>6} | {'naive f+b':>9} "
              f"{'cpu f+b':>8} {'x':>6} | {'fwd BW':>7} {'f+b BW':>7} | {'kernel fwd':>6} {'bwd BW':>6} "
              f"| {'sru fwd':>8} {'ours x':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for steps, batch, hidden in shapes:
        row = bench_shape(steps, batch, hidden, repeats, official)
        row["cpu_forward_bw_fraction"] = row["cpu_forward_GBps"] * 1e9 / copy
        row["cpu_train_bw_fraction"] = row["cpu_train_GBps"] * 1e9 / copy
        row["kernel_train_forward_bw_fraction"] = row["kernel_train_forward_GBps"] * 1e9 / copy
        row["kernel_backward_bw_fraction"] = row["kernel_backward_GBps"] * 1e9 / copy
        rows.append(row)
        official_cols = (f"{row['official_forward_s'] * 1e3:7.2f}m {row['forward_vs_official']:6.2f}"
                         if "official_forward_s" in row else f"{'-':>8} {'-':>6}")  # fmt: skip
        print(f"{steps:5d} {batch:4d} {hidden:5d} | "
              f"{row['naive_forward_s'] * 1e3:8.1f}m {row['cpu_forward_s'] * 1e3:7.2f}m "
              f"{row['forward_speedup']:6.1f} | {row['naive_train_s'] * 1e3:8.1f}m {row['cpu_train_s'] * 1e3:7.2f}m "
              f"{row['train_speedup']:6.1f} | {row['cpu_forward_bw_fraction']:6.0%} {row['cpu_train_bw_fraction']:6.0%}"
              f" | {row['kernel_train_forward_bw_fraction']:6.0%} {row['kernel_backward_bw_fraction']:6.0%}"
              f" | {official_cols}")  # fmt: skip
    print("times in ms; x = speed-up over naive; BW = achieved bandwidth / copy bandwidth (through the public op);")
    print("kernel BW = the C kernels alone on reused buffers; 'ours x' = authors' CPU forward time / ours")
    payload = {
        "copy_bandwidth_GBps": copy / 1e9,
        "bytes_per_element": {
            "forward_inference": FORWARD_INFER_BYTES,
            "forward_train": FORWARD_TRAIN_BYTES,
            "backward": BACKWARD_BYTES,
        },  # fmt: skip
        "rows": rows,
    }
    path = write_json("ops", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
