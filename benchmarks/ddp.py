"""The time per update of a two-rank DDP run (gloo, on this machine's CPU) of the ``tiny`` preset, launched with
``torchrun`` as users launch it, for one or more source trees in alternating rounds (a change of load on a shared
machine hits every tree alike).

    PYTHONPATH=src python3 -m benchmarks.ddp                           # this checkout, ~1 min
    PYTHONPATH=src python3 -m benchmarks.ddp --src /tmp/old/src --src src  # before | after: ratios to the first

Logging and evaluation are kept out of the timed updates (``log_every`` = ``eval_every`` = ``--steps``), so what
differs between trees is the update and the trainer's per-update bookkeeping (stop checks, loss averaging); the loss
all-reduce that a log step pays is outside, which is the case of a run that logs rarely.
Rank 0 records when each update starts. A round's figure is the median, over blocks of ``--block`` consecutive
intervals between those starts after the first ``--warmup`` updates, of the block's mean interval. Why blocks: the
new loop's ranks agree on stopping once every ``stop_check_every`` updates, so only one interval in that many holds
the collective, and a median of single intervals would drop exactly that cost, which the old loop paid every update;
a block that is a multiple of every tree's ``stop_check_every`` holds its collectives in full. Why a median of
blocks, not one mean over all updates: another process taking the core for a while spoils a block or two, not the
figure. The best and the median round of each tree are reported. Writes ``ddp.json`` under ``--out``.
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
from srupp.train import TrainConfig

WORKER = """
import json, sys, time
from srupp.train import apply_overrides, load_preset, loop, train

starts = []
update = loop.one_update

def timed(run, state):
    starts.append(time.perf_counter())
    update(run, state)

loop.one_update = timed
cfg = apply_overrides(load_preset("tiny"), json.load(open(sys.argv[1])))
if train(cfg).is_main:
    period = getattr(cfg, "stop_check_every", 1)  # trees before it agreed on stopping at every update
    json.dump({"starts": starts, "stop_check_every": period}, open(sys.argv[2], "w"))
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
    """One two-rank run of ``--steps`` updates with ``src`` first on the path; rank 0's time per update (the median
    block's)."""
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
    report = json.loads((folder / f"{name}.starts.json").read_text())
    if args.block % report["stop_check_every"]:
        raise ValueError(f"--block must be a multiple of stop_check_every = {report['stop_check_every']} of {src}")
    return block_median(report["starts"][args.warmup :], args.block)


def block_median(starts: list[float], block: int) -> float:
    """The median over consecutive blocks of ``block`` intervals between ``starts`` of each block's mean interval
    (a last, shorter block is dropped)."""
    count = (len(starts) - 1) // block
    return statistics.median((starts[(i + 1) * block] - starts[i * block]) / block for i in range(count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", type=Path, help="a source tree (repeatable; default: src)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="updates per run")
    parser.add_argument("--warmup", type=int, default=20, help="first updates not timed")
    parser.add_argument(
        "--block", type=int, default=TrainConfig.stop_check_every, help="intervals per block (default: %(default)s)"
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for ddp.json")
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error(f"--block must be >= 1, got {args.block}")
    if not 0 <= args.warmup <= args.steps - 1 - args.block:
        limit = args.steps - 1 - args.block
        parser.error(
            f"--warmup must be in [0, --steps - 1 - --block] = [0, {limit}] (one block timed), got {args.warmup}"
        )
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
    payload = {
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "median_s": summary["median"],
        "best_s": summary["best"],
    }
    payload["rounds_s"] = rounds
    write_json(Path(args.out) / "ddp.json", payload, "ddp", argv, origin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
