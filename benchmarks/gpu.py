"""One GPU session in one command: the GPU tests, then the Triton recurrence's speed, then SRU++ training speed.

    PYTHONPATH=src python3 -m benchmarks.gpu --out "$OUT"      # on a CUDA machine, about 5 minutes
    PYTHONPATH=src python3 -m benchmarks.gpu --dry-run --out /tmp/x   # the same plumbing on CPU, seconds

Nothing has to be built or installed: the GPU path needs torch and triton only. Sections, in order, each
recorded in ``gpu.json`` as ok / failed / skipped with its error, so one failure loses nothing before it:

1. ``tests``: ``pytest -m gpu`` on the test files with GPU tests, in a subprocess with ``PYTHONPATH=src``
   (full output in ``gpu_tests.log``). If they fail the script stops here with their summary (exit 2)
   unless ``--keep-going``; if they run out of their time budget (150 s at most) it goes on.
2. ``copy``: device-to-device copy bandwidth, the yardstick for every bandwidth figure below.
3. ``check``: forward and every gradient of the Triton kernel against the naive spec (float64 for fp32
   inputs) at the paper's per-GPU shape, with padding, c0 and mask_c; allocations are NaN-filled
   (deterministic mode) so an element the kernel forgets to write shows up as NaN.
4. ``kernels``: per shape x dtype x STAGES, times (CUDA events) of the raw ops launched back to back (the
   mean of 20: forward for inference, forward keeping states, backward, forward then backward) and the
   median of forward+backward through autograd (``torch.autograd.grad``, so nothing accumulates in
   ``.grad``; host overhead included), with achieved bandwidth as a fraction of the copy's. Bytes per
   element of [T, B, D], a = activation bytes (4 fp32, 2 bf16), states float32:
   forward inference 5a (u 3a + x a read, h a written), forward keeping states 5a + 4, backward 9a + 4
   (u, x, grad_h and c_{t-1} read; grad_u, grad_x written).
5. ``official``: the authors' CUDA kernel on the same shapes, only with ``--official`` and when ``sru`` imports.
6. ``training``: tokens/s of one bf16-autocast AdamW step of a byte-level SRU++ LM against the GPT-style
   Transformer of ``benchmarks.baselines`` with about as many parameters.
7. ``tuning``: with the time left, block sizes 1x, 2x, 4x the smallest (one warp each) at the first shape.

A global deadline (``--time-limit``, default 330 s) is checked between rows: what does not fit is skipped
and recorded as such. ``gpu.json`` and ``gpu.log`` are rewritten after every row.
"""

from __future__ import annotations

import argparse
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

from benchmarks.common import ROOT, authors_u, provenance, require_agreement

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The paper's per-GPU enwik8 shape (T=1024, B=4, d=3072), its Wiki-103 one (B=8, d=4096), and a small one.
SHAPES = [(1024, 4, 3072), (1024, 8, 4096), (512, 16, 512)]
STAGES = (8, 4, 1, 16)
DRY_SHAPES = [(6, 2, 40)]
DRY_STAGES = (4, 1)


