"""The recurrence op's fixed cost per call: forward+backward through autograd at T=1, B=1, D=8 on the CPU,
against two torch elementwise ops with their backward on tensors of the same size, in one process.

    PYTHONPATH=src python3 -m benchmarks.overhead            # ~20 s; prints the ratio (issue 21's target: <= 2x)

Two more lines take the cost apart. ``floor`` is the least any eager path in Python costs: a bare
``torch.autograd.Function`` around the two C kernel calls, with no validation, dispatch or caching.
``autograd`` is that Function with the kernel calls taken out (the same inputs, outputs, allocations and saved
tensors): autograd's own price for a Python node of the op's shape, which no Python code can go below.

Both sides are timed in alternating rounds (the median of each round, the best round of each reported), so a
busy machine slows both alike. Writes ``overhead.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import RESULTS, provenance, write_json


def random_leaves(steps: int, batch: int, hidden: int) -> list[torch.Tensor]:
    """u, x, v, b and c0 drawn from a fixed seed, each requiring its gradient."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((steps, batch, 3 * hidden), (steps, batch, hidden), (2, hidden), (2, hidden), (batch, hidden))
    return [torch.randn(*shape, generator=generator).requires_grad_() for shape in shapes]


def random_output_grads(steps: int, batch: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of h and c_last every timed step feeds to autograd, from a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(steps, batch, hidden, generator=generator), torch.randn(batch, hidden, generator=generator)


def op_step(backend: str, steps: int, batch: int, hidden: int) -> Callable[[], object]:
    """The public op's forward and backward (``torch.autograd.grad`` of h and c_last to all five inputs)."""
    from srupp.ops import sru_recurrence

    leaves = random_leaves(steps, batch, hidden)
    grad_h, grad_c = random_output_grads(steps, batch, hidden)

    def step():
        h, c_last = sru_recurrence(*leaves, backend=backend)
        return torch.autograd.grad((h, c_last), leaves, (grad_h, grad_c))

    return step


def bare_step(steps: int, batch: int, hidden: int, *, kernels: bool = True) -> Callable[[], object]:
    """The C kernels' forward and backward in a bare autograd.Function: what any Python eager path costs at least
    (``floor``). Without ``kernels`` it allocates, saves and returns the same and computes nothing (``autograd``)."""
    from srupp.ops.cpu import kernel_function

    forward, backward = kernel_function("forward", torch.float32), kernel_function("backward", torch.float32)
    sizes = (steps, batch, hidden, 0, 1)  # not reversed, one thread

    def addresses(*tensors):
        return [t.data_ptr() for t in tensors]

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, x, v, b, c0):
            h, c_last, c_all = torch.empty_like(x), torch.empty_like(c0), torch.empty_like(x)
            if kernels:
                forward(*addresses(u, x, v, b, c0), None, None, *addresses(h, c_all, c_last), *sizes)
            ctx.save_for_backward(u, x, v, b, c0, c_all)
            return h, c_last

        @staticmethod
        def backward(ctx, grad_h, grad_c):
            u, x, v, b, c0, c_all = ctx.saved_tensors
            grad_u, grad_x, grad_c0 = torch.empty_like(u), torch.empty_like(x), torch.empty_like(c0)
            grad_vb = c0.new_empty(batch, 4, hidden)
            if kernels:
                outputs = addresses(c_all, grad_h, grad_c, grad_u, grad_x, grad_vb, grad_c0)
                backward(*addresses(u, x, v, b, c0), None, None, *outputs, *sizes)
            sums = grad_vb.sum(0)
            return grad_u, grad_x, sums[:2], sums[2:], grad_c0

    leaves = random_leaves(steps, batch, hidden)
    grad_h, grad_c = random_output_grads(steps, batch, hidden)
    return lambda: torch.autograd.grad(Bare.apply(*leaves), leaves, (grad_h, grad_c))


def elementwise_step(steps: int, batch: int, hidden: int) -> Callable[[], object]:
    """Two torch elementwise ops (a sigmoid, then a product) and their backward to both inputs."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(steps, batch, hidden, generator=generator).requires_grad_() for _ in range(2))
    grad = torch.randn(steps, batch, hidden)

    def step():
        out = torch.sigmoid(a) * b
        return torch.autograd.grad(out, (a, b), grad)

    return step


def median_seconds(function: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(backend: str, shape: tuple[int, int, int], rounds: int, calls: int) -> dict[str, object]:
    bare = backend in ("floor", "autograd")
    op = bare_step(*shape, kernels=backend == "floor") if bare else op_step(backend, *shape)
    reference = elementwise_step(*shape)
    for function in (op, reference):  # warm up: first calls load libraries and fill caches
        for _ in range(50):
            function()
    op_rounds, reference_rounds = [], []
    for _ in range(rounds):
        op_rounds.append(median_seconds(op, calls))
        reference_rounds.append(median_seconds(reference, calls))
    op_best, reference_best = min(op_rounds), min(reference_rounds)
    return {
        "backend": backend,
        "T": shape[0],
        "B": shape[1],
        "D": shape[2],
        "op_us": op_best * 1e6,
        "two_elementwise_us": reference_best * 1e6,
        "ratio": op_best / reference_best,
        "op_rounds_us": [t * 1e6 for t in op_rounds],
        "two_elementwise_rounds_us": [t * 1e6 for t in reference_rounds],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backends", default="cpu,floor,autograd,naive", help="comma-separated backends to time, floor and autograd"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(RESULTS), help="folder for overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for backend in (name for name in args.backends.split(",") if name):
        row = measure(backend, (1, 1, 8), args.rounds, args.calls)
        rows.append(row)
        print(
            f"{backend:>6}: op forward+backward {row['op_us']:7.1f} us, two elementwise ops "
            f"{row['two_elementwise_us']:6.1f} us, ratio {row['ratio']:.2f}x",
            flush=True,
        )
    write_json(Path(args.out) / "overhead.json", {"rows": rows}, "overhead", argv, provenance("overhead", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
