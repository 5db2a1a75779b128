"""Layer speed on CPU: train step (forward + backward) and inference tokens/s.

Compares our SRUpp with its GEMM floor (the same matrix products alone, see ``GemmFloor``), the
authors' ``sru.SRUpp`` (if installed), ``nn.LSTM`` and the GPT-style Transformer of
``benchmarks.baselines`` (after a ``Linear(d, width)``), the last two sized to about our parameter
count. Prints a table and the ratios (layer time / GEMM floor, our tokens/s over each other model's), and
writes JSON with the provenance, including the CPU kernel's instruction-set path (``SRUPP_CPU_ISA=avx2``
forces one).

Models are timed round-robin in one process, each one's fastest run kept. ``--alone`` times each model in a
process of its own instead, as a user's process runs one model: the C library's memory then behaves as it
does for that model alone (e.g. glibc maps every block above 32 MiB anew, and the system zeroes its pages on
first touch), which the round-robin's mix of models hides.

    python -m benchmarks.layers            # d=512, d'=128 and d=1024, d'=256; 2 layers, T=256, B=16
    python -m benchmarks.layers --alone    # the same, each model in a process of its own (several rounds)
    python -m benchmarks.layers --quick    # tiny shapes, seconds (a smoke run)
    python -m benchmarks.layers --precision both   # each model in float32 and under bf16 autocast as well

``--precision bf16`` times every step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (inputs float32, as
from an embedding); ``both`` times float32 and bf16 round-robin and prints each model's bf16 / fp32 speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
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


PRECISIONS = {"fp32": ("fp32",), "bf16": ("bf16",), "both": ("fp32", "bf16")}


def precision_context(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def measure_all(
    models: dict[str, nn.Module], x: torch.Tensor, repeats: int, precisions: tuple[str, ...] = ("fp32",)
) -> dict[str, dict]:
    """Train-step and inference tokens/s of every model in each precision, timed round-robin (each repeat times
    every model once) and taking each one's fastest run: on a shared machine, load that comes and goes then hits
    all models alike instead of whichever ran during it. Keys end in ``_bf16`` for the bf16 autocast runs."""
    tokens = x.shape[0] * x.shape[1]

    def train_step(model, precision):
        model.zero_grad(set_to_none=True)
        with precision_context(precision):
            loss = model(x).square().mean()
        loss.backward()

    def inference(model, precision):
        with torch.no_grad(), precision_context(precision):
            model(x)

    runs = [(mode, precision) for precision in precisions for mode in ("train", "inference")]
    best = {name: dict.fromkeys(runs, math.inf) for name in models}
    failed: set[tuple] = set()  # a model that cannot run a mode in a precision (e.g. the authors' CPU op in bf16)
    for repeat in range(repeats + 1):  # the first round warms up
        for name, model in models.items():
            for mode, precision in runs:
                if (name, mode, precision) in failed:
                    continue
                model.train(mode == "train")
                start = time.perf_counter()
                try:
                    (train_step if mode == "train" else inference)(model, precision)
                except RuntimeError as err:
                    print(f"  {name} {mode} {precision}: fails: {str(err).splitlines()[-1]}", flush=True)
                    failed.add((name, mode, precision))
                    best[name][mode, precision] = math.nan
                    continue
                if repeat:
                    best[name][mode, precision] = min(best[name][mode, precision], time.perf_counter() - start)
    return {
        name: {"params": count_parameters(models[name])}
        | {
            f"{mode}_tokens_per_s{'_bf16' * (precision == 'bf16')}": tokens / best[name][mode, precision]
            for mode, precision in runs
        }
        for name in models
    }


def builders(size: dict, sru) -> dict[str, Callable[[], nn.Module]]:
    """How to build each model of one size: ours, its GEMM floor, the authors' (with ``sru``), and an LSTM and a
    Transformer sized to our parameter count."""
    d, proj, layers = size["d"], size["proj"], size["layers"]
    made = {
        "srupp": lambda: Layer(SRUppBody(d, layers, proj), d, d),
        "gemm_floor": lambda: GemmFloor(d, proj, layers),
    }
    if sru is not None:
        made["sru_authors"] = lambda: Layer(AuthorsSRUppBody(sru, d, layers, proj), d, d)
    with torch.device("meta"):
        target = count_parameters(made["srupp"]())
    made["lstm"] = lambda: closest(
        lambda h: Layer(RecurrentBody("lstm", h, layers, input_size=d), h, h), target, range(4, 4 * d + 1, 4)
    )
    made["transformer"] = lambda: closest(
        lambda w: Layer(TransformerBody(w, layers), d, w), target, width_grid("transformer", 2 * d)
    )
    return made


def build_models(size: dict, sru, names: list[str] | None = None) -> dict[str, nn.Module]:
    """The models of one size, all or those ``names``."""
    torch.manual_seed(0)
    return {name: build() for name, build in builders(size, sru).items() if names is None or name in names}


def report(size: dict, results: dict[str, dict]) -> dict:
    """Print every model's tokens/s and the ratios (layer time / GEMM floor, ours over each other model's, and
    each model's bf16 over its float32 speed), in every precision measured."""
    suffixes = [suffix for suffix in ("", "_bf16") if f"train_tokens_per_s{suffix}" in results["srupp"]]
    for name, r in results.items():
        for suffix in suffixes:
            print(
                f"  {name:12s} params {r['params']:>10,d} {suffix[1:] or 'fp32':5s} train "
                f"{r['train_tokens_per_s' + suffix]:>10,.0f} tok/s  inference "
                f"{r['inference_tokens_per_s' + suffix]:>10,.0f} tok/s",
                flush=True,
            )
    ratios = {}
    ours = results["srupp"]
    for suffix in suffixes:
        for mode in ("train", "inference"):
            key = f"{mode}_tokens_per_s{suffix}"
            ratios[f"{mode}{suffix}_time_srupp_over_gemm_floor"] = results["gemm_floor"][key] / ours[key]
            for other in results:
                if other not in ("srupp", "gemm_floor"):
                    ratios[f"{mode}{suffix}_srupp_over_{other}"] = ours[key] / results[other][key]
    if len(suffixes) == 2:
        for name, r in results.items():
            for mode in ("train", "inference"):
                ratios[f"{mode}_bf16_over_fp32_{name}"] = r[f"{mode}_tokens_per_s_bf16"] / r[f"{mode}_tokens_per_s"]
    for key, value in ratios.items():
        print(f"  {key:40s} {value:6.2f}x")
    return {"size": size, "results": results, "ratios": ratios}


