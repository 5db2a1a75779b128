"""The time per update of a two-rank DDP run (gloo, on this machine's CPU) of the ``tiny`` preset, launched with
``torchrun`` as users launch it, for one or more source trees in alternating rounds (a change of load on a shared
machine hits every tree alike).

    PYTHONPATH=src python3 -m benchmarks.ddp                           # this checkout, ~1 min
    PYTHONPATH=src python3 -m benchmarks.ddp --src /tmp/old/src --src src  # before | after: ratios to the first

Logging and evaluation are kept out of the timed updates (``log_every`` = ``eval_every`` = ``--steps``), so what
differs between trees is the update and the trainer's per-update bookkeeping (stop checks, loss averaging).
Rank 0 records when each update starts; a round's figure is the median time between those starts after the first
``--warmup`` updates (robust to another process taking the core for a while); the best and the median round of each
tree are reported. Writes ``ddp.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, compare_rounds, provenance, tree_environment, write_json

WORKER = """
import json, sys, time
from srupp.train import apply_overrides, load_preset, loop, train

starts = []
update = loop.one_update

def timed(run, state):
    starts.append(time.perf_counter())
    update(run, state)

loop.one_update = timed
result = train(apply_overrides(load_preset("tiny"), json.load(open(sys.argv[1]))))
if result.is_main:
    json.dump(starts, open(sys.argv[2], "w"))
"""


def write_corpus(folder: Path) -> str:
    """A prepared byte corpus of ~200 KB of random code-like words (both trees read this format)."""
    from srupp.data import prepare_text

    rng = random.Random(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "None", "(", ")", ":"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(40_000)]
    (folder / "text.txt").write_text("\n".join(lines) + "\n")
    return str(prepare_text(folder / "text.txt", folder / "data").path)


def seconds_per_update(src: Path, folder: Path, name: str, corpus: str, args) -> float:
    """One two-rank run of ``--steps`` updates with ``src`` first on the path; rank 0's median time per update."""
    overrides = {
        "data": corpus,
        "out_dir": str(folder / name),
        "max_steps": str(args.steps),
        "eval_every": str(args.steps),
        "log_every": str(args.steps),
        "eval_tokens": "256",
        "progress": "false",
        "num_threads": "1",
    }
    (folder / "worker.py").write_text(WORKER)
    (folder / f"{name}.json").write_text(json.dumps(overrides))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(folder / "worker.py"), str(folder / f"{name}.json"), str(folder / f"{name}.starts.json")]
    done = subprocess.run(command, env=tree_environment(src), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the run of {src} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    starts = json.loads((folder / f"{name}.starts.json").read_text())
    timed = starts[args.warmup :]
    return statistics.median(later - earlier for earlier, later in zip(timed[:-1], timed[1:], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", type=Path, help="a source tree (repeatable; default: src)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="updates per run")
    parser.add_argument("--warmup", type=int, default=20, help="first updates not timed")
    parser.add_argument("--out", default=str(RESULTS), help="folder for ddp.json")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps - 1:
        parser.error(f"--warmup must be in [0, --steps - 1) = [0, {args.steps - 1}), got {args.warmup}")
    trees = args.src or [Path("src")]
    origin = provenance("ddp", argv)
    rounds: dict[str, list[float]] = {str(tree): [] for tree in trees}
    with tempfile.TemporaryDirectory(prefix="srupp-ddp-") as temporary:
        folder = Path(temporary)
        corpus = write_corpus(folder)
        for round_index in range(args.rounds):
            for index, tree in enumerate(trees):
                seconds = seconds_per_update(tree, folder, f"r{round_index}t{index}", corpus, args)
                rounds[str(tree)].append(seconds)
                print(f"round {round_index + 1}: {tree}: {seconds * 1e3:.3f} ms per update", flush=True)
    summary = compare_rounds(rounds, lower_is_better=True, label="update", unit="ms", scale=1e3)
    payload = {"steps": args.steps, "warmup": args.warmup, "median_s": summary["median"], "best_s": summary["best"]}
    payload["rounds_s"] = rounds
    write_json(Path(args.out) / "ddp.json", payload, "ddp", argv, origin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
