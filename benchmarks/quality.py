"""Quality at equal compute: valid bpc against wall-clock and tokens for five byte-level LMs of equal size.

SRU++ (attention in every layer), SRU++ with attention in its last layer only (the paper's minimal
attention, ``attention_every_n_layers = num_layers``), SRU, nn.LSTM and a GPT-style Transformer
(benchmarks/baselines.py), sized to about the parameter count of SRU++ at ``--width``/``--layers``,
each trained for the same wall-clock budget with the same tokens per step on ``--corpus``: by default
the Python standard library's ``.py`` files as ``srupp data prepare stdlib`` splits them (present
wherever Python is), or any gzip or plain text file given by path (bytes; first 90% train, next 5%
valid, last 5% test). The JSON records the corpus's path and the sha256 of the bytes used.

Protocol:
- Training data are B contiguous streams cut into segments of ``--context`` bytes, in the same order
  for every model. Recurrent models carry their state across segments, detached (truncated BPTT); SRU++
  also attends to the previous segment (its attention memory). The Transformer sees the same segments
  as independent windows (no state, no memory).
- AdamW (weight decay on matrices), linear warmup then cosine decay to 0, both over the wall-clock
  budget, gradient clipping at 1.0. The budget counts training steps only, not evaluation.
- An LR sweep (``--sweep-lrs``, ``--sweep-minutes`` each) for the Transformer and SRU++; the best final
  valid bpc picks the main run's LR. SRU++ with one attention layer and SRU reuse SRU++'s LR; LSTM uses ``--lr``.
- Valid bpc on the first ``--valid-bytes`` of valid, ``--evals`` times per run. Recurrent models read
  it as 16 streams carrying state; the Transformer with sliding windows of the train context, stride
  half of it (every scored byte sees at least half a window).
- Test bpc on the whole test split with the final weights: SRU++ with a longer context (segments of
  ``--eval-context`` bytes, memory of the previous segment, ``attn_window = --eval-context``), the
  others with the train context.

    python benchmarks/quality.py                      # default CPU budget: 2.5 min per model (~25 min total)
    python benchmarks/quality.py --quick              # seconds (the smoke test)
    python benchmarks/quality.py --device cuda --minutes-per-model 30 --width 1024 --layers 6 --batch 32 --context 512
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import LABELS, MODELS, ByteLM, build, count_parameters, size_to_match  # noqa: E402
from common import RESULTS, machine  # noqa: E402
from srupp.data import prepare_stdlib, stdlib_source  # noqa: E402

SRU_FAMILY = ("srupp", "srupp_one_attn", "sru")
EVAL_STREAMS = 16


def load_splits(corpus: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The train/valid/test bytes (uint8) of ``corpus``, and where they came from (path and sha256)."""
    if corpus == "stdlib":
        with tempfile.TemporaryDirectory() as folder:
            prepared = prepare_stdlib(folder)
            splits = {name: np.array(prepared.split(name)) for name in ("train", "valid", "test")}
        path = f"stdlib: {stdlib_source()}"
    else:
        raw = Path(corpus).read_bytes()
        data = np.frombuffer(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, dtype=np.uint8).copy()
        train_end, valid_end = int(0.9 * len(data)), int(0.95 * len(data))  # enwik8-style split
        splits = {"train": data[:train_end], "valid": data[train_end:valid_end], "test": data[valid_end:]}
        path = str(Path(corpus).resolve())
    digest = hashlib.sha256()
    for name in ("train", "valid", "test"):
        digest.update(splits[name].tobytes())
    return splits, {"path": path, "sha256": digest.hexdigest()}


def as_streams(data: np.ndarray, streams: int) -> torch.Tensor:
    """``[streams, N]`` int64: the data cut into contiguous streams (the remainder dropped)."""
    length = len(data) // streams
    return torch.from_numpy(data[: streams * length].astype(np.int64)).view(streams, length)


