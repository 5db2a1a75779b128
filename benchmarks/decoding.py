"""Decoding speed of one or more source trees, each round a fresh process per tree in turn (a change of load on a
shared machine hits every tree alike), one torch thread:

- ``beam``: Hugging Face ``generate(num_beams=4, max_new_tokens=128)`` after a 16-token prompt, through
  ``srupp.hf.SRUppForCausalLM`` around a byte-level SRUppLM d=512, d'=128, 2 layers, random float32 weights;
- ``greedy``: greedy decoding through a session (``SRUppLM.decoder``), a 32-token prompt then 128 tokens, on a
  byte-level SRUppLM d=256, d'=64, 4 layers, random weights: float32 and bfloat16 weights, each through the
  compiled one-token step and through the torch ops (the session's ``stack.kernel`` set to None).

Figures are new tokens per second, the prompt's time included: a process's best of ``--repeats`` beam searches
and of ``--greedy-repeats`` greedy runs of each kind (the kinds taken in turn), each after one warm-up, by wall
clock and by the process's CPU time (the least disturbed by other processes on a shared machine; the runs use one
thread). Per tree the median and the best process are reported, with ratios to the first tree, and each greedy
figure over the float32 compiled one (per process, the median of the ratios). Attention's ``alpha`` is set to 0.7
(its initial 0 would leave attention out of the tokens).

    PYTHONPATH=src:. python3 -m benchmarks.decoding                        # this checkout, ~2 min
    PYTHONPATH=src:. python3 -m benchmarks.decoding --src /tmp/old/src --src src   # before | after
    PYTHONPATH=src:. python3 -m benchmarks.decoding --quick                # a smoke run, seconds

An old tree with its own C library: ``mkdir -p /tmp/old && git archive a435ea9 | tar -x -C /tmp/old && (cd
/tmp/old && python setup.py -q build_ext --inplace)``. What a tree lacks (``srupp.hf`` or transformers, sessions,
a session's ``kernel`` switch) is recorded under ``missing`` and its figures left out; which runs took the compiled
step, under ``compiled``. Writes ``decoding.json`` (``--quick``: ``decoding_quick.json``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS, compare_rounds, provenance, tree_environment, write_json

# Run in a process of its own with the tree to time first on the path: only what every tree since the sessions has.
WORKER = r"""
import copy, functools, json, sys, time
import torch
from srupp.models import LMConfig, SRUppLM

config = json.loads(sys.argv[1])
torch.set_num_threads(1)
result = {"figures": {}, "missing": {}, "compiled": {}, "tokens": {}}


def language_model(hidden_size, proj_size, num_layers):
    torch.manual_seed(0)
    model = SRUppLM(LMConfig(hidden_size=hidden_size, proj_size=proj_size, num_layers=num_layers, dropout=0.0,
                             attn_dropout=0.0)).eval()
    with torch.no_grad():
        for layer in model.rnn.layers:
            if layer.has_attention:
                layer.transform.alpha.fill_(0.7)
    return model


def best_rates(runs, repeats, new_tokens):
    # runs: {name: run}, run() returning the new tokens, which every repeat must repeat; taken in turn, so that a
    # change of load hits every run alike
    tokens = {name: run() for name, run in runs.items()}
    walls, cpus = ({name: [] for name in runs} for _ in range(2))
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            again = run()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
            assert again == tokens[name], f"{name}: a repeat gave other tokens"
    for name in runs:
        result["figures"][name] = new_tokens / min(walls[name])
        result["figures"][name + "_cpu"] = new_tokens / min(cpus[name])
        result["tokens"][name] = tokens[name]


def beam():
    try:
        from srupp.hf import SRUppForCausalLM
    except ImportError as err:
        result["missing"]["beam"] = f"{type(err).__name__}: {err}"
        return
    model = SRUppForCausalLM.from_lm(language_model(512, 128, 2)).eval()
    prompt = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    new = config["new_tokens"]
    options = dict(max_new_tokens=new, num_beams=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    best_rates({"beam": lambda: model.generate(prompt, **options)[0, 16:].tolist()}, config["repeats"], new)


@torch.inference_mode()
def greedy_tokens(model, prompt, new, compiled):
    session = model.decoder(1)
    if not compiled:
        session.stack.kernel = None
    kernel = session.stack.kernel is not None
    log_probs = session.step(prompt[:, None])
    tokens = []
    for _ in range(new):
        token = log_probs.argmax(-1)
        tokens.append(int(token[0]))
        log_probs = session.step(token[None])
    return tokens, kernel


def greedy():
    model = language_model(256, 64, 4)
    if not hasattr(model, "decoder"):
        result["missing"]["greedy"] = "SRUppLM has no decoder (decoding sessions)"
        return
    models = {"float32": model, "bfloat16": copy.deepcopy(model).bfloat16()}
    prompt = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(1))
    new, runs = config["new_tokens"], {}
    for dtype, weights in models.items():
        for path, compiled in (("compiled", True), ("torch_ops", False)):
            name = f"greedy_{dtype}_{path}"
            try:
                _, result["compiled"][name] = greedy_tokens(weights, prompt, 1, compiled)
            except AttributeError as err:  # a tree whose session cannot switch its kernel off
                result["missing"][name] = f"{type(err).__name__}: {err}"
                continue
            runs[name] = functools.partial(lambda *run: greedy_tokens(*run)[0], weights, prompt, new, compiled)
    best_rates(runs, config["greedy_repeats"], new)


