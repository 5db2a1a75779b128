"""The model stages of ``benchmarks.gpu``: attention kernels, training steps eager and graphed, the authors' kernel,
and a short quality race. Each ``stage_*`` takes the run (``benchmarks.gpu.Run``) and records its rows there.

``python -m benchmarks.gpu_models --authors-child ROWS`` is the authors' stage's subprocess: it builds their
CUDA kernel (the parent caps its time) and writes its rows to ROWS after each one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import ROOT, authors_u, require_agreement, write_atomic

BF16 = torch.bfloat16
# Kernel and op names by part of a training step, first match wins (CUDA kernels on a GPU, aten ops on the CPU).
PARTS = (
    ("recurrence", re.compile(r"sru", re.I)),
    ("attention", re.compile(r"attention|fmha|flash|softmax", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("matmul", re.compile(r"gemm|matmul|aten::mm|addmm|bmm|cutlass|nvjet|xmma|sm90_", re.I)),
    ("norm", re.compile(r"norm", re.I)),
)


def part_of(name: str) -> str:
    return next((part for part, pattern in PARTS if pattern.search(name)), "other")


def profile_step(run, step: Callable[[], object]) -> dict[str, object]:
    """The profiler's split of one step: device time per part (ms), device busy time and the step's wall time
    (their difference is time the device waited for the host)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = run.device.type == "cuda"
    step()
    run.timer.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        run.timer.synchronize()
        wall = time.perf_counter() - started
    split: dict[str, float] = defaultdict(float)
    if cuda:  # the kernels by name
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                split[part_of(event.name)] += event.device_time_total / 1e3
    if not split:  # no kernels seen (or no device): each aten op's own time, device's or else CPU's
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                own = event.self_device_time_total if cuda else event.self_cpu_time_total
                split[part_of(event.key)] += own / 1e3
    busy = sum(split.values())
    return {
        "wall_ms": wall * 1e3,
        "busy_ms": busy,
        "idle_fraction": max(0.0, 1 - busy / (wall * 1e3)),
        "parts_ms": {part: round(ms, 3) for part, ms in sorted(split.items(), key=lambda kv: -kv[1])},
    }


