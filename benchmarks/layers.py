"""Layer speed on CPU: train step (forward + backward) and inference tokens/s.

Compares our SRUpp with its GEMM floor (the same matrix products alone, see ``GemmFloor``), the
authors' ``sru.SRUpp`` (if installed), ``nn.LSTM`` and a causal ``nn.TransformerEncoder``, the last two
sized to about our parameter count. Prints a table and the ratios (layer time / GEMM floor, our tokens/s
over each other model's), and writes JSON with the CPU kernel's instruction-set path
(``SRUPP_CPU_ISA=avx2`` forces one).

    python benchmarks/layers.py            # d=512, d'=128 and d=1024, d'=256; 2 layers, T=256, B=16
    python benchmarks/layers.py --quick    # tiny shapes, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from srupp.nn import SRUpp  # noqa: E402
from srupp.ops import cpu_kernel_info  # noqa: E402

FULL = [
    {"d": 512, "proj": 128, "layers": 2, "steps": 256, "batch": 16},
    {"d": 1024, "proj": 256, "layers": 2, "steps": 256, "batch": 16},
]
QUICK = [{"d": 32, "proj": 8, "layers": 2, "steps": 16, "batch": 2}]


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def causal_additive_mask(steps: int) -> torch.Tensor:
    return torch.ones(steps, steps).triu(1) * -1e4


class Ours(nn.Module):
    def __init__(self, d, proj, layers):
        super().__init__()
        self.model = SRUpp(d, d, proj, num_layers=layers)

    def forward(self, x):
        return self.model(x, causal=True)[0]


class Authors(nn.Module):
    def __init__(self, sru, d, proj, layers, steps):
        super().__init__()
        self.model = sru.SRUpp(d, d, proj, num_layers=layers)
        self.register_buffer("mask", causal_additive_mask(steps))

    def forward(self, x):
        return self.model(x, attn_mask=self.mask)[0]


class LSTM(nn.Module):
    def __init__(self, d, hidden, layers):
        super().__init__()
        self.model = nn.LSTM(d, hidden, num_layers=layers)

    def forward(self, x):
        return self.model(x)[0]


class Transformer(nn.Module):
    def __init__(self, d, width, layers, steps):
        super().__init__()
        self.proj = nn.Linear(d, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0)
        self.model = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(steps))

    def forward(self, x):
        return self.model(self.proj(x), mask=self.mask, is_causal=True)


class GemmFloor(nn.Module):
    """The matrix products of our SRUpp layers alone, same shapes, nothing else: per layer
    Q = x W^q [d -> d'], (K, V) = Q W^kv [d' -> 2d'], scores = Q K^T and A = scores V per sequence
    (causal attention over T keys), U = (Q + A) W^o [d' -> 3d]. No layer norm, softmax, mask or
    recurrence; its forward + backward time is the floor the layer's time is compared with. Every layer
    reads the input (the dependency between layers does not change the matmuls' cost)."""

    def __init__(self, d, proj, layers):
        super().__init__()
        self.weights = nn.ParameterList()
        for _ in range(layers):
            for shape in ((d, proj), (proj, 2 * proj), (proj, 3 * d)):
                self.weights.append(nn.Parameter(torch.randn(shape) / shape[0] ** 0.5))
        self.layers = layers

    def forward(self, x):
        out = 0
        for layer in range(self.layers):
            w_q, w_kv, w_o = self.weights[3 * layer : 3 * layer + 3]
            q = x @ w_q  # [T, B, d']
            k, v = (q @ w_kv).chunk(2, dim=-1)
            q_b, k_b, v_b = (t.transpose(0, 1) for t in (q, k, v))  # [B, T, d']
            a = (q_b @ k_b.transpose(1, 2)) @ v_b
            out = out + (q + a.transpose(0, 1)) @ w_o
        return out


def closest(build, target: int, candidates) -> nn.Module:
    """The model whose parameter count is nearest ``target``; sizes are tried on the meta device (free)."""
    with torch.device("meta"):
        best = min(candidates, key=lambda c: abs(count(build(c)) - target))
    return build(best)


def measure_all(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Train-step and inference tokens/s of every model, timed round-robin (each repeat times every model
    once) and taking each one's fastest run: on a shared machine, load that comes and goes then hits all
    models alike instead of whichever ran during it."""
    tokens = x.shape[0] * x.shape[1]

    def train_step(model):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    def inference(model):
        with torch.no_grad():
            model(x)

    best = {name: {"train": math.inf, "inference": math.inf} for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            for mode, fn in (("train", train_step), ("inference", inference)):
                model.train(mode == "train")
                start = time.perf_counter()
                fn(model)
                if repeat:
                    best[name][mode] = min(best[name][mode], time.perf_counter() - start)
    return {
        name: {
            "params": count(models[name]),
            "train_tokens_per_s": tokens / best[name]["train"],
            "inference_tokens_per_s": tokens / best[name]["inference"],
        }
        for name in models
    }


def run_size(size: dict, repeats: int, sru) -> dict:
    d, proj, layers, steps, batch = size["d"], size["proj"], size["layers"], size["steps"], size["batch"]
    torch.manual_seed(0)
    models = {"srupp": Ours(d, proj, layers), "gemm_floor": GemmFloor(d, proj, layers)}
    target = count(models["srupp"])
    if sru is not None:
        models["sru_authors"] = Authors(sru, d, proj, layers, steps)
    models["lstm"] = closest(lambda h: LSTM(d, h, layers), target, range(4, 4 * d, 4))
    models["transformer"] = closest(lambda w: Transformer(d, w, layers, steps), target, range(8, 2 * d, 8))
    x = torch.randn(steps, batch, d)
    results = measure_all(models, x, repeats)
    for name, r in results.items():
        print(f"  {name:12s} params {r['params']:>10,d}  train {r['train_tokens_per_s']:>10,.0f} tok/s  "
              f"inference {r['inference_tokens_per_s']:>10,.0f} tok/s", flush=True)  # fmt: skip
    ratios = {}
    ours = results["srupp"]
    for mode in ("train", "inference"):
        key = f"{mode}_tokens_per_s"
        ratios[f"{mode}_time_srupp_over_gemm_floor"] = results["gemm_floor"][key] / ours[key]
    for other in results:
        if other not in ("srupp", "gemm_floor"):
            for mode in ("train", "inference"):
                key = f"{mode}_tokens_per_s"
                ratios[f"{mode}_srupp_over_{other}"] = ours[key] / results[other][key]
    for key, value in ratios.items():
        print(f"  {key:40s} {value:6.2f}x")
    return {"size": size, "results": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (each model's fastest is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-official", action="store_true", help="skip the authors' sru package")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layers.json, "
                        "layers_quick.json with --quick)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    sru = None
    if not args.no_official:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import sru  # noqa: F401  (first import compiles its C++ extension)
        except ImportError:
            print("the authors' package `sru` is not installed; skipping it", file=sys.stderr)
    warnings.filterwarnings("ignore", message="Running SRU on CPU with grad_enabled=True")
    kernel = cpu_kernel_info()
    print(f"CPU layer benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {repeats}, "
          f"CPU kernel {kernel['isa']} (of {kernel['available']})")  # fmt: skip
    payload: dict = {"repeats": repeats, "cpu_kernel": kernel, "sizes": []}
    for size in QUICK if args.quick else FULL:
        print(f"d={size['d']} d'={size['proj']} layers={size['layers']} T={size['steps']} B={size['batch']}")
        payload["sizes"].append(run_size(size, repeats, sru))
    path = write_json("layers_quick" if args.quick else "layers", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
