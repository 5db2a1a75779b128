"""Layer speed on CPU: train step (forward + backward) and inference tokens/s.

Compares our SRUpp with its GEMM floor (the same matrix products alone, see ``GemmFloor``), the
authors' ``sru.SRUpp`` (if installed), ``nn.LSTM`` and the GPT-style Transformer of
``benchmarks.baselines`` (after a ``Linear(d, width)``), the last two sized to about our parameter
count. Prints a table and the ratios (layer time / GEMM floor, our tokens/s over each other model's), and
writes JSON with the provenance, including the CPU kernel's instruction-set path (``SRUPP_CPU_ISA=avx2``
forces one).

    python -m benchmarks.layers            # d=512, d'=128 and d=1024, d'=256; 2 layers, T=256, B=16
    python -m benchmarks.layers --quick    # tiny shapes, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.baselines import (
    AuthorsSRUppBody,
    RecurrentBody,
    SRUppBody,
    TransformerBody,
    closest_width,
    count_parameters,
    load_authors,
    width_grid,
)
from benchmarks.common import RESULTS, cpu_kernel, write_json

FULL = [
    {"d": 512, "proj": 128, "layers": 2, "steps": 256, "batch": 16},
    {"d": 1024, "proj": 256, "layers": 2, "steps": 256, "batch": 16},
]
QUICK = [{"d": 32, "proj": 8, "layers": 2, "steps": 16, "batch": 2}]


class Layer(nn.Module):
    """A baseline body on ``[T, B, d]`` inputs, returning its output only; a ``Linear(d, width)`` first when
    the body is of another width."""

    def __init__(self, body: nn.Module, d: int, width: int) -> None:
        super().__init__()
        self.project = nn.Identity() if d == width else nn.Linear(d, width)
        self.body = body

    def forward(self, x):
        return self.body(self.project(x))[0]


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


def closest(build, target: int, grid: range) -> nn.Module:
    """The model whose parameter count is nearest ``target``; sizes are tried on the meta device (free)."""

    def params(width: int) -> int:
        with torch.device("meta"):
            return count_parameters(build(width))

    return build(closest_width(params, target, grid))


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
            "params": count_parameters(models[name]),
            "train_tokens_per_s": tokens / best[name]["train"],
            "inference_tokens_per_s": tokens / best[name]["inference"],
        }
        for name in models
    }


def run_size(size: dict, repeats: int, sru) -> dict:
    d, proj, layers, steps, batch = size["d"], size["proj"], size["layers"], size["steps"], size["batch"]
    torch.manual_seed(0)
    models = {"srupp": Layer(SRUppBody(d, layers, proj), d, d), "gemm_floor": GemmFloor(d, proj, layers)}
    target = count_parameters(models["srupp"])
    if sru is not None:
        models["sru_authors"] = Layer(AuthorsSRUppBody(sru, d, layers, proj), d, d)
    models["lstm"] = closest(lambda h: Layer(RecurrentBody("lstm", h, layers, input_size=d), h, h), target,
                             range(4, 4 * d + 1, 4))  # fmt: skip
    models["transformer"] = closest(lambda w: Layer(TransformerBody(w, layers), d, w), target,
                                    width_grid("transformer", 2 * d))  # fmt: skip
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
    sru = None if args.no_official else load_authors()
    kernel = cpu_kernel()
    print(f"CPU layer benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {repeats}, "
          f"CPU kernel {kernel['isa']} (of {kernel['available']})")  # fmt: skip
    payload: dict = {"repeats": repeats, "cpu_kernel": kernel, "sizes": []}
    for size in QUICK if args.quick else FULL:
        print(f"d={size['d']} d'={size['proj']} layers={size['layers']} T={size['steps']} B={size['batch']}")
        payload["sizes"].append(run_size(size, repeats, sru))
    out = Path(args.out) if args.out else RESULTS / ("layers_quick.json" if args.quick else "layers.json")
    path = write_json(out, payload, "layers", argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