def sdpa_ops(run, function: Callable[[], object]) -> list[str]:
    """The attention ops and kernels that ran in ``function`` (which SDPA backend served it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        function()
        run.timer.synchronize()
    wanted = re.compile(r"scaled_dot_product|efficient_attention|flash|fmha|cudnn|_safe_softmax|attention_math", re.I)
    return sorted({event.name for event in prof.events() if wanted.search(event.name)})


def stage_sdpa(run) -> dict[str, object]:
    """Attention over memory at the paper's width d'=768 (T=1024 queries, 1024 memory, B=4, bf16): a boolean
    mask, the lower-right causal bias with 1 and 4 heads, and plain causal attention without memory."""
    from torch.nn.attention.bias import causal_lower_right

    from srupp.nn.attention import attention_mask

    steps, memory, batch, width = (8, 8, 2, 16) if run.dry else (1024, 1024, 4, 768)
    dtype = torch.float32 if run.dry else BF16
    generator = torch.Generator(device=run.device).manual_seed(0)
    base = {
        name: torch.randn(batch, steps + memory, width, generator=generator, device=run.device, dtype=dtype)
        for name in ("q", "k", "v")
    }
    mask = attention_mask(steps, steps + memory, causal=True, window=None, key_pad=None, device=run.device)
    cases = {
        "mask, 1 head": (1, memory, mask),
        "lower-right, 1 head": (1, memory, "lower-right"),
        "lower-right, 4 heads": (4, memory, "lower-right"),
        "no memory, 1 head": (1, 0, "causal"),
        "no memory, 4 heads": (4, 0, "causal"),
    }
    outputs = {}
    for label, (heads, mem, bias) in cases.items():
        if run.remaining() < (0.2 if run.dry else 2):
            break

        def split(tensor, length, heads=heads):
            return tensor[:, -length:].reshape(batch, length, heads, width // heads).transpose(1, 2)

        query = split(base["q"], steps).detach().requires_grad_()
        keys, values = (split(base[k], steps + mem).detach().requires_grad_() for k in ("k", "v"))
        attn = causal_lower_right(steps, steps + mem) if bias == "lower-right" else None if bias == "causal" else bias

        def forward_backward(query=query, keys=keys, values=values, attn=attn, causal=bias == "causal"):
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attn, is_causal=causal)
            out.backward(torch.ones_like(out))
            return out

        outputs[label] = forward_backward().detach().transpose(1, 2).reshape(batch, steps, width).float()
        row = {
            "case": label,
            "heads": heads,
            "head_size": width // heads,
            "memory": mem,
            "T": steps,
            "B": batch,
            "dtype": str(dtype),
            "ops": sdpa_ops(run, forward_backward),
            "forward_backward_ms": run.timer(forward_backward, repeats=10) * 1e3,
        }
        if label == "lower-right, 1 head":
            row["max_abs_diff_to_mask"] = (outputs[label] - outputs["mask, 1 head"]).abs().max().item()
        run.row("sdpa", row)
    return {"cases": len(outputs)}


def lm_pair(run, srupp_config, layers: int, num_heads: int) -> dict[str, Callable[[], nn.Module]]:
    """Builders of an SRU++ LM and of a GPT with about as many parameters (sized on the meta device)."""
    from benchmarks.baselines import build, size_to_match
    from srupp.models import SRUppLM

    target = srupp_config.num_parameters
    with torch.device("meta"):
        width = size_to_match(["transformer"], target, layers, max_width=8192, num_heads=num_heads)["transformer"][1]
    return {
        "srupp": lambda: SRUppLM(srupp_config),
        "transformer": lambda: build("transformer", width, layers, num_heads=num_heads),
    }


def training_step(model: nn.Module, tokens: torch.Tensor, graphed: bool) -> Callable[[], torch.Tensor]:
    """One bf16-autocast AdamW step of ``model`` on ``tokens`` ``[T + 1, B]``. An ``SRUppLM`` carries its state
    (and its attention memory) from one step to the next, as training does; a ``benchmarks.baselines`` model
    starts each step afresh."""
    from srupp.models import SRUppLM

    device, carries = tokens.device, isinstance(model, SRUppLM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    net = torch.compile(model, backend="cudagraphs") if graphed else model
    carried: dict[str, object] = {"state": None}

    def step():
        if graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=BF16):
            if carries:
                nll, state = net(tokens[:-1], carried["state"], targets=tokens[1:])
                carried["state"] = state.clone() if graphed else state
                loss = nll.mean()
            else:
                logits, _ = net(tokens[:-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def step_rows(
    run, stage: str, builders: dict[str, Callable[[], nn.Module]], steps: int, batch: int, profile: bool
) -> dict[str, float]:
    """Tokens/s of each model's training step, eager and graphed (CUDA graphs through torch.compile; the
    first graphed call, which captures, is timed apart); the profiler's split of the eager step."""
    rates = {}
    for mode in ("eager", "graphed"):
        for kind, make in builders.items():
            if mode == "graphed" and run.device.type != "cuda":
                run.row(stage, {"model": kind, "mode": mode, "skipped": "CUDA graphs need a GPU"})
                continue
            if run.remaining() < (0.5 if run.dry else 10):
                run.row(stage, {"model": kind, "mode": mode, "skipped": f"{run.remaining():.0f} s left in the stage"})
                continue
            torch.manual_seed(0)
            model = make().to(run.device).train()
            tokens = torch.randint(0, 256, (steps + 1, batch), device=run.device)
            step = training_step(model, tokens, mode == "graphed")
            started = time.perf_counter()
            step()
            run.timer.synchronize()
            first = time.perf_counter() - started
            seconds = run.timer(step, repeats=3 if run.dry else 8, warmup=2)
            row = {
                "model": kind,
                "mode": mode,
                "parameters": sum(p.numel() for p in model.parameters()),
                "T": steps,
                "B": batch,
                "first_call_s": round(first, 2),
                "step_ms": seconds * 1e3,
                "tokens_per_s": steps * batch / seconds,
            }
            if profile and mode == "eager":
                row["profile"] = profile_step(run, step)
            rates[f"{kind} {mode}"] = row["tokens_per_s"]
            run.row(stage, row)
            del model, step
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    for mode in ("eager", "graphed"):
        if f"srupp {mode}" in rates and f"transformer {mode}" in rates:
            rates[f"srupp/transformer {mode}"] = rates[f"srupp {mode}"] / rates[f"transformer {mode}"]
    return rates