class Run:
    """Results and log of one run, written to disk after every change so a crash loses nothing."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out = out
        self.deadline = deadline
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / "gpu.json"
        self.log_path = out / "gpu.log"
        self.log_path.write_text("")
        self.results: dict[str, object] = {"sections": {}, "rows": [], "training": []}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        print(message, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(message + "\n")

    def save(self) -> None:
        temporary = self.json_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        temporary.replace(self.json_path)

    def section(self, name: str, function: Callable[[], object], *, needs: float = 0.0) -> bool:
        """Run one section, recording ok / failed (with the traceback in the log) / skipped (no time left)."""
        record: dict[str, object] = {}
        self.results["sections"][name] = record
        if self.remaining() < needs:
            record.update(
                status="skipped", reason=f"{self.remaining():.0f} s left of the time limit, needs {needs:.0f}"
            )
            self.log(f"== {name}: skipped ({record['reason']})")
            self.save()
            return False
        self.log(f"== {name}")
        started = time.monotonic()
        try:
            record["result"] = function()
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - a failing section is a result; the others still run
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            self.log(traceback.format_exc().rstrip())
            self.log(f"== {name}: FAILED ({record['error']})")
        record["seconds"] = round(time.monotonic() - started, 2)
        self.save()
        return record["status"] == "ok"


class Timer:
    """Median seconds of a callable: CUDA events on a GPU, the wall clock on CPU (dry runs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, function: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
        if self.device.type == "cpu":  # dry runs check plumbing, not speed
            repeats, warmup = 1, min(warmup, 1)
        for _ in range(warmup):
            function()
        self.synchronize()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                started = time.perf_counter()
                function()
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    def back_to_back(self, function: Callable[[], object], *, repeats: int, warmup: int = 2) -> float:
        """Mean seconds of ``repeats`` calls launched back to back between two events: the GPU time of the
        kernels without the host's launch gaps (what a model running ahead of the GPU sees)."""
        if self.device.type == "cpu":
            return self(function, repeats=1, warmup=min(warmup, 1))
        for _ in range(warmup):
            function()
        self.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

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


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests; collecting only these keeps unrelated modules out of the way."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text())  # fmt: skip


def run_tests(run: Run, files: list[str], timeout: float) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *files]
    run.log("$ PYTHONPATH=src " + " ".join(command[1:]))
    started = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, returncode = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        returncode = None
    (run.out / "gpu_tests.log").write_text(output)
    lines = output.strip().splitlines()
    summary = lines[-1] if lines else ""
    run.log("\n".join(lines[-30:]))
    if returncode is None:
        summary = f"timed out after {timeout:.0f} s"
    return {"returncode": returncode, "summary": summary, "seconds": round(time.monotonic() - started, 1)}


def copy_bandwidth(device: torch.device, timer: Timer, dry: bool) -> dict[str, float]:
    source = torch.ones((1 << 16) if dry else (1 << 27), device=device)  # 512 MiB of float32 on a GPU
    target = torch.empty_like(source)
    seconds = timer(lambda: target.copy_(source), repeats=3 if dry else 30)
    return {"bytes": 2 * source.numel() * 4, "seconds": seconds, "GBps": 2 * source.numel() * 4 / seconds / 1e9}


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

    leaves = [(inputs[name] if compute is None else inputs[name].to(compute)).detach().requires_grad_()
              for name in ("u", "x", "v", "b", "c0")]  # fmt: skip
    mask_c = inputs["mask_c"] if compute is None or inputs["mask_c"] is None else inputs["mask_c"].to(compute)
    h, c_last = sru_recurrence(*leaves, mask_pad=inputs["mask_pad"], mask_c=mask_c, reverse=reverse, backend=backend)
    grads = torch.autograd.grad((h, c_last), leaves, (inputs["grad_h"].to(h.dtype), inputs["grad_c"].to(c_last.dtype)))
    return [h.detach(), c_last.detach(), *grads]


def check_against_spec(shape: tuple[int, int, int], device: torch.device) -> list[dict[str, object]]:
    """Triton against the naive spec at one benchmark shape; NaN-filled allocations expose unwritten elements."""
    names = ["h", "c_last", "grad_u", "grad_x", "grad_v", "grad_b", "grad_c0"]
    rows = []
    for dtype_name, reference_dtype, reverse, tolerance in (("fp32", torch.float64, False, 1e-4),
                                                            ("bf16", torch.float32, True, 2e-2)):  # fmt: skip
        inputs = make_inputs(*shape, DTYPES[dtype_name], device, padded=True)
        saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # torch.empty now fills floats with NaN
        try:
            result = forward_and_grads(inputs, "triton", None, reverse)
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        expected = forward_and_grads(inputs, "naive", reference_dtype, reverse)
        row: dict[str, object] = {"T": shape[0], "B": shape[1], "D": shape[2], "dtype": dtype_name, "reverse": reverse,
                                  "reference": str(reference_dtype), "tolerance": tolerance}  # fmt: skip
        failures = []
        for name, actual, wanted in zip(names, result, expected, strict=True):
            finite = bool(torch.isfinite(actual).all())
            # Error relative to the largest reference value: meaningful for sums over 4096 rows too.
            error = (
                (actual.double() - wanted.double()).abs().max() / wanted.double().abs().max().clamp_min(1e-30)
            ).item()
            row[name] = {"finite": finite, "max_error_over_max_value": error}
            if not finite or error > tolerance:
                failures.append(f"{name} (finite={finite}, error {error:.2e})")
        row["ok"] = not failures
        rows.append(row)
        if failures:
            raise AssertionError(f"{dtype_name}: Triton differs from the naive spec in {', '.join(failures)}")
    return rows


