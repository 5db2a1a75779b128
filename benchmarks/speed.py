"""Speed of byte-level LMs at equal parameters: training, inference, cached decoding, and cost vs length.

Models are ``embedding -> body -> head`` (``benchmarks.baselines``): our SRUpp (attention in every
layer, d' = d/4), the authors' ``sru.SRUpp`` in the same wrapper (if importable), nn.LSTM and the
GPT-style Transformer, the last two sized to our SRUpp's parameter count. Every figure is also
printed as a ratio to a baseline measured in the same run.

1. train (forward + cross-entropy + backward) and inference (forward) tokens/s at each size;
   ratios: srupp over each other model.
2. decoding tokens/s and ms/token, one token per step with the cache (a decoding session; Transformer key/value
   cache; LSTM carrying its state), batch 1 and 8, best of the repeats with the models taking turns;
   ratios: srupp over each other model. Also the cost of
   one decoding-session step through one layer (T=1, B=1) at the decoding width and at width 8, where the
   matmuls are negligible and what remains is per-call overhead.
3. forward (inference) cost per token as T grows at a fixed number of tokens per batch, SRUpp (plain
   causal attention, no memory) against the Transformer; ratios: each T over T=256, srupp over transformer.

    python -m benchmarks.speed                  # d = 256, 512, 1024; 2 layers; T=256, B=16 (~5 min on 2 cores)
    python -m benchmarks.speed --no-official    # without the authors' package
    python -m benchmarks.speed --quick          # tiny shapes, seconds (the smoke test)
    python -m benchmarks.speed --only decoding  # one part (sizes, decoding, lengths); ~30 s for decoding
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.baselines import AuthorsSRUppBody, ByteLM, build, count_parameters, load_authors, size_to_match
from benchmarks.common import RESULTS, time_it, write_atomic, write_json
from srupp.models import LMConfig, SRUppLM
from srupp.nn import SRUpp

FULL = {
    "sizes": [256, 512, 1024],
    "layers": 2,
    "steps": 256,
    "batch": 16,
    "decode_width": 512,
    "decode_tokens": 128,
    "decode_batches": [1, 8],
    "length_width": 512,
    "lengths": [256, 512, 1024, 2048, 4096],
    "length_tokens": 8192,
}
PARTS = ("sizes", "decoding", "lengths")
QUICK = {
    "sizes": [32],
    "layers": 2,
    "steps": 16,
    "batch": 2,
    "decode_width": 32,
    "decode_tokens": 8,
    "decode_batches": [1, 2],
    "length_width": 32,
    "lengths": [16, 32, 64],
    "length_tokens": 128,
}


def equal_models(width: int, layers: int, sru) -> dict[str, ByteLM]:
    torch.manual_seed(0)
    models = {"srupp": build("srupp", width, layers)}
    if sru is not None:
        models["sru_authors"] = ByteLM(AuthorsSRUppBody(sru, width, layers, width // 4), width)
    target = count_parameters(models["srupp"])
    for kind, (model, _) in size_to_match(["lstm", "transformer"], target, layers, max_width=4 * width).items():
        models[kind] = model
    return models


def ratios_to(results: dict, baseline: str, keys: tuple[str, ...]) -> dict[str, float]:
    return {
        f"{key}_{baseline}_over_{other}": results[baseline][key] / results[other][key]
        for other in results
        if other != baseline
        for key in keys
    }


def bench_sizes(plan: dict, repeats: int, sru) -> list[dict]:
    out = []
    steps, batch, layers = plan["steps"], plan["batch"], plan["layers"]
    tokens = torch.randint(0, 256, (steps + 1, batch))
    inputs, targets = tokens[:-1], tokens[1:]
    for width in plan["sizes"]:
        print(f"train / inference: d={width} layers={layers} T={steps} B={batch}")
        results = {}
        for name, model in equal_models(width, layers, sru).items():

            def train_step(model=model):
                model.zero_grad(set_to_none=True)
                logits, _ = model(inputs)
                F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

            def inference(model=model):
                with torch.no_grad():
                    model(inputs)

            model.train()
            train = time_it(train_step, repeats=repeats)
            model.eval()
            infer = time_it(inference, repeats=repeats)
            results[name] = {
                "params": count_parameters(model),
                "train_tokens_per_s": steps * batch / train,
                "inference_tokens_per_s": steps * batch / infer,
            }
            r = results[name]
            print(
                f"  {name:12s} params {r['params']:>10,d}  train {r['train_tokens_per_s']:>10,.0f} tok/s  "
                f"inference {r['inference_tokens_per_s']:>10,.0f} tok/s",
                flush=True,
            )
        ratios = ratios_to(results, "srupp", ("train_tokens_per_s", "inference_tokens_per_s"))
        for key, value in ratios.items():
            print(f"  {key:55s} {value:6.2f}x")
        out.append(
            {"width": width, "layers": layers, "steps": steps, "batch": batch, "results": results, "ratios": ratios}
        )
    return out


def bench_decoding(plan: dict, repeats: int) -> list[dict]:
    """Per model the best of ``repeats`` decodes of ``decode_tokens`` tokens, the models taking turns within
    each repeat so that a burst of load on a shared machine hits them alike."""
    width, layers, count = plan["decode_width"], plan["layers"], plan["decode_tokens"]
    models = equal_models(width, layers, None)
    out = []
    for batch in plan["decode_batches"]:
        print(f"decoding: d={width} layers={layers} batch={batch}, {count} tokens one at a time from an empty cache")
        tokens = torch.randint(0, 256, (count, batch))

        def decode(model: ByteLM, batch: int = batch, tokens: torch.Tensor = tokens) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                cache = model.init_decode(batch)
                for t in range(count):
                    _, cache = model.step(tokens[t : t + 1], cache)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            decode(model.eval())  # warm-up
        for _ in range(max(repeats, 3)):
            for name, model in models.items():
                times[name].append(decode(model))
        results = {}
        for name, model in models.items():
            seconds = min(times[name])
            results[name] = {
                "params": count_parameters(model),
                "decode_tokens_per_s": count * batch / seconds,
                "decode_ms_per_token": 1e3 * seconds / count,
                "decode_ms_per_token_median": 1e3 * statistics.median(times[name]) / count,
            }
            r = results[name]
            print(
                f"  {name:12s} {r['decode_tokens_per_s']:>10,.0f} tok/s  {r['decode_ms_per_token']:7.3f} ms/token "
                f"(median {r['decode_ms_per_token_median']:.3f}; per step of the batch)",
                flush=True,
            )
        ratios = ratios_to(results, "srupp", ("decode_tokens_per_s",))
        for key, value in ratios.items():
            print(f"  {key:55s} {value:6.2f}x")
        out.append(
            {"width": width, "layers": layers, "batch": batch, "tokens": count, "results": results, "ratios": ratios}
        )
    return out


def bench_layer_step(plan: dict, repeats: int) -> list[dict]:
    """Microseconds per one-token call through one layer (B=1, after a 16-token prefill) of a decoding session:
    ``SRUpp.decoder``'s on a vector, and ``SRUppLM.decoder``'s on a byte id (the layer plus the embedding lookup,
    the 256-way output layer and its log-softmax); the best of the repeats' medians over ``decode_tokens`` calls."""
    rows = []
    for width in sorted({8, plan["decode_width"]}):
        torch.manual_seed(0)
        proj = max(1, width // 4)
        layer = SRUpp(width, width, proj, num_layers=1).eval()
        lm = SRUppLM(LMConfig(hidden_size=width, proj_size=proj, num_layers=1)).eval()
        cases = {
            "SRUpp.decoder": (layer, torch.randn(16, 1, width), torch.randn(1, 1, width)),
            "SRUppLM.decoder": (lm, torch.randint(0, 256, (16, 1)), torch.randint(0, 256, (1, 1))),
        }
        for call, (model, prefill, token) in cases.items():
            medians = []
            with torch.no_grad():
                for _ in range(max(repeats, 5)):
                    session = model.decoder(1)
                    session.step(prefill)
                    times = []
                    for _ in range(plan["decode_tokens"]):
                        start = time.perf_counter()
                        session.step(token)
                        times.append(time.perf_counter() - start)
                    medians.append(statistics.median(times))
            rows.append({"call": call, "width": width, "proj_size": proj, "us_per_call": 1e6 * min(medians)})
            print(f"one-layer {call}, T=1 B=1 d={width} d'={proj}: {rows[-1]['us_per_call']:.1f} us/call", flush=True)
    return rows


def bench_lengths(plan: dict, repeats: int) -> dict:
    width, layers, total = plan["length_width"], plan["layers"], plan["length_tokens"]
    models = {k: v for k, v in equal_models(width, layers, None).items() if k in ("srupp", "transformer")}
    print(f"forward cost per token vs T: d={width} layers={layers}, B*T = {total}")
    rows = []
    for steps in plan["lengths"]:
        batch = max(1, total // steps)
        tokens = torch.randint(0, 256, (steps, batch))
        row = {"steps": steps, "batch": batch}
        for name, model in models.items():
            model.eval()

            def forward(model=model, tokens=tokens):
                with torch.no_grad():
                    model(tokens)

            row[f"{name}_us_per_token"] = 1e6 * time_it(forward, repeats=repeats) / (steps * batch)
        row["srupp_over_transformer_cost"] = row["srupp_us_per_token"] / row["transformer_us_per_token"]
        rows.append(row)
    for row in rows:
        for name in models:
            row[f"{name}_cost_over_first_T"] = row[f"{name}_us_per_token"] / rows[0][f"{name}_us_per_token"]
        print(
            f"  T={row['steps']:5d} B={row['batch']:3d}  srupp {row['srupp_us_per_token']:8.2f} us/token "
            f"({row['srupp_cost_over_first_T']:5.2f}x T={rows[0]['steps']})  transformer "
            f"{row['transformer_us_per_token']:8.2f} us/token ({row['transformer_cost_over_first_T']:5.2f}x)  "
            f"srupp/transformer {row['srupp_over_transformer_cost']:5.2f}",
            flush=True,
        )
    params = {name: count_parameters(model) for name, model in models.items()}
    return {"width": width, "layers": layers, "tokens_per_batch": total, "params": params, "rows": rows}


def decoding_lines(report: dict) -> list[str]:
    """The decoding tables of the report: tokens/s per batch size, and one call of one layer."""
    lines = [
        "",
        "## Decoding tokens/s, one token per step with the cache",
        "",
        "| batch | model | params | tok/s | ms/token | srupp / this |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for block in report["decoding"]:
        ours = block["results"]["srupp"]["decode_tokens_per_s"]
        for name, r in block["results"].items():
            lines.append(
                f"| {block['batch']} | {name} | {r['params']:,} | {r['decode_tokens_per_s']:,.0f} | "
                f"{r['decode_ms_per_token']:.3f} | {ours / r['decode_tokens_per_s']:.2f} |"
            )
    lines += [
        "",
        "One layer, one token per call (B=1, after a 16-token prefill; `SRUppLM.decoder` adds the byte",
        "embedding, the 256-way output layer and its log-softmax):",
        "",
        "| call | d | d' | us per call |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{row['call']}` | {row['width']} | {row['proj_size']} | {row['us_per_call']:.1f} |"
        for row in report["layer_step"]
    ]
    return lines


def markdown(report: dict) -> str:
    m = report["provenance"]
    lines = [f"# Speed ({m['cpu']}, {m['torch_threads']} threads, torch {m['torch']})", ""]
    if "sizes" in report:
        lines += [
            "## Training and inference tokens/s (equal parameters)",
            "",
            "| d | model | params | train tok/s | srupp / this | inference tok/s | srupp / this |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
    for size in report.get("sizes", []):
        ours = size["results"]["srupp"]
        for name, r in size["results"].items():
            train_ratio = ours["train_tokens_per_s"] / r["train_tokens_per_s"]
            infer_ratio = ours["inference_tokens_per_s"] / r["inference_tokens_per_s"]
            lines.append(
                f"| {size['width']} | {name} | {r['params']:,} | {r['train_tokens_per_s']:,.0f} | "
                f"{train_ratio:.2f} | {r['inference_tokens_per_s']:,.0f} | {infer_ratio:.2f} |"
            )
    if "decoding" in report:
        lines += decoding_lines(report)
    if "lengths" not in report:
        return "\n".join(lines) + "\n"
    lengths = report["lengths"]
    lines += [
        "",
        f"## Forward cost per token vs T (d={lengths['width']}, B*T = {lengths['tokens_per_batch']})",
        "",
        "| T | B | srupp us/token | x first T | transformer us/token | x first T | srupp / transformer |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in lengths["rows"]:
        lines.append(
            f"| {row['steps']} | {row['batch']} | {row['srupp_us_per_token']:.2f} | "
            f"{row['srupp_cost_over_first_T']:.2f} | {row['transformer_us_per_token']:.2f} | "
            f"{row['transformer_cost_over_first_T']:.2f} | {row['srupp_over_transformer_cost']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (the smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median; default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--no-official", action="store_true", help="skip the authors' sru package")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where speed.json and speed.md go")
    parser.add_argument(
        "--only", choices=PARTS, default=None, help="run one part; results go to speed-<part>.json and .md"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    plan = QUICK if args.quick else FULL
    parts = PARTS if args.only is None else (args.only,)
    sru = None if args.no_official or "sizes" not in parts else load_authors()
    warnings.filterwarnings("ignore", message="Running SRU on CPU with grad_enabled=True")
    print(f"speed benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {repeats}")
    payload: dict = {"repeats": repeats, "plan": plan}
    if "sizes" in parts:
        payload["sizes"] = bench_sizes(plan, repeats, sru)
    if "decoding" in parts:
        payload["decoding"] = bench_decoding(plan, repeats)
        payload["layer_step"] = bench_layer_step(plan, repeats)
    if "lengths" in parts:
        payload["lengths"] = bench_lengths(plan, repeats)
    out_dir = Path(args.out_dir)
    name = "speed" if args.only is None else f"speed-{args.only}"
    path = write_json(out_dir / f"{name}.json", payload, "speed", argv)
    write_atomic(out_dir / f"{name}.md", markdown(json.loads(path.read_text())))
    print(f"wrote {path} and {out_dir / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