def stage_paper(run) -> dict[str, float]:
    """The ``enwik8-base`` preset (d=3072, d'=768, 10 layers, one head, memory carried) on 4 x 1024 tokens per
    step, the paper's per-GPU batch, against a GPT of as many parameters (8 heads: flash SDPA)."""
    from dataclasses import replace

    from srupp.train import load_preset

    config = load_preset("enwik8-base").model
    steps, batch = 1024, 4
    if run.dry:
        config = replace(config, hidden_size=32, proj_size=8, num_layers=2)
        steps, batch = 16, 2
    builders = lm_pair(run, config, config.num_layers, num_heads=8 if not run.dry else 4)
    return step_rows(run, "paper", builders, steps, batch, profile=True)


def stage_small(run) -> dict[str, float]:
    """The 7.6M-parameter pair of the first H200 run: SRU++ d=1024 (d'=256), 6 layers, T=1024, B=8."""
    from benchmarks.baselines import build, size_to_match

    width, layers, steps, batch = (32, 1, 16, 2) if run.dry else (1024, 6, 1024, 8)
    with torch.device("meta"):
        target = sum(p.numel() for p in build("srupp", width, layers).parameters())
        gpt_width = size_to_match(["transformer"], target, layers, max_width=4 * width)["transformer"][1]
    builders = {
        "srupp": lambda: build("srupp", width, layers),
        "transformer": lambda: build("transformer", gpt_width, layers),
    }
    return step_rows(run, "small", builders, steps, batch, profile=False)


def stage_authors(run) -> dict[str, object]:
    """The authors' CUDA kernel, from the wheel in vendor/ (``pip download --no-deps sru==3.0.0.dev6 -d
    vendor``), unpacked and built in a subprocess within the stage's cap."""
    wheels = sorted((ROOT / "vendor").glob("sru-*.whl"))
    if not wheels:
        return {"available": False, "reason": "no vendor/sru-*.whl in the working tree (carry: ['vendor'])"}
    with tempfile.TemporaryDirectory(prefix="srupp-authors-") as package:
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extractall(package)
        outcome = run_authors_child(run, Path(package))
    child = json.loads(outcome.pop("rows_path").read_text()) if outcome["rows_path"].exists() else {"rows": []}
    for row in child["rows"]:
        run.row("authors", row)
    return {"wheel": wheels[-1].name, **{k: v for k, v in child.items() if k != "rows"}, **outcome}


def run_authors_child(run, package: Path) -> dict[str, object]:
    """``authors_child`` in a subprocess with the unpacked ``package`` first on its path, killed at the cap."""
    rows_path = run.out / "authors_rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), str(ROOT / "src"), str(ROOT)])}
    command = [sys.executable, "-m", "benchmarks.gpu_models", "--authors-child", str(rows_path)]
    if run.dry:
        command.append("--dry-run")
    timeout = max(1.0, run.remaining())
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        outcome = {"returncode": done.returncode, "output_tail": (done.stdout + done.stderr)[-2000:]}
    except subprocess.TimeoutExpired:
        outcome = {"returncode": None, "reason": f"stopped at the stage's cap, {timeout:.0f} s (building?)"}
    return {**outcome, "rows_path": rows_path}


def authors_child(rows_path: Path, dry: bool) -> int:
    """Build the authors' kernel and time it against ours; rows written to ``rows_path`` after each one."""
    report: dict[str, object] = {"built": False, "rows": []}
    write_atomic(rows_path, json.dumps(report))
    if not torch.cuda.is_available():
        report["reason"] = "no CUDA device: their kernel is CUDA only"
        write_atomic(rows_path, json.dumps(report))
        return 0
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sru.cuda_functional  # noqa: F401 - builds their CUDA extension (torch.utils.cpp_extension.load)
        import sru.ops as official
    failed = [str(w.message) for w in caught if "unsuccessful" in str(w.message)]
    report.update(built=not failed, build_seconds=round(time.perf_counter() - started, 1))
    if failed:
        report["reason"] = failed[0][:2000]
        write_atomic(rows_path, json.dumps(report))
        return 0
    from benchmarks.gpu import SHAPES, Timer, make_inputs
    from srupp.ops import sru_recurrence

    device, timer = torch.device("cuda"), Timer(torch.device("cuda"))
    for shape in SHAPES:
        for dtype in (torch.float32, BF16):
            report["rows"].append(authors_row(shape, dtype, device, timer, official, sru_recurrence, make_inputs))
            write_atomic(rows_path, json.dumps(report))
    return 0