def cpu_flags() -> list[str]:
    """The CPU's flags that bear on these runs' precisions (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(line.split(":", 1)[1].split() for line in handle if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [flag for flag in flags if flag.startswith(("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx", "f16c"))]


def inputs(size: dict) -> torch.Tensor:
    return torch.randn(size["steps"], size["batch"], size["d"], generator=torch.Generator().manual_seed(1))


def run_size(size: dict, repeats: int, sru, precisions: tuple[str, ...]) -> dict:
    return report(size, measure_all(build_models(size, sru), inputs(size), repeats, precisions))


def run_size_alone(size: dict, index: int, names: list[str], rounds: int, forward: list[str]) -> dict:
    """Every model of one size timed in a process of its own (``--one``), the models in turn, ``rounds`` times;
    each model's fastest run of them all is kept."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name in names:
            command = [sys.executable, "-m", "benchmarks.layers", "--one", name, "--size-index", str(index), *forward]
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            kept = best.setdefault(name, result)
            for key in (key for key in result if key.endswith(("_per_s", "_per_s_bf16"))):
                kept[key] = max(kept[key], result[key])
    return report(size, best)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (each model's fastest is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-official", action="store_true", help="skip the authors' sru package")
    parser.add_argument("--alone", action="store_true", help="time each model in a process of its own")
    parser.add_argument("--rounds", type=int, default=3, help="with --alone: processes per model, in turn")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32", help="float32, bf16 autocast, or both (default fp32)"
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # --alone's child: this model only
    parser.add_argument("--size-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/layers.json, "
        "with _alone and _quick in the name for --alone and --quick)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    sru = None if args.no_official or args.one not in (None, "sru_authors") else load_authors()
    sizes = QUICK if args.quick else FULL
    if args.one:
        size = sizes[args.size_index]
        results = measure_all(build_models(size, sru, [args.one]), inputs(size), repeats, PRECISIONS[args.precision])
        print(json.dumps(results[args.one]))
        return 0
    kernel = cpu_kernel()
    alone = ", each model alone" if args.alone else ""
    print(
        f"CPU layer benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {repeats}, "
        f"CPU kernel {kernel['isa']} (of {kernel['available']}, bf16 matmuls: {kernel.get('bf16_matmul')}), "
        f"precision {args.precision}{alone}"
    )
    payload: dict = {
        "repeats": repeats,
        "alone": args.alone,
        "precision": args.precision,
        "cpu_kernel": kernel,
        "cpu_flags": cpu_flags(),
        "sizes": [],
    }
    # what each --alone child needs to build and time its model as this run would
    forward = [f"--repeats={repeats}"] + [f"--threads={args.threads}"] * bool(args.threads)
    forward += ["--quick"] * args.quick + ["--no-official"] * args.no_official + [f"--precision={args.precision}"]
    for index, size in enumerate(sizes):
        print(f"d={size['d']} d'={size['proj']} layers={size['layers']} T={size['steps']} B={size['batch']}")
        if args.alone:
            payload["sizes"].append(run_size_alone(size, index, list(builders(size, sru)), args.rounds, forward))
        else:
            payload["sizes"].append(run_size(size, repeats, sru, PRECISIONS[args.precision]))
    name = "layers" + "_alone" * args.alone + f"_{args.precision}" * (args.precision != "fp32") + "_quick" * args.quick
    out = Path(args.out) if args.out else RESULTS / f"{name}.json"
    path = write_json(out, payload, "layers", argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
