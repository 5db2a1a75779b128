"""Quality at equal compute: valid and test bpc at equal wall-clock and at equal tokens, five byte-level LMs.

SRU++ with attention in every layer, SRU++ with attention in its last layer only (the paper's minimal
attention), and SRU (no attention layer: the same recurrent layers with their d -> d' -> 3d transform) are
the library's own ``srupp.models.SRUppLM``; the GPT-style Transformer and the LSTM come from
``benchmarks.baselines``. Every model is sized to the parameter count of SRU++ at ``--width``/``--layers``
and trained by the one loop below, made of the library's training blocks: ``srupp.data.StreamBatcher``
(B contiguous streams, segments of ``--context`` bytes), ``srupp.train.loop.build_optimizer`` (the
library's optimiser and its weight-decay policy: decoupled decay on every parameter),
``srupp.train.learning_rate`` (linear warmup, then a cosine that follows the wall-clock budget:
``anneal_by_time``), gradient clipping at ``clip_grad``, and ``srupp.train.evaluate`` for every score.

Corpus: ``--corpus stdlib`` (the default: the Python standard library's source as ``srupp data prepare
stdlib`` splits it) or any byte-level corpus folder written by ``srupp data prepare``.

Protocol:
- Recurrent models carry their state across segments (detached); SRU++ also attends to the previous
  segment (its memory). The Transformer trains on the same segments as independent windows.
- A learning-rate sweep for every model (``--sweep-lrs``, ``--sweep-minutes`` each, first seed); the best
  final valid bpc picks the main runs' rate. The sweep's throughput sets the equal-token point: 90% of the
  tokens the slowest model reaches in ``--minutes-per-model``.
- Main runs, one per model and seed (``--seeds``), ``--minutes-per-model`` of training (evaluation not
  counted). Valid bpc on the first ``--valid-bytes`` of valid ``--evals`` times; valid and test bpc at the
  equal-token point and at the end (equal wall-clock). Recurrent models read valid/test as 16 streams with
  their state carried; the Transformer as sliding windows of its training context, stride half of it
  (every scored byte sees at least half a window, at most a whole one).
- ``--long-context 256,512,...``: test bpc of the SRU++ models (first seed) as the evaluation segment and
  attention window grow (memory of the previous segment), against the Transformer at its training window.

    python -m benchmarks.quality                       # the full race: ~2.8M params, 10 min per model, 2 seeds
    python -m benchmarks.quality --quick               # seconds (the smoke test)
    python -m benchmarks.quality --width 384 --minutes-per-model 2.5 --seeds 0 --sweep-minutes 1   # reduced
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks.baselines import LABELS, MODELS, build, closest_width, count_parameters, detach, width_grid
from benchmarks.common import RESULTS, provenance, write_atomic, write_json
from srupp.data import StreamBatcher
from srupp.models import LMConfig, SRUppLM
from srupp.train import TrainConfig, bpc, evaluate, learning_rate
from srupp.train.loop import build_optimizer, resolve_corpus

# SRU family: which layers have attention (None: every layer, the LMConfig default).
ATTENTION = {"srupp": lambda layers: None, "srupp_one_attn": lambda layers: [layers - 1], "sru": lambda layers: []}
EVAL_STREAMS = 16


class BaselineLM(nn.Module):
    """A ``benchmarks.baselines`` model behind ``SRUppLM``'s training interface, so the one loop and
    ``srupp.train.evaluate`` drive it: ``forward(input [T, B], state, *, targets, attn_window) -> (nll, state)``.

    The LSTM carries its (detached) state. The Transformer trains on independent windows; in evaluation its
    state is the previous ``window - T`` tokens, prepended as context (sliding windows)."""

    def __init__(self, model: nn.Module, kind: str, window: int) -> None:
        super().__init__()
        self.model, self.kind, self.window = model, kind, window

    def forward(self, input: Tensor, state=None, *, targets: Tensor, attn_window: int | None = None):
        steps = input.shape[0]
        if self.kind != "transformer":
            logits, state = self.model(input, state)
            state = detach(state)
        else:
            context = input if state is None or self.training else torch.cat([state, input])
            logits = self.model(context)[0][-steps:]
            keep = self.window - steps
            state = None if self.training or keep <= 0 else context[-keep:].detach()
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return nll.view_as(targets), state


def sru_config(kind: str, width: int, layers: int) -> LMConfig:
    return LMConfig(
        vocab_size=256,
        hidden_size=width,
        proj_size=max(1, width // 4),
        num_layers=layers,
        num_heads=1,
        dropout=0.0,
        attn_dropout=0.0,
        attention_layers=ATTENTION[kind](layers),
    )


def build_model(kind: str, width: int, args) -> nn.Module:
    if kind in ATTENTION:
        return SRUppLM(sru_config(kind, width, args.layers))
    return BaselineLM(build(kind, width, args.layers, num_heads=args.heads), kind, args.context)


def parameters(kind: str, width: int, args) -> int:
    if kind in ATTENTION:
        return sru_config(kind, width, args.layers).num_parameters
    with torch.device("meta"):
        return count_parameters(build(kind, width, args.layers, num_heads=args.heads))


def sizes(args) -> dict[str, int]:
    """Each model's width: SRU++ at ``--width``, the others nearest its parameter count."""
    target = parameters("srupp", args.width, args)
    widths = {}
    for kind in args.models:
        grid = width_grid(kind, 8 * args.width)
        widths[kind] = (
            args.width if kind == "srupp" else closest_width(lambda w, k=kind: parameters(k, w, args), target, grid)
        )
    return widths