def authors_row(shape, dtype, device, timer, official, sru_recurrence, make_inputs) -> dict[str, object]:
    """Their op and ours (Triton, through autograd) on the same inputs: forward for inference, forward+backward."""
    steps, batch, hidden = shape
    inputs = make_inputs(steps, batch, hidden, dtype, device, padded=False)
    theirs = [
        t.detach().requires_grad_()
        for t in (authors_u(inputs["u"]), inputs["x"], inputs["v"].reshape(-1), inputs["b"].reshape(-1))
    ]
    ours = [inputs[k].detach().requires_grad_() for k in ("u", "x", "v", "b", "c0")]

    def their_forward():
        with torch.no_grad():
            return official.elementwise_recurrence_gpu(*theirs, inputs["c0"], 0, hidden, False, True)[0]

    def their_step():
        h, _ = official.elementwise_recurrence_gpu(*theirs, inputs["c0"], 0, hidden, False, True)
        torch.autograd.grad(h, theirs, inputs["grad_h"].to(h.dtype))

    def our_forward():
        with torch.no_grad():
            return sru_recurrence(*ours, backend="triton")[0]

    def our_step():
        h, _ = sru_recurrence(*ours, backend="triton")
        torch.autograd.grad(h, ours, inputs["grad_h"])

    agreement = require_agreement(their_forward(), our_forward(), f"{dtype} forward at {shape}", 2e-2)
    return {
        "T": steps,
        "B": batch,
        "D": hidden,
        "dtype": str(dtype),
        "max_abs_diff": agreement,
        "theirs_forward_ms": timer(their_forward, repeats=20) * 1e3,
        "ours_forward_ms": timer(our_forward, repeats=20) * 1e3,
        "theirs_forward_backward_ms": timer(their_step, repeats=20) * 1e3,
        "ours_forward_backward_ms": timer(our_step, repeats=20) * 1e3,
    }


def stage_race(run) -> dict[str, object]:
    """Bits per byte on the stdlib corpus's valid split after the same GPU time, SRU++ (d=2048, d'=512, 5 layers,
    ~25M parameters) against the Transformer of as many parameters, bf16 autocast."""
    from benchmarks import quality

    common = ["--models", "srupp,transformer", "--sweep", "", "--device", str(run.device), "--evals", "2"]
    sizes = ["--quick"] if run.dry else ["--width", "2048", "--layers", "5", "--batch", "16", "--context", "512",
                                         "--lr", "1e-3", "--warmup-steps", "50", "--valid-bytes", "131072"]  # fmt: skip
    args = quality.parse(common + sizes)
    widths = quality.sizes(args)
    with tempfile.TemporaryDirectory(prefix="srupp-race-") as work:
        splits, source = quality.load_corpus("stdlib", work)
    per_model = 1.0 if run.dry else max(5.0, (run.remaining() - 10) / 2 - 6)  # minus each model's evaluations
    results = {}
    for kind in ("srupp", "transformer"):
        with torch.autocast(run.device.type, dtype=BF16):
            record, _ = quality.train_run(
                kind, widths[kind], args.lr, per_model, splits, args, seed=0, evals=args.evals
            )
        row = {
            "model": kind,
            "width": widths[kind],
            "parameters": record["params"],
            "steps": record["steps"],
            "tokens": record["tokens"],
            "gpu_minutes": record["train_seconds"] / 60,
            "valid_bpc": record["final_valid_bpc"],
            "history": record["history"],
        }
        results[kind] = run.row("race", row)["valid_bpc"]
    return {"corpus": source, "valid_bpc": results, "seconds_per_model": per_model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--authors-child", type=Path, required=True, help="where the rows go (JSON)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    return authors_child(args.authors_child, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