def kernel_row(shape, dtype_name: str, stages: int, device: torch.device, timer: Timer, copy: float, dry: bool,
               block_d: int | None = None, num_warps: int | None = None):  # fmt: skip
    """Times of the raw ops and of autograd forward+backward at one shape, dtype and pipeline depth
    (and block size and warps when given; else the launcher's choice)."""
    from srupp.ops import triton_kernel

    steps, batch, hidden = shape
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(steps, batch, hidden, dtype, device, padded=False)
    u, x, v, b, c0, grad_h = (inputs[name] for name in ("u", "x", "v", "b", "c0", "grad_h"))
    grad_c = inputs["grad_c"]
    repeats = 3 if dry else 20
    row: dict[str, object] = {"T": steps, "B": batch, "D": hidden, "dtype": dtype_name, "stages": stages}
    with triton_kernel.launch_overrides(stages=stages, block_d=block_d, num_warps=num_warps):
        block, warps, _ = triton_kernel._launch_config(batch, hidden, u.element_size(), device)
        row.update(block_d=block, num_warps=warps)
        forward = triton_kernel.sru_triton_forward
        backward = triton_kernel.sru_triton_backward
        _, _, c_all = forward(u, x, v, b, c0, None, None, False, True)
        seconds = {
            "forward_inference": timer.back_to_back(
                lambda: forward(u, x, v, b, c0, None, None, False, False), repeats=repeats
            ),
            "forward_keep_states": timer.back_to_back(
                lambda: forward(u, x, v, b, c0, None, None, False, True), repeats=repeats
            ),
            "backward": timer.back_to_back(
                lambda: backward(u, x, v, b, c0, None, None, c_all, grad_h, grad_c, False), repeats=repeats
            ),
            "forward_backward_raw": timer.back_to_back(
                lambda: backward(u, x, v, b, c0, None, None, forward(u, x, v, b, c0, None, None, False, True)[2],
                                 grad_h, grad_c, False),
                repeats=repeats,
            ),
        }  # fmt: skip
        leaves = [t.detach().requires_grad_() for t in (u, x, v, b, c0)]

        def autograd_step():
            from srupp.ops import sru_recurrence

            h, c_last = sru_recurrence(*leaves, backend="triton")
            return torch.autograd.grad((h, c_last), leaves, (grad_h, grad_c))

        seconds["forward_backward_autograd"] = timer(autograd_step, repeats=repeats)
    a = torch.finfo(dtype).bits // 8
    elements = steps * batch * hidden
    moved = {"forward_inference": 5 * a, "forward_keep_states": 5 * a + 4, "backward": 9 * a + 4,
             "forward_backward_raw": 14 * a + 8, "forward_backward_autograd": 14 * a + 8}  # fmt: skip
    for name, value in seconds.items():
        row[f"{name}_ms"] = value * 1e3
        row[f"{name}_bw_fraction"] = elements * moved[name] / value / copy
    return row


