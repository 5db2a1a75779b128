"""Multi-query associative recall (MQAR, the Zoology study: Arora et al., 2023) for five models of equal size.

The task. A sequence of ``--seq-len`` tokens opens with ``P`` key-value pairs ``k1 v1 k2 v2 ... kP vP`` and
continues with queries: every key of the sequence comes back once, in random order, at a random two-token
slot of the rest of the sequence, followed by its value; the other positions hold the filler token 0.
Keys are drawn without replacement from the lower half of the vocabulary (distinct within a sequence) and
values with replacement from the upper half, fresh for every sequence, so a value can only be known by
looking it up in the sequence's own pairs. The models are next-token predictors; the loss and the accuracy
count only the positions of the queried keys, where the next token is that key's value (everything else is
ignored). Chance is 1 / (number of values). Sequences are generated on the fly from a seed; no files.

The models (benchmarks/baselines.py), sized to the parameter count of SRU++ at ``--width`` x ``--layers``:
SRU++ with attention in every layer, SRU++ with attention in its last layer only, SRU, nn.LSTM and the
GPT-style Transformer. Each model is trained once per learning rate of ``--lrs`` on a mixture of the pair
counts ``--pairs`` (every step draws one count, in turn), as Zoology trains on a mixture; the learning rate
with the best mean query accuracy on held-out validation sequences is chosen, and its accuracy on separate
test sequences, per pair count, is reported.

Budget. ``--budget-s`` is the wall-clock of the whole script. It is divided over the runs still to do
(models x learning rates, the middle learning rate of every model first), each run training by the clock
with a warmup + cosine schedule over its own share; when what is left cannot give every remaining run 5 s,
the earlier runs get it and the rest are skipped, and the results are written all the same. The JSON is
rewritten after every run.

    PYTHONPATH=src python -m benchmarks.recall --quick --out-dir /tmp/recall       # seconds (the smoke test)
    PYTHONPATH=src python -m benchmarks.recall --budget-s 600 --seq-len 64 --pairs 4 8 16 --batch 32
    PYTHONPATH=src python -m benchmarks.recall --device cuda --budget-s 230 --batch 512   # ~4 min on an H200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.baselines import LABELS, MODELS, VOCAB, ByteLM, build, count_parameters, size_to_match
from benchmarks.common import RESULTS, cpu_model, provenance, write_atomic

FILLER = 0
IGNORE = -100


def token_ranges(vocab: int) -> tuple[range, range]:
    """Key tokens and value tokens: the two halves of ``1 .. vocab-1`` (0 is the filler)."""
    keys = (vocab - 1) // 2
    return range(1, 1 + keys), range(1 + keys, vocab)


def check_task(vocab: int, seq_len: int, pairs: int) -> None:
    if not 5 <= vocab <= VOCAB:
        raise ValueError(f"`vocab` must be in [5, {VOCAB}] (the models' vocabulary), got {vocab}")
    keys, _ = token_ranges(vocab)
    if not 1 <= pairs <= len(keys):
        raise ValueError(
            f"`pairs` must be in [1, {len(keys)}] (distinct keys of a {vocab}-token vocabulary), got {pairs}"
        )
    if seq_len < 4 * pairs:
        raise ValueError(f"`seq_len` must be >= 4 * pairs = {4 * pairs} (pairs, then every key queried), got {seq_len}")


def make_batch(generator: torch.Generator, batch: int, seq_len: int, pairs: int, vocab: int):
    """A batch of MQAR sequences (see the module docstring), on the generator's device.

    Returns: ``(inputs [B, seq_len], targets [B, seq_len])``, int64; ``targets`` is -100 except at each
    queried key, where it is that key's value (the token that follows it).
    """
    check_task(vocab, seq_len, pairs)
    device = generator.device
    key_tokens, value_tokens = token_ranges(vocab)
    draw = torch.rand(batch, len(key_tokens), generator=generator, device=device)
    keys = draw.argsort(dim=1)[:, :pairs] + key_tokens.start
    values = torch.randint(value_tokens.start, value_tokens.stop, (batch, pairs), generator=generator, device=device)
    inputs = torch.full((batch, seq_len), FILLER, dtype=torch.long, device=device)
    inputs[:, 0 : 2 * pairs : 2] = keys
    inputs[:, 1 : 2 * pairs : 2] = values
    # Pair j is queried at a random free slot: distinct slots, so the query order is random too.
    slots = (seq_len - 2 * pairs) // 2
    slot = torch.rand(batch, slots, generator=generator, device=device).argsort(dim=1)[:, :pairs]
    key_position = 2 * pairs + 2 * slot
    inputs.scatter_(1, key_position, keys)
    inputs.scatter_(1, key_position + 1, values)
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, key_position, values)
    return inputs, targets


def held_out(seed: int, count: int, batch: int, seq_len: int, pairs_list: list[int], vocab: int) -> dict:
    """``{pairs: [(inputs, targets), ...]}``: ``count`` sequences per pair count from their own generator."""
    generator = torch.Generator().manual_seed(seed)
    sets = {}
    for pairs in pairs_list:
        sizes = [min(batch, count - start) for start in range(0, count, batch)]
        sets[pairs] = [make_batch(generator, size, seq_len, pairs, vocab) for size in sizes]
    return sets


def query_loss(model: ByteLM, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the query positions, and the logits ``[T, B, V]`` (models are time-major)."""
    logits, _ = model(inputs.t())
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.t().flatten(), ignore_index=IGNORE), logits


