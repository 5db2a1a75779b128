"""Mixed precision on the CPU: one training step of a 2-layer SRUpp (d=1024, d'=256, T=256, B=16) in float32
and under bf16 autocast, timed alternately in one process, with the share of self CPU time that ``aten::copy_``
(dtype conversions and layout copies) takes in the bf16 step (torch.profiler).

The environment chooses what the CPU looks like: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` keeps oneDNN's bf16
matrix products off AMX (an AVX512-BF16 CPU's path), ``ONEDNN_MAX_CPU_ISA=AVX2`` off every bf16 instruction;
``SRUPP_CPU_ISA`` forces the recurrence kernel's variant. The CPU's clocks, caches and memory stay this one's.

    python -m benchmarks.precision                   # the step at d=1024
    python -m benchmarks.precision --quick           # tiny shapes, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import RESULTS, write_json
from srupp.nn import SRUpp

FULL = {"d": 1024, "proj": 256, "layers": 2, "steps": 256, "batch": 16}
QUICK = {"d": 64, "proj": 16, "layers": 2, "steps": 32, "batch": 4}
ENVIRONMENT = (
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
    "SRUPP_CPU_ISA",
    "OMP_NUM_THREADS",
)


def step_fn(model: torch.nn.Module, x: torch.Tensor, bf16: bool):
    """One forward and backward of ``model`` on ``x``, under bf16 autocast or not."""
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    grads = {True: upstream.bfloat16(), False: upstream}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            output, _ = model(x)
        output.backward(grads[output.dtype == torch.bfloat16])

    return step


def copy_share(step, rounds: int) -> dict[str, float]:
    """Per op, its share of the self CPU time of ``rounds`` steps (the top ones and aten::copy_)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {e.key: e.self_cpu_time_total / total for e in events}
    top = dict(sorted(shares.items(), key=lambda item: -item[1])[:6])
    return {"aten::copy_": shares.get("aten::copy_", 0.0), **top}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each precision, alternately")
    parser.add_argument(
        "--input",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the step's input dtype (bf16: as from an earlier bf16 layer)",
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/precision.json)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    torch.manual_seed(0)
    model = SRUpp(size["d"], size["d"], size["proj"], size["layers"])
    x = torch.randn(size["steps"], size["batch"], size["d"], generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16 if args.input == "bf16" else torch.float32)
    steps = {"fp32": step_fn(model, x.float(), False), "bf16": step_fn(model, x, True)}
    best = {name: float("inf") for name in steps}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if repeat:
                best[name] = min(best[name], time.perf_counter() - start)
    tokens = size["steps"] * size["batch"]
    shares = {name: copy_share(step, 2 if args.quick else 3) for name, step in steps.items()}
    environment = {name: os.environ.get(name) for name in ENVIRONMENT}
    print(
        f"2-layer SRUpp d={size['d']} d'={size['proj']} T={size['steps']} B={size['batch']}, "
        f"{torch.get_num_threads()} threads, input {args.input}, environment {environment}"
    )
    for name in steps:
        print(
            f"  {name}: step {best[name] * 1e3:8.1f} ms  {tokens / best[name]:>9,.0f} tok/s  "
            f"aten::copy_ {shares[name]['aten::copy_']:6.1%} of self CPU time"
        )
    speedup = best["fp32"] / best["bf16"]
    print(f"  bf16 step / fp32 step speed: {speedup:.2f}x")
    payload = {
        "size": size,
        "input": args.input,
        "environment": environment,
        "step_seconds": best,
        "bf16_speedup": speedup,
        "self_cpu_shares": shares,
    }
    out = args.out or RESULTS / f"precision{'_quick' * args.quick}.json"
    print(f"wrote {write_json(Path(out), payload, 'precision', argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