def official_row(shape, dtype_name: str, device: torch.device, timer: Timer, official) -> dict[str, object]:
    steps, batch, hidden = shape
    from srupp.ops import sru_recurrence

    inputs = make_inputs(steps, batch, hidden, DTYPES[dtype_name], device, padded=False)
    # Their u interleaves the three streams per feature; v and b are flat.
    u = authors_u(inputs["u"])
    leaves = [t.detach().requires_grad_() for t in (u, inputs["x"], inputs["v"].reshape(-1), inputs["b"].reshape(-1))]

    def forward():
        with torch.no_grad():
            return official.elementwise_recurrence_gpu(
                *(t.detach() for t in leaves), inputs["c0"], 0, hidden, False, True
            )

    def forward_backward():
        h, _ = official.elementwise_recurrence_gpu(*leaves, inputs["c0"], 0, hidden, False, True)
        return torch.autograd.grad(h, leaves, inputs["grad_h"].to(h.dtype))

    # Both in float32 from the same (possibly bf16) inputs: the authors' op computes in float32 too.
    spec, _ = sru_recurrence(*(inputs[k].float() for k in ("u", "x", "v", "b", "c0")), backend="naive")
    agreement = require_agreement(forward()[0], spec, f"{dtype_name} forward at {shape}", 1e-3)
    return {"T": steps, "B": batch, "D": hidden, "dtype": dtype_name, "max_abs_diff_to_spec": agreement,
            "forward_inference_ms": timer(forward, repeats=20) * 1e3,
            "forward_backward_autograd_ms": timer(forward_backward, repeats=20) * 1e3}  # fmt: skip