beam()
greedy()
print(json.dumps(result))
"""


def measure(src: Path, args: argparse.Namespace) -> dict:
    """One process of ``WORKER`` with ``src`` first on the path: its figures, tokens and what it lacked."""
    config = json.dumps({name: getattr(args, name) for name in ("new_tokens", "repeats", "greedy_repeats")})
    command = [sys.executable, "-c", WORKER, config]
    done = subprocess.run(command, env=tree_environment(src), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the run of {src} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per figure the median and best process of every tree that has it, printed with ratios to the first."""
    names = dict.fromkeys(name for processes in runs.values() for name in processes[0]["figures"])
    summary = {}
    for name in names:
        rounds = {
            tree: [run["figures"][name] for run in processes if name in run["figures"]]
            for tree, processes in runs.items()
        }
        rounds = {tree: values for tree, values in rounds.items() if values}  # (a tree without it: see missing)
        unit = "tokens/s (CPU time)" if name.endswith("_cpu") else "tokens/s"
        summary[name] = {**compare_rounds(rounds, lower_is_better=False, label=name, unit=unit), "rounds": rounds}
    return summary


def over_float32(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per tree, each greedy figure over the float32 compiled one of the same process (the same load), the median
    over its processes; printed."""
    ratios = {}
    for tree, processes in runs.items():
        ratios[tree] = {}
        for name in processes[0]["figures"]:
            reference = "greedy_float32_compiled" + "_cpu" * name.endswith("_cpu")
            pairs = [run["figures"] for run in processes if name in run["figures"] and reference in run["figures"]]
            if name.startswith("greedy_") and name != reference and pairs:
                ratios[tree][name] = statistics.median(figures[name] / figures[reference] for figures in pairs)
        shown = ", ".join(f"{name} {ratio:.3f}x" for name, ratio in ratios[tree].items())
        print(f"{tree}: over greedy_float32_compiled (of the same process, median): {shown}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", type=Path, help="a source tree (repeatable; default: src)")
    parser.add_argument("--rounds", type=int, default=7, help="processes per tree")
    parser.add_argument("--repeats", type=int, default=5, help="timed beam searches per process")
    parser.add_argument("--greedy-repeats", type=int, default=20, help="timed greedy runs per process and figure")
    parser.add_argument("--quick", action="store_true", help="one round and repeat, 8 new tokens (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for decoding.json")
    args = parser.parse_args(argv)
    args.new_tokens = 8 if args.quick else 128
    if args.quick:
        args.rounds = args.repeats = args.greedy_repeats = 1
    for name in ("rounds", "repeats", "greedy_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    trees = [str(tree) for tree in args.src or [Path("src")]]
    origin = provenance("decoding", argv)
    runs: dict[str, list[dict]] = {tree: [] for tree in trees}
    for round_index in range(args.rounds):
        for tree in trees:
            run = measure(Path(tree), args)
            runs[tree].append(run)
            shown = ", ".join(f"{name} {rate:,.0f}" for name, rate in run["figures"].items() if "_cpu" not in name)
            print(f"round {round_index + 1}: {tree}: tokens/s {shown}", flush=True)
    payload = {
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "greedy_repeats": args.greedy_repeats,
        "figures": summarise(runs),
        "over_float32_compiled": over_float32(runs),
        "missing": {tree: processes[0]["missing"] for tree, processes in runs.items()},
        "compiled": {tree: processes[0]["compiled"] for tree, processes in runs.items()},
        "same_tokens": same_tokens(runs),
    }
    write_json(args.out / f"decoding{'_quick' * args.quick}.json", payload, "decoding", argv, origin)
    return 0


def same_tokens(runs: dict[str, list[dict]]) -> dict[str, bool]:
    """Per figure, whether every process of every tree gave the first process's tokens; and whether bfloat16
    weights gave float32's tokens (``<dtype path>_as_float32``)."""
    every = [run["tokens"] for processes in runs.values() for run in processes]
    names = dict.fromkeys(name for tokens in every for name in tokens)
    agree = {name: len({tuple(tokens[name]) for tokens in every if name in tokens}) == 1 for name in names}
    first = every[0]
    for name in names:
        if name.startswith("greedy_bfloat16") and "greedy_float32_compiled" in first and name in first:
            agree[f"{name}_as_float32"] = first[name] == first["greedy_float32_compiled"]
    return agree


if __name__ == "__main__":
    sys.exit(main())
