"""GPU check in one run: the gpu-marked tests, then the Triton recurrence and SRU++ training speed.

1. ``pytest -m gpu tests`` (skip with ``--skip-tests``).
2. The recurrence at T=512 B=16 D=512 and a larger shape, float32 and bfloat16: forward (no grad) and
   forward+backward of the Triton kernel against the naive backend and, when ``import sru`` works,
   the authors' CUDA kernel (which computes bf16 in fp32). Achieved bandwidth of the Triton kernel is
   compared with a device-to-device copy measured in the same run. Bytes per element of [T, B, D]
   (a = activation bytes, 4 for fp32 and 2 for bf16; the saved state c is float32):
     forward, inference:  reads u (3a) + x (a), writes h (a)                          = 5a
     forward, training:   the same + writes c (4)                                     = 5a + 4
     backward:            reads u (3a) + x (a) + grad_h (a) + c (4),
                          writes grad_u (3a) + grad_x (a)                             = 9a + 4
3. Training tokens/s under bf16 autocast of a character-level language model on ``srupp.nn.SRUpp``
   (d=2048, d'=512, 10 layers; Triton, and the naive backend for scale) against a pre-norm causal
   Transformer with about as many parameters.

Every ratio compares timings taken in this run (CUDA events, after warm-up). Results go to
``$OUT/gpu.json`` when $OUT is set, else benchmarks/results/gpu.json.

    python benchmarks/gpu.py                 # everything (a few minutes on one H100)
    python benchmarks/gpu.py --quick         # tiny shapes, few steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import srupp  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))
from common import write_json  # noqa: E402
from srupp.ops import sru_recurrence  # noqa: E402

SHAPES = [(512, 16, 512), (1024, 32, 2048)]
QUICK_SHAPES = [(64, 4, 128)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_time(fn: Callable[[], object], *, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, each timed with CUDA events after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def run_gpu_tests() -> dict[str, object]:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = (completed.stdout + completed.stderr).strip().splitlines()
    print("\n".join(tail[-25:]), flush=True)
    return {"returncode": completed.returncode, "summary": tail[-1] if tail else "",
            "seconds": time.perf_counter() - started}  # fmt: skip


def copy_bandwidth() -> float:
    source = torch.ones(256 * 2**20 // 4, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / cuda_time(lambda: target.copy_(source), repeats=20)


def load_official():
    try:
        import sru.ops as official  # compiles its CUDA code at first import

        official.elementwise_recurrence_gpu  # noqa: B018 - fails early when the CUDA build did not happen
    except Exception as err:  # noqa: BLE001 - any failure means "not available", reported as such
        print(f"authors' sru package not available ({type(err).__name__}: {err}); skipping its column")
        return None
    return official


def bench_recurrence(steps: int, batch: int, hidden: int, dtype_name: str, repeats: int, copy: float, official):
    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(steps, batch, 3 * hidden, device="cuda", generator=generator).to(dtype)
    x = torch.randn(steps, batch, hidden, device="cuda", generator=generator).to(dtype)
    v = torch.rand(2, hidden, device="cuda", generator=generator) - 0.5
    b = torch.zeros(2, hidden, device="cuda")
    c0 = torch.zeros(batch, hidden, device="cuda")
    grad_h = torch.randn(steps, batch, hidden, device="cuda", generator=generator).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (u, x, v, b)]

    def forward(backend):
        with torch.no_grad():
            return sru_recurrence(u, x, v, b, c0, backend=backend)

    def train(backend):
        h, _ = sru_recurrence(*leaves, c0, backend=backend)
        h.backward(grad_h)

    row: dict[str, object] = {"T": steps, "B": batch, "D": hidden, "dtype": dtype_name}
    h_triton = forward("triton")[0].float()
    h_naive = forward("naive")[0].float()
    row["triton_vs_naive_max_abs_diff"] = (h_triton - h_naive).abs().max().item()
    naive_repeats = max(2, repeats // 4)
    row["naive_forward_s"] = cuda_time(lambda: forward("naive"), repeats=naive_repeats, warmup=1)
    row["naive_train_s"] = cuda_time(lambda: train("naive"), repeats=naive_repeats, warmup=1)
    row["triton_forward_s"] = cuda_time(lambda: forward("triton"), repeats=repeats)
    row["triton_train_s"] = cuda_time(lambda: train("triton"), repeats=repeats)
    row["forward_speedup_vs_naive"] = row["naive_forward_s"] / row["triton_forward_s"]
    row["train_speedup_vs_naive"] = row["naive_train_s"] / row["triton_train_s"]
    size = torch.finfo(dtype).bits // 8
    elements = steps * batch * hidden
    row["triton_forward_GBps"] = elements * 5 * size / row["triton_forward_s"] / 1e9
    row["triton_train_GBps"] = elements * (5 * size + 4 + 9 * size + 4) / row["triton_train_s"] / 1e9
    row["triton_forward_bw_fraction"] = row["triton_forward_GBps"] * 1e9 / copy
    row["triton_train_bw_fraction"] = row["triton_train_GBps"] * 1e9 / copy
    if official is not None:
        # Their U interleaves the three streams per feature: [T, B, D, 3].
        u_theirs = u.view(steps, batch, 3, hidden).transpose(2, 3).contiguous()
        leaves_theirs = [t.clone().requires_grad_() for t in (u_theirs, x, v.reshape(-1), b.reshape(-1))]

        def official_forward():
            with torch.no_grad():
                return official.elementwise_recurrence_gpu(
                    u_theirs, x, v.reshape(-1), b.reshape(-1), c0, 0, hidden, False, True
                )

        def official_train():
            h, _ = official.elementwise_recurrence_gpu(*leaves_theirs, c0, 0, hidden, False, True)
            h.backward(grad_h.to(h.dtype))

        try:
            row["official_max_abs_diff"] = (official_forward()[0].float() - h_triton).abs().max().item()
            row["official_forward_s"] = cuda_time(official_forward, repeats=repeats)
            row["official_train_s"] = cuda_time(official_train, repeats=repeats)
            row["forward_speedup_vs_official"] = row["official_forward_s"] / row["triton_forward_s"]
            row["train_speedup_vs_official"] = row["official_train_s"] / row["triton_train_s"]
        except Exception as err:  # noqa: BLE001 - their kernel failing at run time is a result to report
            row["official_error"] = f"{type(err).__name__}: {err}"
    return row


class TokenModel(nn.Module):
    """Embedding -> body -> LayerNorm -> Linear to the vocabulary; the body is SRUpp or a causal Transformer."""

    def __init__(self, vocab: int, width: int, body: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab, width)
        self.body = body
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        if self.kind == "srupp":
            hidden, _ = self.body(hidden, causal=True)
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[0], device=tokens.device)
            hidden = self.body(hidden, mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_models(width: int, layers: int, vocab: int) -> dict[str, nn.Module]:
    """SRUpp (d = width, d' = width/4) on both backends, and a Transformer of width/2 with as many layers as
    give about the same number of body parameters (an SRU++ layer has far fewer than a Transformer layer)."""
    from srupp.nn import SRUpp

    models = {}
    for backend in ("triton", "naive"):
        body = SRUpp(width, width, width // 4, num_layers=layers, num_heads=1, backend=backend)
        models[f"srupp_{backend}"] = TokenModel(vocab, width, body, "srupp")
    target = parameter_count(models["srupp_triton"].body)
    narrow = width // 2

    def transformer(n):
        layer = nn.TransformerEncoderLayer(narrow, max(1, narrow // 64), 4 * narrow, dropout=0.0, norm_first=True)
        return nn.TransformerEncoder(layer, n, enable_nested_tensor=False)

    best = max(1, round(target / parameter_count(transformer(1))))
    models["transformer"] = TokenModel(vocab, narrow, transformer(best), "transformer")
    return models


def time_training_step(model: nn.Module, vocab: int, steps: int, batch: int, repeats: int) -> float:
    """Median seconds of one bf16-autocast AdamW step on random tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab, (steps + 1, batch), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return cuda_time(step, repeats=repeats, warmup=2)


def bench_training(width: int, layers: int, steps: int, batch: int, train_steps: int) -> list[dict[str, object]]:
    vocab = 256
    rows = []
    for name, model in build_models(width, layers, vocab).items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        repeats = max(2, train_steps // 4) if name.endswith("naive") else train_steps
        seconds = time_training_step(model.cuda(), vocab, steps, batch, repeats)
        row = {"model": name, "parameters": parameter_count(model), "body_parameters": parameter_count(model.body),
               "T": steps, "B": batch, "width": width, "step_s": seconds, "tokens_per_s": steps * batch / seconds,
               "max_memory_GiB": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
        rows.append(row)
        model.cpu()
        print(f"  {name:12s} params {row['parameters'] / 1e6:7.1f}M  step {seconds * 1e3:8.1f} ms  "
              f"{row['tokens_per_s']:10.0f} tokens/s", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats")
    parser.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu` first")
    parser.add_argument("--no-official", action="store_true", help="skip the authors' sru package")
    parser.add_argument("--no-training", action="store_true", help="skip the SRUpp/Transformer training speed")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json or benchmarks/results/gpu.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; torch.cuda.is_available() is False here")
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu.json") if os.environ.get("OUT") else None)
    payload: dict[str, object] = {"device": torch.cuda.get_device_name()}
    try:
        import triton

        payload["triton"] = triton.__version__
    except ImportError:
        payload["triton"] = None
    if not args.skip_tests:
        payload["gpu_tests"] = run_gpu_tests()

    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 3 if args.quick else 20
    official = None if args.no_official else load_official()
    copy = copy_bandwidth()
    payload["copy_bandwidth_GBps"] = copy / 1e9
    print(f"{payload['device']}  copy bandwidth {copy / 1e9:.0f} GB/s (read+write)")
    header = (f"{'T':>5} {'B':>3} {'D':>5} {'dtype':>5} | {'naive fwd':>9} {'triton':>8} {'x':>6} | "
              f"{'naive f+b':>9} {'triton':>8} {'x':>6} | {'fwd BW':>6} {'f+b BW':>6} | {'sru fwd':>8} {'x':>5} "
              f"{'sru f+b':>8} {'x':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for steps, batch, hidden in shapes:
        for dtype_name in DTYPES:
            row = bench_recurrence(steps, batch, hidden, dtype_name, repeats, copy, official)
            rows.append(row)
            theirs = (f"{row['official_forward_s'] * 1e3:7.3f}m {row['forward_speedup_vs_official']:5.2f} "
                      f"{row['official_train_s'] * 1e3:7.3f}m {row['train_speedup_vs_official']:5.2f}"
                      if "official_train_s" in row else f"{'-':>8} {'-':>5} {'-':>8} {'-':>5}")  # fmt: skip
            print(f"{steps:5d} {batch:3d} {hidden:5d} {dtype_name:>5} | {row['naive_forward_s'] * 1e3:8.2f}m "
                  f"{row['triton_forward_s'] * 1e3:7.3f}m {row['forward_speedup_vs_naive']:6.1f} | "
                  f"{row['naive_train_s'] * 1e3:8.2f}m {row['triton_train_s'] * 1e3:7.3f}m "
                  f"{row['train_speedup_vs_naive']:6.1f} | {row['triton_forward_bw_fraction']:6.0%} "
                  f"{row['triton_train_bw_fraction']:6.0%} | {theirs}", flush=True)  # fmt: skip
    print("times in ms; x = speed-up of Triton over the column before it; BW = achieved / copy bandwidth")
    payload["recurrence"] = rows
    payload["bytes_per_element"] = {"forward_inference": "5a", "forward_train": "5a+4", "backward": "9a+4",
                                    "a": "activation bytes (4 fp32, 2 bf16)"}  # fmt: skip

    if not args.no_training:
        try:
            import srupp.nn  # noqa: F401
        except ImportError as err:
            print(f"srupp.nn is not available ({err}); skipping training speed")
        else:
            print("training speed, bf16 autocast, AdamW:")
            width, layers, steps, batch, train_steps = (128, 2, 64, 4, 3) if args.quick else (2048, 10, 512, 16, 10)
            try:
                payload["training"] = bench_training(width, layers, steps, batch, train_steps)
            except Exception as err:  # noqa: BLE001 - report and keep the kernel numbers already measured
                print(f"training benchmark failed: {type(err).__name__}: {err}")
                payload["training_error"] = f"{type(err).__name__}: {err}"
            by_name = {row["model"]: row for row in payload.get("training", [])}
            if {"srupp_triton", "transformer", "srupp_naive"} <= by_name.keys():
                triton_speed = by_name["srupp_triton"]["tokens_per_s"]
                payload["srupp_vs_transformer_tokens_ratio"] = triton_speed / by_name["transformer"]["tokens_per_s"]
                payload["srupp_triton_vs_naive_tokens_ratio"] = triton_speed / by_name["srupp_naive"]["tokens_per_s"]
                print(f"SRUpp (triton) / Transformer tokens/s: {payload['srupp_vs_transformer_tokens_ratio']:.2f}; "
                      f"SRUpp triton / naive: {payload['srupp_triton_vs_naive_tokens_ratio']:.2f}")  # fmt: skip

    path = write_json("gpu", payload, out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