class Batches:
    """Segments ``[T, B]`` (inputs, next-byte targets) walking B contiguous streams; wraps with a reset."""

    def __init__(self, data: np.ndarray, batch: int, context: int, device: torch.device) -> None:
        self.streams = torch.from_numpy(data[: batch * (len(data) // batch)]).view(batch, -1)
        self.context, self.device, self.position = context, device, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        reset = self.position + self.context + 1 > self.streams.shape[1]
        if reset:
            self.position = 0
        window = self.streams[:, self.position : self.position + self.context + 1].long().t()
        self.position += self.context
        window = window.to(self.device)
        return window[:-1], window[1:], reset


@torch.no_grad()
def evaluate(model: ByteLM, kind: str, data: np.ndarray, context: int, device: torch.device,
             attn_window: int | None = None) -> float:  # fmt: skip
    """Bits per byte of ``data``; see the module docstring for how each kind reads it."""
    model.eval()
    streams = as_streams(data, EVAL_STREAMS).to(device)
    length = streams.shape[1]
    total, count = 0.0, 0
    if kind == "transformer":
        stride, scored, start = max(1, context // 2), 0, 0
        while scored < length - 1:
            size = min(context, length - 1 - start)
            logits, _ = model(streams[:, start : start + size].t())
            first = scored - start
            targets = streams[:, start + 1 + first : start + 1 + size].t()
            total += F.cross_entropy(logits[first:].flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
            scored, start = start + size, start + stride
    else:
        state = None
        for start in range(0, length - 1, context):
            size = min(context, length - 1 - start)
            logits, state = model(streams[:, start : start + size].t(), state, attn_window=attn_window)
            targets = streams[:, start + 1 : start + 1 + size].t()
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    model.train()
    return total / count / math.log(2)


def learning_rate(peak: float, fraction: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` of the budget, then cosine to 0."""
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1.0 - warmup))))


def train(kind: str, model: ByteLM, lr: float, minutes: float, splits: dict, args, evals: int, desc: str) -> dict:
    """Train for ``minutes`` of wall-clock (training steps only); returns the run's record and history."""
    device = torch.device(args.device)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )  # fmt: skip
    batches = Batches(splits["train"], args.batch, args.context, device)
    valid = splits["valid"][: args.valid_bytes]
    budget = 60.0 * minutes
    next_eval = budget / evals
    elapsed, steps, state = 0.0, 0, None
    loss_sum, loss_steps = torch.zeros((), device=device), 0
    history = []
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training{postfix}"
    with tqdm(total=budget, desc=desc, bar_format=bar_format, leave=False, file=sys.stderr) as bar:
        while elapsed < budget:
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, elapsed / budget, args.warmup)
            inputs, targets, reset = batches.next()
            if reset or kind == "transformer":
                state = None
            logits, state = model(inputs, state)
            state = model.detach_state(state)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.detach()
            loss_steps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds = time.perf_counter() - start
            elapsed += step_seconds
            steps += 1
            bar.update(step_seconds)
            if elapsed >= next_eval or elapsed >= budget:
                valid_bpc = evaluate(model, kind, valid, args.context, device)
                train_bpc = loss_sum.item() / loss_steps / math.log(2)
                history.append({"seconds": elapsed, "tokens": steps * args.batch * args.context, "steps": steps,
                                "train_bpc": train_bpc, "valid_bpc": valid_bpc})  # fmt: skip
                bar.set_postfix(train_bpc=f"{train_bpc:.3f}", valid_bpc=f"{valid_bpc:.3f}")
                loss_sum.zero_()
                loss_steps = 0
                next_eval += budget / evals
    tokens = steps * args.batch * args.context
    return {"lr": lr, "steps": steps, "tokens": tokens, "train_seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "final_valid_bpc": history[-1]["valid_bpc"], "best_valid_bpc": min(h["valid_bpc"] for h in history),
            "history": history}  # fmt: skip


def build_models(args) -> dict[str, tuple[ByteLM, int, int]]:
    """Fresh models (seeded) sized to SRU++'s parameter count: ``{kind: (model, width, layers)}``."""
    layers = {kind: args.layers for kind in MODELS}
    if args.transformer_layers:
        layers["transformer"] = args.transformer_layers
    if args.lstm_layers:
        layers["lstm"] = args.lstm_layers
    options = {"dropout": args.dropout, "tie": args.tie, "num_heads": args.heads}
    target = count_parameters(build("srupp", args.width, args.layers, **options))
    sized = size_to_match(args.models, target, layers, max_width=8 * args.width, **options)
    models = {}
    for kind in args.models:
        torch.manual_seed(args.seed)
        width = args.width if kind == "srupp" else sized[kind][1]
        models[kind] = (build(kind, width, layers[kind], **options), width, layers[kind])
    return models


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for kind, run in runs.items():
        history = run["history"]
        bpc = [h["valid_bpc"] for h in history]
        label = f"{LABELS[kind]} ({run['params'] / 1e6:.2f}M)"
        by_time.plot([h["seconds"] / 60 for h in history], bpc, marker="o", markersize=3, label=label)
        by_tokens.plot([h["tokens"] / 1e6 for h in history], bpc, marker="o", markersize=3, label=label)
    by_time.set_xlabel("training wall-clock (minutes)")
    by_tokens.set_xlabel("training tokens (millions)")
    by_time.set_ylabel("valid bpc")
    for axis in (by_time, by_tokens):
        axis.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    figure.suptitle("Byte-level LM on pydocs-rst, equal parameters and equal wall-clock per model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# Quality at equal compute ({report['machine']['cpu']}, {cfg['threads']} threads, device {cfg['device']})",
        "",
        f"Budget {cfg['minutes_per_model']} min of training per model; {cfg['batch']} streams x {cfg['context']} "
        f"bytes = {cfg['batch'] * cfg['context']} tokens per step; valid bpc on the first {cfg['valid_bytes']} "
        f"bytes of valid; test bpc on all {report['corpus']['test_bytes']} test bytes, final weights.",
        "",
        "| model | params | width x layers | lr | steps | tokens seen | best valid bpc | test bpc (context) "
        "| tokens/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, run in report["runs"].items():
        lines.append(
            f"| {LABELS[kind]} | {run['params']:,} | {run['width']} x {run['layers']} | {run['lr']:g} | "
            f"{run['steps']:,} | {run['tokens']:,} | {run['best_valid_bpc']:.3f} | "
            f"{run['test_bpc']:.3f} ({run['test_context']}) | {run['tokens_per_s']:,.0f} |"
        )
    if report["sweep"]:
        lines += ["", f"LR sweep: {cfg['sweep_minutes']} min per run, final valid bpc (lower is better).", "",
                  "| model | lr | steps | valid bpc | chosen |", "|---|---:|---:|---:|---|"]  # fmt: skip
        for kind, runs in report["sweep"].items():
            best = min(runs, key=lambda r: r["final_valid_bpc"])
            for run in runs:
                edge = " (edge of the grid)" if run is best and run["lr"] in (runs[0]["lr"], runs[-1]["lr"]) else ""
                chosen = f"yes{edge}" if run is best else ""
                lines.append(f"| {LABELS[kind]} | {run['lr']:g} | {run['steps']:,} | "
                             f"{run['final_valid_bpc']:.3f} | {chosen} |")  # fmt: skip
    lines += ["", "Protocol: see the docstring of benchmarks/quality.py.", ""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny models and budgets, seconds (the smoke test)")
    add("--minutes-per-model", type=float, default=2.5, help="training wall-clock per model in the main runs")
    add("--sweep-minutes", type=float, default=1.0, help="training wall-clock per LR-sweep run")
    add("--sweep-lrs", default="2e-3,4e-3,8e-3,1.6e-2", help="comma-separated peak LRs tried in the sweep")
    add("--sweep", default="transformer,srupp", help="models whose LR is swept (comma-separated, '' for none)")
    add("--lr", type=float, default=2e-3, help="peak LR of models without a swept one (LSTM by default)")
    add("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    add("--width", type=int, default=256, help="SRU++ width d (d' = d/4); the others are sized to its params")
    add("--layers", type=int, default=4, help="layers of every model")
    add("--transformer-layers", type=int, default=None, help="Transformer layers if different from --layers")
    add("--lstm-layers", type=int, default=None, help="LSTM layers if different from --layers")
    add("--heads", type=int, default=4, help="Transformer heads")
    add("--dropout", type=float, default=0.0)
    add("--tie", action="store_true", help="tie embedding and output weights (all models)")
    add("--batch", type=int, default=16, help="streams per step (B)")
    add("--context", type=int, default=128, help="unroll / window length per step (T)")
    add("--eval-context", type=int, default=512, help="SRU++ test segment length and attn_window")
    add("--valid-bytes", type=int, default=65536, help="valid slice for periodic evaluation")
    add("--test-bytes", type=int, default=0, help="test bytes evaluated (0: all)")
    add("--evals", type=int, default=8, help="valid evaluations per main run")
    add("--warmup", type=float, default=0.05, help="warmup as a fraction of the budget")
    add("--weight-decay", type=float, default=0.1)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    add("--device", default="cpu")
    add("--corpus", default="stdlib", help="'stdlib' (the default) or a gzip or text file of bytes")
    add("--out-dir", default=str(RESULTS), help="where quality.json / .png / .md go")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes_per_model, args.sweep_minutes = 0.03, 0.015
        args.width, args.layers, args.batch, args.context, args.eval_context = 32, 2, 4, 32, 64
        args.valid_bytes, args.test_bytes, args.evals = 2048, 4096, 2
        args.sweep_lrs = "1e-3,3e-3"
    args.models = [m for m in args.models.split(",") if m]
    args.sweep = [m for m in args.sweep.split(",") if m and m in args.models]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if "srupp" not in args.models:
        parser.error("`--models` must include srupp: the others are sized to it")
    args.sweep_lrs = [float(v) for v in args.sweep_lrs.split(",") if v]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    splits, source = load_splits(args.corpus)
    if args.test_bytes:
        splits["test"] = splits["test"][: args.test_bytes]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    sized = build_models(args)
    print(f"quality benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for kind, (model, width, layers) in sized.items():
        print(f"  {LABELS[kind]:45s} width {width:5d} x {layers} layers  {count_parameters(model):>12,d} params")

    sweep: dict[str, list[dict]] = {}
    chosen: dict[str, float] = {}
    for kind in args.sweep:
        sweep[kind] = []
        for lr in args.sweep_lrs:
            model = build_models(args)[kind][0]
            run = train(kind, model, lr, args.sweep_minutes, splits, args, evals=1, desc=f"sweep {kind} lr={lr:g}")
            run.pop("history")
            sweep[kind].append(run)
            print(f"  sweep {kind:15s} lr {lr:<8g} steps {run['steps']:6d}  valid bpc {run['final_valid_bpc']:.3f}")
        chosen[kind] = min(sweep[kind], key=lambda r: r["final_valid_bpc"])["lr"]

    runs = {}
    for kind, (model, width, layers) in sized.items():
        lr = chosen.get(kind, chosen.get("srupp", args.lr) if kind in SRU_FAMILY else args.lr)
        run = train(kind, model, lr, args.minutes_per_model, splits, args, evals=args.evals, desc=f"train {kind}")
        long_context = kind in ("srupp", "srupp_one_attn")
        context = args.eval_context if long_context else args.context
        run["test_bpc"] = evaluate(model, kind, splits["test"], context, device, context if long_context else None)
        run["test_context"] = context
        run.update({"params": count_parameters(model), "width": width, "layers": layers, "label": LABELS[kind]})
        runs[kind] = run
        print(
            f"  {kind:15s} lr {lr:<8g} steps {run['steps']:6d}  tokens {run['tokens']:>10,d}  best valid "
            f"{run['best_valid_bpc']:.3f}  test {run['test_bpc']:.3f}  {run['tokens_per_s']:,.0f} tok/s"
        )

    config = {k: v for k, v in vars(args).items() if k not in ("corpus", "out_dir")}
    config["threads"] = torch.get_num_threads()
    report = {
        "machine": machine(),
        "config": config,
        "corpus": {**source, **{f"{k}_bytes": len(v) for k, v in splits.items()}},
        "sweep": sweep,
        "runs": runs,
    }
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, out_dir / "quality.png")
    (out_dir / "quality.md").write_text(markdown(report))
    print(f"wrote {out_dir / 'quality.json'}, quality.png, quality.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
