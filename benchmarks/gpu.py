"""One GPU session in one command: every stage of issue 21's device checks, in order, within 7 minutes.

    PYTHONPATH=src python3 -m benchmarks.gpu --out "$OUT"            # on a CUDA machine, at most --time-limit s
    PYTHONPATH=src python3 -m benchmarks.gpu --dry-run --out /tmp/x  # the same plumbing on CPU, tiny shapes

Nothing has to be built or installed: the GPU path needs torch and triton only (the authors' package, for
stage 7, travels as a wheel in ``vendor/``; see BENCHMARKS.md). Stages, each with a time cap (seconds on a
GPU), recorded in ``gpu.json`` as ok / failed / skipped with its error, so one failure loses nothing:

1. ``spec`` (45): forward and every gradient of each Triton kernel variant against the naive spec (float64
   for fp32 inputs) with padding, c0 and mask_c and NaN-filled allocations: first a small odd shape in both
   directions (lanes past D, T not a multiple of any block), then the paper's per-GPU shape.
2. ``raw`` (75): device copy bandwidth, then the raw ops of each variant (lean, legacy, and prefetch: one lane
   per thread, compiled for each B and D) at each shape and dtype, launched back to back (forward for inference,
   forward keeping states, backward, forward then backward), as a fraction of the copy's bandwidth. Bytes per
   element of [T, B, D] (a = activation bytes, states float32): forward 5a, forward keeping states 5a + 4,
   backward 9a + 4. Last, the bf16 prefetch forward at the paper's shape with shorter and longer blocks.
3. ``autograd`` (20): the public op's forward+backward through autograd against the raw kernels.
4. ``sdpa`` (20): attention at the paper's width d'=768 over memory: a boolean mask, the lower-right causal
   bias, 4 heads (192 wide: flash), no memory; which SDPA kernel served each and its time.
5. ``paper`` (80): the ``enwik8-base`` SRU++ (memory carried) against a GPT of as many parameters with flash
   SDPA, bf16, one AdamW step, eager and graphed (CUDA graphs), with the profiler's split of the eager step.
6. ``small`` (30): the 7.6M-parameter pair (d=1024, 6 layers, T=1024, B=8), eager and graphed.
7. ``authors`` (60): the authors' CUDA kernel, built from ``vendor/sru-*.whl`` in a subprocess capped at
   60 s, against ours; why not, where it does not build.
8. ``race`` (60): bits per byte after the same GPU time for SRU++ and the Transformer at >= 20M parameters.
9. ``tests``: ``pytest -m gpu`` with the time left (full output in ``gpu_tests.log``): first PRIORITY_TESTS (the
   prefetch kernels at odd shapes, the trainer on a GPU), then the rest.

A stage runs only while the global deadline (``--time-limit``, default 420 s) leaves time; rows inside it stop
at its cap. ``gpu.json`` (rewritten atomically after every row) and ``gpu.log`` keep everything done so far.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import ROOT, provenance, write_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The paper's per-GPU enwik8 shape (T=1024, B=4, d=3072), a small one, and its Wiki-103 one (B=8, d=4096).
SHAPES = [(1024, 4, 3072), (512, 16, 512), (1024, 8, 4096)]
DRY_SHAPES = [(6, 2, 40)]
# Stage 1's odd shape: D not a multiple of any block (lanes past D), T not a multiple of any block of steps.
ODD_SPEC_SHAPE, DRY_SPEC_SHAPE = (37, 5, 1000), (5, 3, 33)
# Steps per block of the prefetch forward timed besides its default (PREFETCH_STEPS) in stage 2.
PREFETCH_DEPTHS = (8, 24)
# Their sum (390) leaves the GPU tests at least 30 s of the default 420 s limit, plus what earlier stages leave.
STAGE_CAPS = {"spec": 45, "raw": 75, "autograd": 20, "sdpa": 20, "paper": 80, "small": 30, "authors": 60,
              "race": 60, "tests": 0}  # fmt: skip
# Run first in stage 9, before the rest of ``pytest -m gpu`` (which collects hundreds of cases in file order).
PRIORITY_TESTS = ("tests/ops/test_triton_kernel.py::test_cuda_prefetch_larger_shapes", "tests/train/test_loop.py")


class Run:
    """Results and log of one run, written to disk after every row so a crash or a timeout loses nothing."""

    def __init__(self, out: Path, deadline: float, device: torch.device, dry: bool) -> None:
        self.out, self.deadline, self.device, self.dry = out, deadline, device, dry
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = out / "gpu.json", out / "gpu.log"
        self.log_path.write_text("")
        self.results: dict[str, object] = {"stages": {}}
        self.stage_deadline = deadline
        self.timer = Timer(device)

    def remaining(self) -> float:
        """Seconds left in the current stage (its cap, and the run's deadline)."""
        return min(self.deadline, self.stage_deadline) - time.monotonic()

    def log(self, message: str) -> None:
        print(message, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(message + "\n")

    def save(self) -> None:
        write_atomic(self.json_path, json.dumps(self.results, indent=2, default=str) + "\n")

    def row(self, stage: str, row: dict[str, object]) -> dict[str, object]:
        """Record one row of ``stage`` and write the results file."""
        self.results["stages"][stage].setdefault("rows", []).append(row)
        self.save()
        self.log(f"  {json.dumps(row, default=str)}")
        return row

    def stage(self, name: str, function: Callable[[Run], object], cap: float) -> None:
        """Run one stage within ``cap`` seconds, recording ok / failed (traceback in the log) / skipped."""
        record: dict[str, object] = {}
        self.results["stages"][name] = record
        left = self.deadline - time.monotonic()
        if left < (1.0 if self.dry else 10.0):
            record.update(status="skipped", reason=f"{left:.0f} s left of the time limit")
            self.log(f"== {name}: skipped ({record['reason']})")
            self.save()
            return
        self.log(f"== {name} (cap {cap:.0f} s)")
        started = time.monotonic()
        self.stage_deadline = started + cap if cap else self.deadline
        try:
            record["result"] = function(self)
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - a failing stage is a result; the others still run
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            self.log(traceback.format_exc().rstrip())
            self.log(f"== {name}: FAILED ({record['error']})")
        finally:
            self.stage_deadline = self.deadline
        record["seconds"] = round(time.monotonic() - started, 2)
        self.save()


class Timer:
    """Seconds of a callable: CUDA events on a GPU, the wall clock on the CPU (dry runs time nothing real)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, function: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
        """The median of ``repeats`` calls, each timed alone (host overhead included)."""
        if self.device.type == "cpu":
            repeats, warmup = 1, min(warmup, 1)
        for _ in range(warmup):
            function()
        self.synchronize()
        times = []
        for _ in range(repeats):
            started = self.start()
            function()
            times.append(self.stop(started))
        return statistics.median(times)

    def back_to_back(self, function: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
        """The mean of ``repeats`` calls launched back to back: the GPU time of the kernels without the host's
        launch gaps (what a model running ahead of the GPU sees)."""
        if self.device.type == "cpu":
            repeats, warmup = 1, min(warmup, 1)
        for _ in range(warmup):
            function()
        self.synchronize()
        started = self.start()
        for _ in range(repeats):
            function()
        return self.stop(started) / repeats

    def start(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> float:
        if self.device.type != "cuda":
            return time.perf_counter() - started
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return started.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def environment(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"not importable: {err}"
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            capability=list(torch.cuda.get_device_capability(device)),
            sms=properties.multi_processor_count,
            memory_GiB=round(properties.total_memory / 2**30, 1),
        )
    return info


def kernel_variants() -> tuple[str, ...]:
    """The Triton backend's kernel variants: the lean kernels, the legacy ones they replace, and the prefetch
    kernels (one lane per thread for 16-bit activations too)."""
    from srupp.ops import triton_kernel

    return triton_kernel.VARIANTS


def kernel_variant(name: str) -> contextlib.AbstractContextManager:
    """Every launch inside runs kernel variant ``name``."""
    from srupp.ops import triton_kernel

    return triton_kernel.launch_overrides(variant=name)


def make_inputs(steps: int, batch: int, hidden: int, dtype: torch.dtype, device: torch.device, *, padded: bool):
    # Drawn on the device: a few hundred million normal samples on the host would take seconds per row.
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    inputs = {
        "u": randn(steps, batch, 3 * hidden).to(dtype),
        "x": randn(steps, batch, hidden).to(dtype),
        "v": randn(2, hidden) * 0.5,
        "b": randn(2, hidden) * 0.5,
        "c0": randn(batch, hidden) if padded else torch.zeros(batch, hidden, device=device),
        "mask_pad": None,
        "mask_c": None,
        "grad_h": randn(steps, batch, hidden).to(dtype),
        "grad_c": randn(batch, hidden),
    }
    if padded:
        # Sequences of different lengths (a padded tail) and one with a padded step in the middle.
        lengths = torch.linspace(steps, max(1, steps // 3), batch).long()
        mask_pad = torch.arange(steps)[:, None] >= lengths[None, :]
        mask_pad[steps // 2, 0] = True
        inputs["mask_pad"] = mask_pad.to(device)
        inputs["mask_c"] = (torch.rand(batch, hidden, generator=generator, device=device) > 0.2) / 0.8
    return inputs


def forward_and_grads(inputs: dict, backend: str, compute: torch.dtype | None, reverse: bool) -> list[torch.Tensor]:
    """h, c_last and the gradients of (u, x, v, b, c0) through ``sru_recurrence`` (``compute`` casts inputs)."""
    from srupp.ops import sru_recurrence

    leaves = [
        (inputs[name] if compute is None else inputs[name].to(compute)).detach().requires_grad_()
        for name in ("u", "x", "v", "b", "c0")
    ]
    mask_c = inputs["mask_c"] if compute is None or inputs["mask_c"] is None else inputs["mask_c"].to(compute)
    h, c_last = sru_recurrence(*leaves, mask_pad=inputs["mask_pad"], mask_c=mask_c, reverse=reverse, backend=backend)
    grads = torch.autograd.grad((h, c_last), leaves, (inputs["grad_h"].to(h.dtype), inputs["grad_c"].to(c_last.dtype)))
    return [h.detach(), c_last.detach(), *grads]


def spec_row(shape, variant: str, dtype_name: str, reverse: bool, device: torch.device) -> dict[str, object]:
    """One variant, dtype and direction against the naive spec; NaN-filled allocations expose elements never
    written."""
    reference, tolerance = (torch.float64, 1e-4) if dtype_name == "fp32" else (torch.float32, 2e-2)
    inputs = make_inputs(*shape, DTYPES[dtype_name], device, padded=True)
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # torch.empty now fills floats with NaN
    try:
        with kernel_variant(variant):
            result = forward_and_grads(inputs, "triton", None, reverse)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    expected = forward_and_grads(inputs, "naive", reference, reverse)
    row: dict[str, object] = {
        "T": shape[0],
        "B": shape[1],
        "D": shape[2],
        "variant": variant,
        "dtype": dtype_name,
        "reverse": reverse,
        "tolerance": tolerance,
    }
    failures = []
    for name, actual, wanted in zip(
        ("h", "c_last", "grad_u", "grad_x", "grad_v", "grad_b", "grad_c0"), result, expected, strict=True
    ):
        finite = bool(torch.isfinite(actual).all())
        # Relative to the largest reference value: meaningful for sums over thousands of rows too.
        scale = wanted.double().abs().max().clamp_min(1e-30)
        error = ((actual.double() - wanted.double()).abs().max() / scale).item()
        row[name] = error
        if not finite or error > tolerance:
            failures.append(f"{name} (finite={finite}, error {error:.2e})")
    row["ok"] = not failures
    return row


def spec_cases(dry: bool) -> list[tuple[tuple[int, int, int], str, str, bool]]:
    """(shape, variant, dtype, reverse) in the order stage 1 runs them: the odd shape in both directions first
    (its lanes past D and leftover steps are where the kernels differ most), then the paper's shape, fp32 forward
    and bf16 reverse (on a dry run the odd shape only)."""
    odd = [
        (DRY_SPEC_SHAPE if dry else ODD_SPEC_SHAPE, variant, dtype_name, reverse)
        for variant in kernel_variants()
        for dtype_name in DTYPES
        for reverse in (False, True)
    ]
    paper = [
        (SHAPES[0], variant, dtype_name, dtype_name != "fp32") for variant in kernel_variants() for dtype_name in DTYPES
    ]
    return odd if dry else odd + paper


def stage_spec(run: Run) -> dict[str, object]:
    rows, skipped = [], []
    for shape, variant, dtype_name, reverse in spec_cases(run.dry):
        if run.remaining() < (0.5 if run.dry else 3):
            skipped.append(f"{shape} {variant} {dtype_name} reverse={reverse}")
            continue
        rows.append(run.row("spec", spec_row(shape, variant, dtype_name, reverse, run.device)))
    failed = [
        f"{row['variant']} {row['dtype']} {(row['T'], row['B'], row['D'])} reverse={row['reverse']}"
        for row in rows
        if not row["ok"]
    ]
    if failed:
        raise AssertionError(f"differs from the naive spec: {', '.join(failed)}")
    return {"variants": list(kernel_variants()), "rows": len(rows), "skipped_for_time": skipped}


def copy_bandwidth(run: Run) -> float:
    """Device-to-device copy bandwidth (read + write) in bytes per second: the yardstick of every fraction."""
    source = torch.ones((1 << 16) if run.dry else (1 << 27), device=run.device)  # 512 MiB of float32 on a GPU
    target = torch.empty_like(source)
    seconds = run.timer.back_to_back(lambda: target.copy_(source), repeats=20)
    return 2 * source.numel() * 4 / seconds


def raw_row(run: Run, shape, variant: str, dtype_name: str, copy: float) -> dict[str, object]:
    """Times of the raw launchers of one kernel variant at one shape and dtype, launched back to back."""
    from srupp.ops import triton_kernel

    steps, batch, hidden = shape
    inputs = make_inputs(steps, batch, hidden, DTYPES[dtype_name], run.device, padded=False)
    u, x, v, b, c0, grad_h, grad_c = (inputs[k] for k in ("u", "x", "v", "b", "c0", "grad_h", "grad_c"))
    forward, backward = triton_kernel.launch_forward, triton_kernel.launch_backward
    repeats = 20
    with kernel_variant(variant):
        c_all = forward(u, x, v, b, c0, None, None, False, True)[2]
        seconds = {
            "forward_inference": run.timer.back_to_back(
                lambda: forward(u, x, v, b, c0, None, None, False, False), repeats=repeats
            ),
            "forward_keep_states": run.timer.back_to_back(
                lambda: forward(u, x, v, b, c0, None, None, False, True), repeats=repeats
            ),
            "backward": run.timer.back_to_back(
                lambda: backward(u, x, v, b, c0, None, None, c_all, grad_h, grad_c, False), repeats=repeats
            ),
            "forward_backward_raw": run.timer.back_to_back(
                lambda: backward(
                    u,
                    x,
                    v,
                    b,
                    c0,
                    None,
                    None,
                    forward(u, x, v, b, c0, None, None, False, True)[2],
                    grad_h,
                    grad_c,
                    False,
                ),
                repeats=repeats,
            ),
        }
    a = torch.finfo(DTYPES[dtype_name]).bits // 8
    moved = {"forward_inference": 5 * a, "forward_keep_states": 5 * a + 4, "backward": 9 * a + 4,
             "forward_backward_raw": 14 * a + 8}  # fmt: skip
    row: dict[str, object] = {"T": steps, "B": batch, "D": hidden, "variant": variant, "dtype": dtype_name}
    for name, value in seconds.items():
        row[f"{name}_ms"] = value * 1e3
        row[f"{name}_of_copy"] = steps * batch * hidden * moved[name] / value / copy
    return row


def stage_raw(run: Run) -> dict[str, object]:
    copy = copy_bandwidth(run)
    run.log(f"  device-to-device copy: {copy / 1e9:.0f} GB/s (read + write)")
    run.results["copy_GBps"] = copy / 1e9
    skipped = []
    for shape in DRY_SHAPES if run.dry else SHAPES:
        for dtype_name in DTYPES:
            for variant in kernel_variants():
                if run.remaining() < (0.5 if run.dry else 4):
                    skipped.append(f"{shape} {dtype_name} {variant}")
                    continue
                run.row("raw", raw_row(run, shape, variant, dtype_name, copy))
    # Last, so they never displace the rows above: the prefetch forward with shorter and longer blocks.
    for steps in PREFETCH_DEPTHS:
        if run.remaining() < (0.5 if run.dry else 4):
            skipped.append(f"prefetch steps={steps}")
            continue
        run.row("raw", prefetch_depth_row(run, DRY_SHAPES[0] if run.dry else SHAPES[0], steps, copy))
    return {"copy_GBps": copy / 1e9, "skipped_for_time": skipped}


def prefetch_depth_row(run: Run, shape, steps: int, copy: float) -> dict[str, object]:
    """The bf16 prefetch forward (keeping states) with blocks of ``steps`` steps: its loads are issued one block
    ahead, so if a block of the default size does not cover DRAM latency, longer blocks are faster per step."""
    from srupp.ops import triton_kernel

    inputs = make_inputs(*shape, torch.bfloat16, run.device, padded=False)
    u, x, v, b, c0 = (inputs[k] for k in ("u", "x", "v", "b", "c0"))
    with triton_kernel.launch_overrides(variant="prefetch", steps=steps):
        seconds = run.timer.back_to_back(
            lambda: triton_kernel.launch_forward(u, x, v, b, c0, None, None, False, True), repeats=20
        )
    steps_total, batch, hidden = shape
    return {
        "T": steps_total,
        "B": batch,
        "D": hidden,
        "variant": "prefetch",
        "dtype": "bf16",
        "steps": steps,
        "forward_keep_states_ms": seconds * 1e3,
        "forward_keep_states_of_copy": steps_total * batch * hidden * (5 * 2 + 4) / seconds / copy,
    }


def autograd_row(run: Run, shape, dtype_name: str) -> dict[str, object]:
    """Forward+backward of the public op through autograd (host path included) against the raw launchers."""
    from srupp.ops import sru_recurrence, triton_kernel

    steps, batch, hidden = shape
    inputs = make_inputs(steps, batch, hidden, DTYPES[dtype_name], run.device, padded=False)
    u, x, v, b, c0, grad_h, grad_c = (inputs[k] for k in ("u", "x", "v", "b", "c0", "grad_h", "grad_c"))
    forward, backward = triton_kernel.launch_forward, triton_kernel.launch_backward
    leaves = [t.detach().requires_grad_() for t in (u, x, v, b, c0)]

    def raw():
        backward(u, x, v, b, c0, None, None, forward(u, x, v, b, c0, None, None, False, True)[2], grad_h, grad_c, False)

    def through_autograd():
        h, c_last = sru_recurrence(*leaves, backend="triton")
        torch.autograd.grad((h, c_last), leaves, (grad_h, grad_c))

    row: dict[str, object] = {"T": steps, "B": batch, "D": hidden, "dtype": dtype_name}
    for name, function in (("raw", raw), ("autograd", through_autograd)):
        row[f"{name}_ms"] = run.timer(function, repeats=20) * 1e3  # each call alone: host time counts
        row[f"{name}_back_to_back_ms"] = run.timer.back_to_back(function, repeats=20) * 1e3
    row["autograd_over_raw"] = row["autograd_ms"] / row["raw_ms"]
    row["autograd_over_raw_back_to_back"] = row["autograd_back_to_back_ms"] / row["raw_back_to_back_ms"]
    return row


def stage_autograd(run: Run) -> dict[str, object]:
    shapes = [(1, 1, 8), *DRY_SHAPES] if run.dry else [(1, 1, 8), *SHAPES]
    ratios = {}
    for shape in shapes:
        for dtype_name in DTYPES:
            if run.remaining() < (0.5 if run.dry else 3):
                break
            row = run.row("autograd", autograd_row(run, shape, dtype_name))
            ratios[f"{shape} {dtype_name}"] = round(row["autograd_over_raw"], 3)
    return {"autograd_over_raw": ratios}


def stage_tests(run: Run) -> dict[str, object]:
    """``pytest -m gpu`` in subprocesses with the time left: PRIORITY_TESTS first, then every other GPU test."""
    if importlib.util.find_spec("pytest") is None:
        return {"returncode": None, "summary": "not run: pytest is not installed here"}
    if run.results.get("fail") == "tests":
        groups = {"priority": ["tests/does_not_exist.py"]}
    else:
        groups = {
            "priority": list(PRIORITY_TESTS),
            "rest": [*gpu_test_files(), *(f"--deselect={t}" for t in PRIORITY_TESTS)],
        }
    runs, log = {}, []
    for name, arguments in groups.items():
        if run.remaining() < (1 if run.dry else 8):
            runs[name] = {"returncode": None, "summary": f"not run: {run.remaining():.0f} s left"}
            continue
        runs[name], output = pytest_gpu(run, arguments)
        log.append(f"==== {name}: pytest -m gpu {' '.join(arguments)}\n{output}")
        (run.out / "gpu_tests.log").write_text("\n".join(log))
    summary = "; ".join(f"{name}: {result['summary']}" for name, result in runs.items())
    failed = [name for name, result in runs.items() if result["returncode"] not in (0, None)]
    if failed:
        raise RuntimeError(f"GPU tests failed ({', '.join(failed)}): {summary} (full output in gpu_tests.log)")
    codes = [result["returncode"] for result in runs.values()]
    return {"returncode": None if None in codes else 0, "summary": summary, "runs": runs}


def pytest_gpu(run: Run, arguments: list[str]) -> tuple[dict[str, object], str]:
    """One ``pytest -m gpu`` subprocess over ``arguments`` until the stage's time is up: its result and output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *arguments]
    timeout = max(5.0, run.remaining() - 3)
    run.log(f"$ PYTHONPATH=src {' '.join(command[1:])}  (timeout {timeout:.0f} s)")
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        returncode = None
    lines = output.strip().splitlines()
    summary = f"timed out after {timeout:.0f} s" if returncode is None else (lines[-1] if lines else "")
    run.log("\n".join(lines[-20:]))
    return {"returncode": returncode, "summary": summary}, output


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests; collecting only these keeps unrelated modules out of the way."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in path.read_text()
    )


def stages() -> dict[str, Callable[[Run], object]]:
    from benchmarks import gpu_models

    return {
        "spec": stage_spec,
        "raw": stage_raw,
        "autograd": stage_autograd,
        "sdpa": gpu_models.stage_sdpa,
        "paper": gpu_models.stage_paper,
        "small": gpu_models.stage_small,
        "authors": gpu_models.stage_authors,
        "race": gpu_models.stage_race,
        "tests": stage_tests,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")
    parser.add_argument("--out", default=default_out, help="results folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny shapes, Triton interpreter")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds for all stages together")
    parser.add_argument("--only", default=",".join(STAGE_CAPS), help="comma-separated stages to run (a rerun)")
    # For the script's own tests: make one stage fail on purpose.
    parser.add_argument("--fail", choices=list(STAGE_CAPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    unknown = set(args.only) - set(STAGE_CAPS)
    if unknown:
        parser.error(f"--only: unknown stages {sorted(unknown)}; choose from {', '.join(STAGE_CAPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read per launch: CPU tensors run in Triton's interpreter
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run on CPU")
        return 1
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    run = Run(Path(args.out), started + args.time_limit, device, args.dry_run)
    run.results.update(provenance=provenance("gpu", argv), arguments=vars(args), environment=environment(device))
    run.results["fail"] = args.fail
    run.log(json.dumps(run.results["environment"]))
    run.save()
    scale = 0.25 if args.dry_run else 1.0
    for name, function in stages().items():
        if name not in args.only:
            run.results["stages"][name] = {"status": "skipped", "reason": "not in --only"}
            continue
        if args.fail == name and name != "tests":
            function = fail_on_purpose
        run.stage(name, function, STAGE_CAPS[name] * scale)
    statuses = {name: stage["status"] for name, stage in run.results["stages"].items()}
    run.results.update(summary=statuses, seconds=round(time.monotonic() - started, 1))
    run.log(f"done in {run.results['seconds']} s: {statuses}; results in {run.json_path}")
    run.save()
    return 1 if "failed" in statuses.values() else 0


def fail_on_purpose(run: Run) -> None:
    raise RuntimeError("--fail: this stage fails on purpose")


if __name__ == "__main__":
    sys.exit(main())