def recipe(args, lr: float, seconds: float) -> TrainConfig:
    """The library's optimisation recipe for one run; the cosine ends with the wall-clock budget."""
    return TrainConfig(
        batch_size=args.batch,
        unroll_size=args.context,
        max_steps=10**9,
        time_limit_s=seconds,
        anneal_by_time=True,
        lr=lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        clip_grad=1.0,
    )


def score(model: nn.Module, kind: str, tokens: np.ndarray, args, limit: int | None = None) -> float:
    """Bits per byte of ``tokens`` (at most ``limit``) through ``srupp.train.evaluate``."""
    unroll = max(1, args.context // 2) if kind == "transformer" else args.context
    streams = max(1, min(EVAL_STREAMS, (len(tokens[:limit]) - 1) // unroll))
    return bpc(evaluate(model, tokens, batch_size=streams, unroll=unroll, max_tokens=limit, device=args.device))


def held_out_bpc(model: nn.Module, kind: str, splits: dict, args) -> dict[str, float]:
    """Validation bpc (on ``--valid-bytes``) and test bpc of ``model``."""
    return {
        "valid_bpc": score(model, kind, splits["valid"], args, args.valid_bytes),
        "test_bpc": score(model, kind, splits["test"], args),
    }


def train_step(model: nn.Module, optimizer, segment, carry, clip_grad: float, device) -> tuple[torch.Tensor, object]:
    """One update on ``segment`` (the carried state dropped where a new stream starts): the loss and the carry."""
    if segment.first:
        carry = None
    nll, carry = model(segment.input.to(device), carry, targets=segment.target.to(device))
    loss = nll.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss, carry


def train_run(
    kind: str,
    width: int,
    lr: float,
    seconds: float,
    splits: dict,
    args,
    *,
    seed: int,
    evals: int,
    equal_tokens: int | None = None,
    desc: str = "",
) -> tuple[dict, nn.Module]:
    """Train one model for ``seconds`` of training wall-clock; returns its record and the trained model."""
    torch.manual_seed(seed)
    model = build_model(kind, width, args).to(args.device).train()
    cfg = recipe(args, lr, seconds)
    optimizer = build_optimizer(model, cfg)
    data = iter(StreamBatcher(splits["train"], cfg.batch_size, cfg.unroll_size))
    tokens_per_step = cfg.batch_size * cfg.unroll_size
    on_cuda = torch.device(args.device).type == "cuda"
    elapsed, steps, carry, losses = 0.0, 0, None, []
    history, at_equal_tokens = [], None
    next_eval = seconds / evals
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}"
    with tqdm(total=seconds, desc=desc, bar_format=bar_format, leave=False, file=sys.stderr) as bar:
        while elapsed < seconds:
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(steps, cfg, elapsed)
            loss, carry = train_step(model, optimizer, next(data), carry, cfg.clip_grad, args.device)
            losses.append(loss.detach())
            if on_cuda:  # the clock must see the step done, not queued
                torch.cuda.synchronize(args.device)
            step_seconds = time.perf_counter() - tick
            elapsed, steps = elapsed + step_seconds, steps + 1
            bar.update(min(step_seconds, seconds - bar.n))  # past its total, tqdm drops the total
            if equal_tokens is not None and at_equal_tokens is None and steps * tokens_per_step >= equal_tokens:
                at_equal_tokens = {"tokens": steps * tokens_per_step, "seconds": elapsed}
                at_equal_tokens |= held_out_bpc(model, kind, splits, args)
                model.train()
            if elapsed >= next_eval or elapsed >= seconds:
                train_bpc = bpc(float(torch.stack(losses).mean()))
                valid_bpc = score(model, kind, splits["valid"], args, args.valid_bytes)
                point = {"seconds": elapsed, "tokens": steps * tokens_per_step, "steps": steps}
                history.append(point | {"train_bpc": train_bpc, "valid_bpc": valid_bpc})
                bar.set_postfix(train=f"{train_bpc:.3f}", valid=f"{valid_bpc:.3f}")
                losses, next_eval = [], next_eval + seconds / evals
    tokens = steps * tokens_per_step
    record = {"model": kind, "lr": lr, "seed": seed, "width": width, "params": count_parameters(model), "steps": steps}
    record |= {"tokens": tokens, "train_seconds": elapsed, "tokens_per_s": tokens / elapsed}
    record |= {"final_valid_bpc": history[-1]["valid_bpc"], "history": history, "equal_tokens": at_equal_tokens}
    return record, model


def long_context(models: dict[str, nn.Module], splits: dict, args) -> dict:
    """Test bpc of the SRU++ models as the segment and attention window grow; the Transformer at its window."""
    test = splits["test"][: args.long_context_bytes or None]
    curve: dict[str, object] = {"lengths": args.long_context, "test_bytes": len(test), "models": {}}
    for kind, model in models.items():
        if kind in ("srupp", "srupp_one_attn"):
            rows = []
            for length in args.long_context:
                streams = max(1, min(EVAL_STREAMS, (len(test) - 1) // length))
                nats = evaluate(model, test, batch_size=streams, unroll=length, attn_window=length, device=args.device)
                rows.append({"length": length, "test_bpc": bpc(nats)})
                print(f"  long context {kind:15s} segment/window {length:5d}: test bpc {bpc(nats):.3f}")
            curve["models"][kind] = rows
        elif kind == "transformer":
            value = score(model, kind, test, args)
            curve["models"][kind] = [{"length": args.context, "test_bpc": value}]
            print(f"  long context transformer at its training window {args.context}: test bpc {value:.3f}")
    return curve


def summary(runs: list[dict]) -> dict[str, dict]:
    """Per model, mean and spread (min, max) over seeds of every final and equal-token score."""
    table: dict[str, dict] = {}
    for kind in dict.fromkeys(run["model"] for run in runs):
        mine = [run for run in runs if run["model"] == kind]
        values = {
            "valid_bpc": [r["final_valid_bpc"] for r in mine],
            "test_bpc": [r["test_bpc"] for r in mine],
            "tokens": [r["tokens"] for r in mine],
        }
        if all(r["equal_tokens"] for r in mine):
            values["equal_tokens_valid_bpc"] = [r["equal_tokens"]["valid_bpc"] for r in mine]
            values["equal_tokens_test_bpc"] = [r["equal_tokens"]["test_bpc"] for r in mine]
        table[kind] = {
            "params": mine[0]["params"],
            "width": mine[0]["width"],
            "lr": mine[0]["lr"],
            "seeds": len(mine),
            **{key: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for key, v in values.items()},
        }
    return table


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("long_context")
    figure, axes = plt.subplots(1, 3 if curve else 2, figsize=(17 if curve else 12, 4.5))
    colours = {kind: f"C{i}" for i, kind in enumerate(MODELS)}
    for run in report["runs"]:
        history, colour = run["history"], colours[run["model"]]
        first = run["seed"] == report["config"]["seeds"][0]
        label = f"{LABELS[run['model']]} ({run['params'] / 1e6:.2f}M)" if first else None
        bpcs = [h["valid_bpc"] for h in history]
        axes[0].plot([h["seconds"] / 60 for h in history], bpcs, marker="o", markersize=3, color=colour, label=label)
        axes[1].plot([h["tokens"] / 1e6 for h in history], bpcs, marker="o", markersize=3, color=colour)
    axes[0].set_xlabel("training wall-clock (minutes)")
    axes[1].set_xlabel("training tokens (millions)")
    for axis in axes[:2]:
        axis.set_ylabel("valid bpc")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if curve:
        for kind, rows in curve["models"].items():
            if kind == "transformer":
                axes[2].axhline(
                    rows[0]["test_bpc"],
                    color=colours[kind],
                    linestyle="--",
                    label=f"{LABELS[kind]} (window {rows[0]['length']})",
                )
            else:
                axes[2].plot(
                    [r["length"] for r in rows],
                    [r["test_bpc"] for r in rows],
                    marker="o",
                    color=colours[kind],
                    label=LABELS[kind],
                )
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("evaluation segment = attention window (bytes, with memory)")
        axes[2].set_ylabel("test bpc")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    figure.suptitle(f"Byte-level LMs on {report['corpus']['name']}: equal parameters, equal wall-clock per model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def spread(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell["min"] == cell["max"]:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} ({cell['min']:.3f}-{cell['max']:.3f})"


def markdown(report: dict) -> str:
    cfg, source = report["config"], report["provenance"]
    lines = [
        f"# Quality at equal compute ({source['cpu']}, {source['torch_threads']} threads, device {cfg['device']})",
        "",
        f"Corpus {report['corpus']['name']}; {cfg['minutes_per_model']} min of training per model and seed "
        f"(seeds {cfg['seeds']}); {cfg['batch']} streams x {cfg['context']} bytes per step; valid bpc on the "
        f"first {cfg['valid_bytes']} bytes of valid, test bpc on {report['corpus']['test_bytes']} test bytes. "
        f"Equal tokens: {report['equal_tokens']:,} tokens. Mean over seeds (min-max).",
        "",
        "| model | params | width x layers | lr | tokens seen | valid bpc | test bpc | valid bpc, equal tokens "
        "| test bpc, equal tokens |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in report["summary"].items():
        lines.append(
            f"| {LABELS[kind]} | {row['params']:,} | {row['width']} x {cfg['layers']} | {row['lr']:g} | "
            f"{row['tokens']['mean']:,.0f} | {spread(row['valid_bpc'])} | {spread(row['test_bpc'])} | "
            f"{spread(row.get('equal_tokens_valid_bpc'))} | {spread(row.get('equal_tokens_test_bpc'))} |"
        )
    if report["sweep"]:
        lines += [
            "",
            f"Learning-rate sweep: {cfg['sweep_minutes']} min per run, seed {cfg['seeds'][0]}, final valid bpc.",
            "",
            "| model | lr | steps | valid bpc | chosen |",
            "|---|---:|---:|---:|---|",
        ]
        for kind, runs in report["sweep"].items():
            best = min(runs, key=lambda r: r["final_valid_bpc"])
            for run in runs:
                edge = " (edge of the grid)" if run is best and run["lr"] in (runs[0]["lr"], runs[-1]["lr"]) else ""
                lines.append(
                    f"| {LABELS[kind]} | {run['lr']:g} | {run['steps']:,} | {run['final_valid_bpc']:.3f} | "
                    f"{'yes' + edge if run is best else ''} |"
                )
    curve = report.get("long_context")
    if curve:
        lines += [
            "",
            f"Long context: test bpc on {curve['test_bytes']:,} test bytes as the evaluation segment and "
            "attention window grow (memory of the previous segment).",
            "",
            "| model | " + " | ".join(str(n) for n in curve["lengths"]) + " |",
            "|---|" + "---:|" * len(curve["lengths"]),
        ]
        for kind, rows in curve["models"].items():
            by_length = {r["length"]: r["test_bpc"] for r in rows}
            cells = [f"{by_length[n]:.3f}" if n in by_length else "-" for n in curve["lengths"]]
            name = LABELS[kind] + (f" (its window {rows[0]['length']})" if kind == "transformer" else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Command: `{source['command']}` (revision {source['git_revision']}).",
        "Protocol: see the docstring of benchmarks/quality.py.",
        "",
    ]
    return "\n".join(lines)


def load_corpus(name: str, work: str) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    corpus = resolve_corpus(name, work)
    if corpus.vocab.kind != "byte":
        raise SystemExit(f"--corpus must be a byte-level corpus, got a {corpus.vocab.kind} corpus at {corpus.path}")
    splits = {split: np.array(corpus.split(split)) for split in ("train", "valid", "test")}
    digest = hashlib.sha256()
    for split in splits.values():
        digest.update(split.tobytes())
    source = {
        "name": name if name == "stdlib" else str(Path(name).resolve()),
        "sha256": digest.hexdigest(),
        **{f"{split}_bytes": len(tokens) for split, tokens in splits.items()},
    }
    return splits, source


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny models and budgets, seconds (the smoke test)")
    add("--corpus", default="stdlib", help="'stdlib' (default) or a byte-level folder from `srupp data prepare`")
    add("--minutes-per-model", type=float, default=10.0, help="training wall-clock per model and seed")
    add("--seeds", default="0,1", help="comma-separated seeds of the main runs")
    add("--sweep-minutes", type=float, default=2.0, help="training wall-clock per learning-rate sweep run")
    add("--sweep-lrs", default="1e-3,2e-3,4e-3", help="comma-separated peak learning rates of the sweep")
    add("--sweep", default=",".join(MODELS), help="models whose rate is swept ('' for none: all use --lr)")
    add("--lr", type=float, default=2e-3, help="peak learning rate of a model that is not swept")
    add("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    add("--width", type=int, default=768, help="SRU++ width d (d' = d/4); the others are sized to its parameters")
    add("--layers", type=int, default=4, help="layers of every model")
    add("--heads", type=int, default=4, help="Transformer heads")
    add("--batch", type=int, default=16, help="streams per step (B)")
    add("--context", type=int, default=256, help="segment length per step (T); the Transformer's window")
    add("--warmup-steps", type=int, default=100, help="linear warmup steps")
    add("--weight-decay", type=float, default=0.1)
    add("--optimizer", default="adamw", choices=("adamw", "radam"))
    add("--valid-bytes", type=int, default=65536, help="valid bytes scored at each evaluation")
    add("--test-bytes", type=int, default=0, help="test bytes scored (0: all)")
    add("--evals", type=int, default=8, help="valid evaluations per main run")
    add(
        "--long-context",
        default="256,512,1024,2048,4096",
        help="evaluation segment = attention window lengths for the SRU++ test curve ('' to skip)",
    )
    add("--long-context-bytes", type=int, default=262144, help="test bytes of the long-context curve (0: all)")
    add("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    add("--device", default="cpu")
    add("--out-dir", default=str(RESULTS), help="where quality.json / .png / .md go")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes_per_model, args.sweep_minutes, args.seeds = 0.02, 0.01, "0,1"
        args.width, args.layers, args.batch, args.context, args.warmup_steps = 32, 2, 4, 32, 2
        args.valid_bytes, args.test_bytes, args.evals, args.sweep_lrs = 2048, 4096, 2, "1e-3,3e-3"
        args.long_context, args.long_context_bytes = "32,64", 4096
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {MODELS}")
    if "srupp" not in args.models:
        parser.error("--models must include srupp: the others are sized to it")
    args.sweep = [m for m in args.sweep.split(",") if m and m in args.models]
    args.sweep_lrs = [float(v) for v in args.sweep_lrs.split(",") if v]
    args.seeds = [int(v) for v in args.seeds.split(",") if v]
    args.long_context = [int(v) for v in args.long_context.split(",") if v]
    if not args.seeds:
        parser.error("--seeds must name at least one seed")
    return args


def lr_sweep(widths: dict[str, int], splits: dict, args) -> dict[str, list[dict]]:
    """Short runs of each ``--sweep`` model at each ``--sweep-lrs`` learning rate (first seed, no history)."""
    sweep: dict[str, list[dict]] = {}
    for kind in args.sweep:
        sweep[kind] = []
        for lr in args.sweep_lrs:
            run, _ = train_run(
                kind,
                widths[kind],
                lr,
                60.0 * args.sweep_minutes,
                splits,
                args,
                seed=args.seeds[0],
                evals=1,
                desc=f"sweep {kind} lr={lr:g}",
            )
            run.pop("history")
            sweep[kind].append(run)
            print(f"  sweep {kind:15s} lr {lr:<8g} steps {run['steps']:6d}  valid bpc {run['final_valid_bpc']:.3f}")
    return sweep


def race(widths: dict[str, int], splits: dict, args, chosen: dict, budget: float, equal_tokens: int | None):
    """Every model for every seed at its chosen learning rate for ``budget`` seconds, scored on test; the runs and
    the first seed's trained models."""
    runs, first_models = [], {}
    for seed in args.seeds:
        for kind in args.models:
            lr = chosen.get(kind, args.lr)
            run, model = train_run(
                kind,
                widths[kind],
                lr,
                budget,
                splits,
                args,
                seed=seed,
                evals=args.evals,
                equal_tokens=equal_tokens,
                desc=f"train {kind} seed {seed}",
            )
            run["test_bpc"] = score(model, kind, splits["test"], args)
            runs.append(run)
            if seed == args.seeds[0]:
                first_models[kind] = copy.deepcopy(model)
            equal = run["equal_tokens"]
            print(
                f"  {kind:15s} seed {seed} lr {lr:<8g} steps {run['steps']:6d}  tokens {run['tokens']:>10,d}  "
                f"valid {run['final_valid_bpc']:.3f}  test {run['test_bpc']:.3f}"
                + (f"  at {equal['tokens']:,} tokens: valid {equal['valid_bpc']:.3f}" if equal else "")
            )
    return runs, first_models


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    origin = provenance("quality", argv)  # at the start: the race runs for hours
    with tempfile.TemporaryDirectory() as work:
        splits, source = load_corpus(args.corpus, work)
    if args.test_bytes:
        splits["test"] = splits["test"][: args.test_bytes]
        source["test_bytes"] = len(splits["test"])
    widths = sizes(args)
    print(f"quality benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for kind, width in widths.items():
        print(f"  {LABELS[kind]:45s} width {width:5d} x {args.layers}  {parameters(kind, width, args):>12,d} params")
    budget = 60.0 * args.minutes_per_model

    sweep = lr_sweep(widths, splits, args)
    chosen = {kind: min(runs, key=lambda r: r["final_valid_bpc"])["lr"] for kind, runs in sweep.items()}
    # Equal tokens: 90% of what the slowest model reaches in the main budget, from the sweep's throughput.
    rates = [run["tokens_per_s"] for runs in sweep.values() for run in runs]
    equal_tokens = int(0.9 * budget * min(rates)) if len(sweep) == len(args.models) else None

    runs, first_models = race(widths, splits, args, chosen, budget, equal_tokens)

    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out_dir", "corpus")},
        "corpus": source,
        "equal_tokens": equal_tokens or min(run["tokens"] for run in runs),
        "sweep": sweep,
        "runs": runs,
        "summary": summary(runs),
    }
    if args.long_context:
        report["long_context"] = long_context(first_models, splits, args)
    out_dir = Path(args.out_dir)
    path = write_json(out_dir / "quality.json", report, "quality", argv, origin)
    report["provenance"] = origin
    plot(report, out_dir / "quality.png")
    write_atomic(out_dir / "quality.md", markdown(report))
    print(f"wrote {path}, quality.png, quality.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