@torch.no_grad()
def accuracy(model: ByteLM, sets: dict, device: torch.device, autocast) -> dict[str, float]:
    """Fraction of queries whose argmax over the whole vocabulary is the right value, per pair count
    (keyed by the count as a string, as in the JSON)."""
    model.eval()
    result = {}
    for pairs, batches in sets.items():
        right, total = 0, 0
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast():
                logits, _ = model(inputs.t())
            targets = targets.t()
            query = targets != IGNORE
            right += (logits.argmax(dim=-1)[query] == targets[query]).sum().item()
            total += query.sum().item()
        result[str(pairs)] = right / total
    model.train()
    return result


def learning_rate(peak: float, fraction: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` of the run's time, then cosine to 0."""
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1.0 - warmup))))


def autocast_for(args):
    """A factory of the context every forward pass runs in: bf16 autocast on CUDA if asked, else nothing."""
    if args.device.type == "cuda" and args.precision == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(model: ByteLM, lr: float, args) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        fused=args.device.type == "cuda",
    )


def warm_up(model: ByteLM, generator: torch.Generator, args, autocast) -> None:
    """One forward and backward pass outside the run's clock, its gradients dropped and ``generator`` rewound:
    it compiles kernels (Triton on CUDA) and warms the allocators."""
    inputs, targets = make_batch(generator, args.batch, args.seq_len, args.pairs[0], args.vocab)
    with autocast():
        loss, _ = query_loss(model, inputs, targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    generator.manual_seed(args.seed)


def train_run(kind: str, model: ByteLM, lr: float, seconds: float, args, valid: dict, bar: tqdm) -> dict:
    """Train ``model`` for ``seconds`` of wall-clock (at least one step, after an untimed warmup step), then
    measure its validation accuracy."""
    device, autocast = args.device, autocast_for(args)
    model.to(device).train()
    optimizer = make_optimizer(model, lr, args)
    # The training stream depends on the seed (and the device that draws it) only, so every model and
    # learning rate sees the same sequences; drawing them where the model runs keeps the GPU fed.
    generator = torch.Generator(device).manual_seed(args.seed)
    warm_up(model, generator, args, autocast)

    sync_every = 8 if device.type == "cuda" else 1
    start = time.perf_counter()
    elapsed, steps, last_tick = 0.0, 0, start
    losses = torch.zeros((), device=device)
    history = []
    while steps == 0 or elapsed < seconds:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, elapsed / seconds if seconds > 0 else 0.5, args.warmup)
        pairs = args.pairs[steps % len(args.pairs)]
        inputs, targets = make_batch(generator, args.batch, args.seq_len, pairs, args.vocab)
        with autocast():
            loss, _ = query_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses += loss.detach()
        steps += 1
        if steps % sync_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            elapsed = now - start
            bar.update(now - last_tick)
            last_tick = now
        if steps % args.log_every == 0:
            mean = losses.item() / args.log_every
            losses.zero_()
            history.append({"step": steps, "seconds": round(elapsed, 3), "query_loss": mean})
            bar.set_postfix_str(f"{kind} lr={lr:g} step {steps} loss {mean:.3f}")
    if steps % args.log_every:
        history.append(
            {"step": steps, "seconds": round(elapsed, 3), "query_loss": losses.item() / (steps % args.log_every)}
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start
    valid_accuracy = accuracy(model, valid, device, autocast)
    eval_seconds = time.perf_counter() - start - train_seconds
    return {
        "model": kind,
        "lr": lr,
        "status": "done",
        "steps": steps,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "sequences": steps * args.batch,
        "tokens_per_s": steps * args.batch * args.seq_len / train_seconds,
        "history": history,
        "valid_accuracy": valid_accuracy,
        "valid_mean": sum(valid_accuracy.values()) / len(valid_accuracy),
    }


def build_models(args) -> dict[str, tuple[int, int]]:
    """Widths of every model sized to SRU++ at ``--width`` x ``--layers``: ``{kind: (width, params)}``."""
    target = count_parameters(build("srupp", args.width, args.layers))
    sized = size_to_match(args.models, target, args.layers, max_width=8 * args.width)
    widths = {kind: args.width if kind == "srupp" else width for kind, (_, width) in sized.items()}
    return {kind: (width, count_parameters(build(kind, width, args.layers))) for kind, width in widths.items()}


def fresh_model(kind: str, width: int, args) -> ByteLM:
    torch.manual_seed(args.seed)
    return build(kind, width, args.layers)


def choose(runs: list[dict]) -> dict[str, dict]:
    """Per model, the finished run with the best mean validation accuracy (ties: the lower learning rate)."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["status"] != "done":
            continue
        current = best.get(run["model"])
        key = (run["valid_mean"], -run["lr"])
        if current is None or key > (current["valid_mean"], -current["lr"]):
            best[run["model"]] = run
    return best


def markdown(report: dict) -> str:
    cfg = report["config"]
    pairs = cfg["pairs"]
    chance = 1 / len(token_ranges(cfg["vocab"])[1])
    lines = [
        f"# Multi-query associative recall ({report['device_name']}, torch {report['provenance']['torch']})",
        "",
        f"Sequence length {cfg['seq_len']}, vocabulary {cfg['vocab']}, pairs {pairs} (training mixes them), "
        f"batch {cfg['batch']}, {cfg['layers']} layers, budget {cfg['budget_s']:g} s in all; test accuracy on "
        f"{cfg['eval_sequences']} held-out sequences per pair count (chance {chance:.3f}), at the learning rate "
        "with the best validation accuracy.",
        "",
        "| model | params | width | lr | steps | sequences | " + " | ".join(f"{p} pairs" for p in pairs) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(pairs),
    ]
    for kind, result in report["results"].items():
        size = report["models"][kind]
        accuracies = " | ".join(f"{result['test_accuracy'][str(p)]:.3f}" for p in pairs)
        lines.append(
            f"| {LABELS[kind]} | {size['params']:,} | {size['width']} | {result['lr']:g} | "
            f"{result['steps']:,} | {result['sequences']:,} | {accuracies} |"
        )
    lines += [
        "",
        "Every run (validation accuracy, mean over pair counts):",
        "",
        "| model | lr | status | steps | train s | valid mean |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for run in report["runs"]:
        if run["status"] == "done":
            lines.append(
                f"| {LABELS[run['model']]} | {run['lr']:g} | done | {run['steps']:,} | "
                f"{run['train_seconds']:.1f} | {run['valid_mean']:.3f} |"
            )
        else:
            lines.append(f"| {LABELS[run['model']]} | {run['lr']:g} | {run['status']} | | | |")
    lines += ["", "Protocol: see the docstring of benchmarks/recall.py.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for kind, result in report["results"].items():
        pairs = [int(p) for p in result["test_accuracy"]]
        label = f"{LABELS[kind]} ({report['models'][kind]['params'] / 1e6:.2f}M)"
        axis.plot(pairs, list(result["test_accuracy"].values()), marker="o", label=label)
    axis.axhline(1 / len(token_ranges(cfg["vocab"])[1]), color="grey", linestyle=":", label="chance")
    axis.set_xscale("log", base=2)
    axis.set_xticks(cfg["pairs"], [str(p) for p in cfg["pairs"]])
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("key-value pairs in the sequence")
    axis.set_ylabel("query accuracy (test)")
    axis.set_title(f"MQAR, sequence length {cfg['seq_len']}, equal parameters", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny task, models and budget: 5 s on CPU (the smoke test), 30 s on CUDA")
    add("--budget-s", type=float, default=600.0, help="wall-clock of the whole script, divided over its runs")
    add("--seq-len", type=int, default=256, help="tokens per sequence (>= 4 x the largest pair count)")
    add("--pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="key-value pair counts")
    add("--vocab", type=int, default=VOCAB, help=f"vocabulary size (<= {VOCAB}); keys and values split it")
    add("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train")
    add("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="peak learning rates of every sweep")
    add("--width", type=int, default=128, help="SRU++ width d (d' = d/4); the others are sized to its params")
    add("--layers", type=int, default=2, help="layers of every model")
    add("--batch", type=int, default=64, help="sequences per step")
    add("--eval-sequences", type=int, default=512, help="held-out sequences per pair count (valid and test each)")
    add("--warmup", type=float, default=0.1, help="warmup as a fraction of each run's time")
    add("--weight-decay", type=float, default=0.1)
    add("--log-every", type=int, default=50, help="steps between recorded training losses")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast on CUDA (CPU: always fp32)")
    add("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    add("--seed", type=int, default=0)
    add("--out-dir", default=str(RESULTS), help="where recall.json / .md / .png go")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_s = min(args.budget_s, 5.0)
        args.seq_len, args.pairs, args.vocab, args.width, args.batch = 32, [2, 4], 32, 16, 8
        args.lrs, args.eval_sequences, args.log_every = [3e-3], 16, 20
    args.pairs = sorted(set(args.pairs))
    args.lrs = list(dict.fromkeys(args.lrs))
    if "srupp" not in args.models:
        parser.error("`--models` must include srupp: the others are sized to it")
    for pairs in args.pairs:
        try:
            check_task(args.vocab, args.seq_len, pairs)
        except ValueError as error:
            parser.error(str(error))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device` cuda asked for, but torch sees no CUDA device")
    if args.quick and args.device == "cuda":
        # The first runs compile the Triton kernels (seconds), which 5 s would not cover.
        args.budget_s = max(args.budget_s, 30.0)
    return args


def run_order(models: list[str], lrs: list[float]) -> list[tuple[str, float]]:
    """The middle learning rate of every model first, so a short budget still covers every model."""
    middle = len(lrs) // 2
    ordered = [lrs[middle]] + [lr for i, lr in enumerate(lrs) if i != middle]
    return [(kind, lr) for lr in ordered for kind in models]


def held_out_sets(args) -> tuple[dict, dict]:
    """The validation and test sets (seeds ``seed + 1`` and ``seed + 2``), on the device."""
    device = args.device
    return tuple(
        {pairs: [(x.to(device), y.to(device)) for x, y in batches] for pairs, batches in sets.items()}
        for sets in (
            held_out(args.seed + offset, args.eval_sequences, args.batch, args.seq_len, args.pairs, args.vocab)
            for offset in (1, 2)
        )
    )


def new_report(args, argv: list[str] | None, sizes: dict) -> dict:
    """The report before any run: provenance, device, configuration and the models' sizes."""
    device = args.device
    config = {k: (str(v) if k == "device" else v) for k, v in vars(args).items() if k != "out_dir"}
    return {
        "provenance": provenance("recall", argv),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "config": config,
        "models": {
            kind: {"width": width, "layers": args.layers, "params": params} for kind, (width, params) in sizes.items()
        },
        "runs": [],
        "results": {},
    }


def time_left(args, began: float, owed_eval: dict, runs_left: int, minimum_run: float) -> tuple[float, int]:
    """The seconds left for the remaining runs after what is owed (a test pass per model, the outputs), and how
    many of the ``runs_left`` runs get at least ``minimum_run`` of them (all of them with ``--quick``)."""
    now = time.perf_counter() - began
    unmeasured = args.budget_s * 0.02
    owed = min(2.0, 0.05 * args.budget_s) + sum(
        unmeasured if seconds is None else seconds for seconds in owed_eval.values()
    )
    left = args.budget_s - now - owed
    return left, runs_left if args.quick else min(runs_left, math.floor(max(0.0, left) / minimum_run))


def score_best(args, sizes: dict, best: dict, test: dict, report: dict) -> None:
    """Each model's best run by validation, reloaded and scored on the test set into ``report["results"]``."""
    for kind, (run, weights) in sorted(best.items(), key=lambda item: args.models.index(item[0])):
        model = fresh_model(kind, sizes[kind][0], args)
        model.load_state_dict(weights)
        model.to(args.device)
        test_accuracy = accuracy(model, test, args.device, autocast_for(args))
        report["results"][kind] = {
            "lr": run["lr"],
            "steps": run["steps"],
            "sequences": run["sequences"],
            "valid_mean": run["valid_mean"],
            "test_accuracy": test_accuracy,
            "test_mean": sum(test_accuracy.values()) / len(test_accuracy),
        }


def main(argv: list[str] | None = None) -> int:
    began = time.perf_counter()
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device = torch.device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = build_models(args)
    valid, test = held_out_sets(args)
    print(
        f"recall benchmark: torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"budget {args.budget_s:g} s",
        file=sys.stderr,
    )
    for kind, (width, params) in sizes.items():
        print(f"  {LABELS[kind]:45s} width {width:5d} x {args.layers}  {params:>10,d} params", file=sys.stderr)

    report = new_report(args, argv, sizes)
    json_path = out_dir / "recall.json"
    order = run_order(args.models, args.lrs)
    best: dict[str, tuple[dict, dict]] = {}
    # Time still owed after the runs: a test pass per model (about its validation pass) and the outputs.
    owed_eval = {kind: None for kind in args.models}
    # A run shorter than this means nothing; when the time left cannot give every remaining run that much,
    # the earlier runs in the order get it and the later ones are skipped. --quick never skips (a smoke test
    # must see every model, however busy the machine).
    minimum_run = 5.0
    interrupted = False
    with tqdm(total=round(args.budget_s), desc="recall", unit="s", file=sys.stderr, mininterval=1.0) as bar:
        bar.update(time.perf_counter() - began)
        for index, (kind, lr) in enumerate(order):
            left, fit = time_left(args, began, owed_eval, len(order) - index, minimum_run)
            if interrupted or fit < 1:
                report["runs"].append({"model": kind, "lr": lr, "status": "interrupted" if interrupted else "skipped"})
                continue
            started = time.perf_counter()
            model = fresh_model(kind, sizes[kind][0], args)
            try:
                # Most of the share trains; the rest pays for building, warming up and the validation pass.
                run = train_run(kind, model, lr, max(0.0, 0.85 * left / fit), args, valid, bar)
            except KeyboardInterrupt:
                interrupted = True
                report["runs"].append({"model": kind, "lr": lr, "status": "interrupted"})
                continue
            run["run_seconds"] = round(time.perf_counter() - started, 3)
            owed_eval[kind] = run["eval_seconds"]
            report["runs"].append(run)
            if choose(report["runs"])[kind] is run:
                best[kind] = (run, {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()})
            tqdm.write(
                f"  {kind:15s} lr {lr:<7g} steps {run['steps']:6d}  valid accuracy "
                + " ".join(f"{p}:{a:.2f}" for p, a in run["valid_accuracy"].items()),
                file=sys.stderr,
            )
            write_atomic(json_path, json.dumps(report, indent=2) + "\n")
        score_best(args, sizes, best, test, report)
        bar.update(max(0.0, time.perf_counter() - began - bar.n))

    report["wall_seconds"] = round(time.perf_counter() - began, 3)
    write_atomic(json_path, json.dumps(report, indent=2) + "\n")
    write_atomic(out_dir / "recall.md", markdown(report))
    plot(report, out_dir / "recall.png")
    print(f"wrote {json_path}, recall.md, recall.png", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
