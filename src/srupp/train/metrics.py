"""Metrics as JSON lines and a learning-curve PNG (matplotlib, Agg backend: the optional extra ``srupp[plot]``)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from srupp.errors import name_path
from srupp.files import replacing
from srupp.train.rundir import write_text_atomic


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the checkpoint's step are dropped (the kept
    ones are rewritten atomically)."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                # A line of another shape (edited by hand, cut by a crash) is dropped, not fatal.
                step = record.get("step") if isinstance(record, dict) else None
                if isinstance(step, int) and not isinstance(step, bool) and step <= resume_step:
                    self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk says so without naming the file
            raise name_path(err, self.path) from err


PLOT_HINT = "no learning_curve.png: matplotlib is not installed (pip install 'srupp[plot]')"


@functools.cache
def _say_once(message: str) -> None:
    print(f"srupp: {message}", file=sys.stderr)


def plot_curve(records: list[dict[str, Any]], path: str | os.PathLike, *, metric: str) -> bool:
    """Train loss and valid ``metric`` (``"bpc"`` or ``"ppl"``) against step, written atomically.

    Returns False, having said once per process how to get it, where matplotlib (the ``plot`` extra) is missing.
    """
    try:
        import matplotlib
    except ImportError:
        _say_once(PLOT_HINT)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r[f"train_{metric}"]) for r in records if f"train_{metric}" in r]
    valid = [(r["step"], r[f"valid_{metric}"]) for r in records if f"valid_{metric}" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), label=f"train {metric}", alpha=0.6, linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label=f"valid {metric}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if metric == "ppl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SRU++ learning curve")
    fig.tight_layout()
    path = Path(path)
    try:
        with replacing(path) as (fd, _), os.fdopen(fd, "wb") as f:  # an orphan of a killed run is found by pid
            fig.savefig(f, dpi=110, format="png")
    finally:
        plt.close(fig)
    return True