def training_rows(run: Run, device: torch.device, timer: Timer, dry: bool) -> list[dict[str, object]]:
    """One bf16-autocast AdamW step of SRU++ and of a Transformer of about as many parameters."""
    from benchmarks.baselines import build, count_parameters, size_to_match

    width, layers, steps, batch, repeats = (32, 1, 16, 2, 2) if dry else (1024, 6, 1024, 8, 8)
    reference = {"srupp": width}
    with torch.device("meta"):
        target = count_parameters(build("srupp", width, layers))
        reference["transformer"] = size_to_match(["transformer"], target, layers, max_width=4 * width)["transformer"][1]
    rows = []
    for kind, kind_width in reference.items():
        if run.remaining() < (5 if dry else 25):
            run.log(f"  {kind}: skipped, {run.remaining():.0f} s left")
            continue
        torch.manual_seed(0)
        model = build(kind, kind_width, layers).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        tokens = torch.randint(0, 256, (steps + 1, batch), device=device)

        def step(model=model, optimizer=optimizer, tokens=tokens):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits, _ = model(tokens[:-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timer(step, repeats=repeats, warmup=2)
        row = {"model": kind, "width": kind_width, "layers": layers, "parameters": count_parameters(model),
               "T": steps, "B": batch, "step_ms": seconds * 1e3, "tokens_per_s": steps * batch / seconds}  # fmt: skip
        if device.type == "cuda":
            row["max_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        run.results["training"] = rows
        run.save()
        run.log(f"  {kind:12s} width {kind_width:5d} params {row['parameters'] / 1e6:7.1f}M  "
                f"step {seconds * 1e3:8.1f} ms  {row['tokens_per_s']:10.0f} tokens/s")  # fmt: skip
        del model, optimizer
    by_kind = {row["model"]: row for row in rows}
    if {"srupp", "transformer"} <= by_kind.keys():
        ratio = by_kind["srupp"]["tokens_per_s"] / by_kind["transformer"]["tokens_per_s"]
        run.results["srupp_over_transformer_tokens_per_s"] = ratio
        run.log(f"  SRU++ / Transformer tokens/s: {ratio:.2f}")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")
    parser.add_argument("--out", default=default_out, help="results folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny shapes, Triton interpreter")
    parser.add_argument("--time-limit", type=float, default=330.0, help="seconds before sections are skipped")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests first")
    parser.add_argument("--keep-going", action="store_true", help="run the benchmarks even if the GPU tests fail")
    parser.add_argument("--official", action="store_true", help="also time the authors' kernel if `sru` imports")
    parser.add_argument("--no-official", dest="official", action="store_false", help="(the default)")
    parser.add_argument("--no-training", action="store_true", help="skip the SRU++/Transformer training speed")
    # For the script's own tests: make one section fail on purpose.
    parser.add_argument("--fail", choices=["tests", "check", "kernels", "training", "tuning"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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
    run = Run(Path(args.out), started + args.time_limit)
    timer = Timer(device)
    run.results["provenance"] = provenance("gpu", argv)
    run.results["arguments"] = vars(args)
    run.results["environment"] = environment(device)
    run.log(json.dumps(run.results["environment"]))
    run.save()

    def fail_if_asked(section: str) -> None:
        if args.fail == section:
            raise RuntimeError(f"--fail {section}: this section fails on purpose")

    if args.skip_tests:
        run.results["sections"]["tests"] = {"status": "skipped", "reason": "--skip-tests"}
    elif importlib.util.find_spec("pytest") is None:
        # Not worth losing the session over: the check section below compares with the spec itself.
        run.results["sections"]["tests"] = {"status": "skipped", "reason": "pytest is not installed"}
        run.log("== tests: skipped (pytest is not installed); the check section still compares with the spec")
    else:
        files = ["tests/does_not_exist.py"] if args.fail == "tests" else gpu_test_files()
        budget = max(30.0, min(150.0, run.remaining() - 150.0))
        run.section("tests", lambda: run_tests(run, files, budget))
        tests = run.results["sections"]["tests"]
        outcome = tests.get("result") or {}
        if tests["status"] != "ok" or outcome.get("returncode") not in (0, None):
            tests["status"] = "failed"
            message = f"GPU tests failed: {outcome.get('summary') or tests.get('error')}"
            run.log(f"{message} (full output in {run.out / 'gpu_tests.log'})")
            if not args.keep_going:
                run.results["stopped"] = message
                run.log("STOPPED (--keep-going would have carried on with the benchmarks)")
                run.save()
                return 2
        if outcome.get("returncode") is None:
            run.log("GPU tests timed out: going on with the benchmarks, which check correctness themselves")

    shapes = DRY_SHAPES if args.dry_run else SHAPES
    stages_list = DRY_STAGES if args.dry_run else STAGES
    copy = {"GBps": float("nan")}

    def measure_copy():
        copy.update(copy_bandwidth(device, timer, args.dry_run))
        run.log(f"  device-to-device copy: {copy['GBps']:.0f} GB/s (read + write)")
        return copy

    run.section("copy", measure_copy)

    def check():
        fail_if_asked("check")
        rows = check_against_spec(shapes[0] if not args.dry_run else (5, 3, 33), device)
        for row in rows:
            errors = ", ".join(f"{name} {row[name]['max_error_over_max_value']:.1e}" for name in
                               ("h", "c_last", "grad_u", "grad_x", "grad_v", "grad_b", "grad_c0"))  # fmt: skip
            run.log(f"  {row['dtype']} T{row['T']} B{row['B']} D{row['D']} reverse={row['reverse']}: {errors}")
        return rows

    run.section("check", check, needs=20 if not args.dry_run else 0)

    training_reserve = 0 if args.no_training else (10 if args.dry_run else 70)

    def kernels():
        fail_if_asked("kernels")
        copy_bytes_per_s = copy["GBps"] * 1e9
        run.log(f"  {'T':>5} {'B':>2} {'D':>5} {'dtype':>5} {'STG':>3} {'blk':>4} {'w':>2} | "
                f"{'fwd inf':>8} {'fwd+c':>8} {'bwd':>8} {'f+b raw':>8} {'autograd':>8} (ms) | "
                f"BW/copy: {'fwd inf':>7} {'bwd':>5} {'f+b':>5}")  # fmt: skip
        done, skipped = 0, []
        for shape in shapes:
            for dtype_name in DTYPES:
                for stages in stages_list:
                    label = f"T{shape[0]}-B{shape[1]}-D{shape[2]}-{dtype_name}-stages{stages}"
                    if run.remaining() < training_reserve + (1 if args.dry_run else 8):
                        skipped.append(label)
                        continue
                    try:
                        row = kernel_row(shape, dtype_name, stages, device, timer, copy_bytes_per_s, args.dry_run)
                    except Exception as err:  # noqa: BLE001 - one failing configuration does not end the section
                        row = {"label": label, "error": f"{type(err).__name__}: {err}"}
                        run.log(f"  {label}: FAILED {row['error']}")
                        run.log(traceback.format_exc().rstrip())
                    else:
                        done += 1
                        run.log(
                            f"  {shape[0]:5d} {shape[1]:2d} {shape[2]:5d} {dtype_name:>5} {stages:3d} "
                            f"{row['block_d']:4d} {row['num_warps']:2d} | {row['forward_inference_ms']:8.3f} "
                            f"{row['forward_keep_states_ms']:8.3f} {row['backward_ms']:8.3f} "
                            f"{row['forward_backward_raw_ms']:8.3f} {row['forward_backward_autograd_ms']:8.3f}      | "
                            f"{row['forward_inference_bw_fraction']:15.0%} {row['backward_bw_fraction']:5.0%} "
                            f"{row['forward_backward_raw_bw_fraction']:5.0%}"
                        )  # fmt: skip
                    run.results["rows"].append(row)
                    run.save()
        if skipped:
            run.log(f"  skipped for time: {', '.join(skipped)}")
        failed = [row["label"] for row in run.results["rows"] if "error" in row]
        if failed:
            raise RuntimeError(f"{len(failed)} configurations failed: {', '.join(failed)}")
        return {"rows_done": done, "skipped_for_time": skipped}

    run.section("kernels", kernels)

    if args.official:

        def official():
            from benchmarks.baselines import load_authors

            authors = load_authors()
            if authors is None:
                raise RuntimeError("the authors' package `sru` does not import")
            module = authors.ops
            module.elementwise_recurrence_gpu  # noqa: B018 - fails early when its CUDA build did not happen
            rows = []
            for shape in shapes:
                for dtype_name in DTYPES:
                    if run.remaining() < training_reserve + 8:
                        break
                    rows.append(official_row(shape, dtype_name, device, timer, module))
                    run.log(f"  official {shape} {dtype_name}: {rows[-1]}")
            return rows

        run.section("official", official)
    else:
        run.results["sections"]["official"] = {"status": "skipped", "reason": "--no-official (the default)"}

    if not args.no_training:

        def training():
            fail_if_asked("training")
            return training_rows(run, device, timer, args.dry_run)

        run.section("training", training, needs=5 if args.dry_run else 25)

    def tuning():
        # Block sizes around the launcher's choice at the paper's shape: how much is left on the table.
        fail_if_asked("tuning")
        rows = []
        copy_bytes_per_s = copy["GBps"] * 1e9
        for dtype_name, dtype in DTYPES.items():
            smallest = 32 * max(1, 32 // torch.finfo(dtype).bits)  # 4 bytes per thread
            for multiple in (1, 2, 4):
                if run.remaining() < (1 if args.dry_run else 6):
                    break
                row = kernel_row(shapes[0], dtype_name, stages_list[0], device, timer, copy_bytes_per_s, args.dry_run,
                                 block_d=smallest * multiple, num_warps=multiple)  # fmt: skip
                rows.append(row)
                run.results["tuning_rows"] = rows
                run.save()
                run.log(
                    f"  {dtype_name} stages {row['stages']} block {row['block_d']} warps {row['num_warps']}: "
                    f"fwd inf {row['forward_inference_ms']:.3f} ms ({row['forward_inference_bw_fraction']:.0%}), "
                    f"f+b raw {row['forward_backward_raw_ms']:.3f} ms ({row['forward_backward_raw_bw_fraction']:.0%})"
                )
        return {"rows": len(rows)}

    run.section("tuning", tuning, needs=1 if args.dry_run else 10)

    statuses = {name: section["status"] for name, section in run.results["sections"].items()}
    run.results["summary"] = statuses
    run.results["seconds"] = round(time.monotonic() - started, 1)
    run.log(f"done in {run.results['seconds']} s: {statuses}; results in {run.json_path}")
    run.save()
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
