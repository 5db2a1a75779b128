"""Shared benchmark plumbing: timing, the provenance every result file records, and atomic JSON output.

Every script writes ``{"provenance": provenance(script, argv), ...}``: the git revision, the command
line, the CPU model and the srupp CPU kernel's instruction-set path, torch and Python versions. It imports
nothing that the GPU machine's stack lacks (no C extension, no ``sru``): what is missing is recorded as such.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def time_it(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    min_seconds: float = 0.0,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> float:
    """``statistic`` (default the median; ``min`` on a shared machine) of the wall-clock seconds of
    ``fn()`` over at least ``repeats`` runs and ``min_seconds``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistic(times)


def git_revision() -> str | None:
    """``HEAD``'s hash, with ``-dirty`` when tracked files differ from it; None outside a git checkout."""
    try:
        run = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 10, "check": True}
        revision = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_kernel() -> dict[str, object]:
    """``srupp.ops.cpu_kernel_info()``, or why it could not be asked."""
    try:
        from srupp.ops import cpu_kernel_info

        return cpu_kernel_info()
    except Exception as err:  # noqa: BLE001 - provenance must not stop a benchmark; the reason is the record
        return {"loaded": False, "isa": None, "reason": f"{type(err).__name__}: {err}"}


def provenance(script: str, argv: list[str] | None = None) -> dict[str, object]:
    """Where a result came from. ``script`` is the module name (``ops``); ``argv`` what ``main`` was given
    (None: the process's own arguments)."""
    arguments = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return {
        "git_revision": git_revision(),
        "command": shlex.join(["python", "-m", f"benchmarks.{script}", *arguments]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_kernel": cpu_kernel(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def tree_environment(src: Path) -> dict[str, str]:
    """The environment of a process that imports srupp from the source tree ``src`` (and nothing from this
    checkout), with one OpenMP thread: what a benchmark comparing trees in processes of their own runs."""
    return {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}


def compare_rounds(
    rounds: dict[str, list[float]], *, lower_is_better: bool, label: str, unit: str, scale: float = 1.0
) -> dict[str, dict[str, float]]:
    """Per tree (in ``rounds``' order, the first the reference) the median and the best of its rounds' figures,
    printed as ``label`` in ``unit`` (the figures times ``scale``) with their ratios to the first tree's. Returns
    ``{"median": {tree: figure}, "best": {tree: figure}}`` in the figures' own unit."""
    best_of = min if lower_is_better else max
    summary = {
        "median": {tree: statistics.median(values) for tree, values in rounds.items()},
        "best": {tree: best_of(values) for tree, values in rounds.items()},
    }
    first = next(iter(rounds))
    for tree in rounds:
        median, best = summary["median"][tree], summary["best"][tree]
        print(
            f"{label}: {tree}: median round {median * scale:,.3f} {unit} ({median / summary['median'][first]:.3f}x "
            f"the first tree), best round {best * scale:,.3f} {unit} ({best / summary['best'][first]:.3f}x)"
        )
    return summary


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(
    path: Path, payload: dict[str, object], script: str, argv: list[str] | None, origin: dict | None = None
) -> Path:
    """``payload`` with the provenance first, as indented JSON at ``path``. A long run passes ``origin``, the
    provenance taken when it started: the checkout may move on while it runs."""
    origin = provenance(script, argv) if origin is None else origin
    write_atomic(path, json.dumps({"provenance": origin, **payload}, indent=2, default=str) + "\n")
    return path


def authors_u(u: torch.Tensor) -> torch.Tensor:
    """Our ``u`` [T, B, 3D] (the c, f and r streams one after another) in the layout of the authors' op:
    [T, B, 3D] with the three interleaved per feature. Their op takes its number of streams from the last size
    (3D // D), so a [T, B, D, 3] view of the same numbers reads as none, and their kernel computes something
    else (quickly): this is the one place that layout is made."""
    steps, batch, width = u.shape
    return u.view(steps, batch, 3, width // 3).transpose(2, 3).reshape(steps, batch, width)


def require_agreement(theirs: torch.Tensor, ours: torch.Tensor, what: str, tolerance: float) -> float:
    """The largest |theirs - ours|, after checking it is within ``tolerance``: timing two ops against each other
    means nothing unless they compute the same thing."""
    difference = (theirs.float() - ours.float()).abs().max().item()
    if not difference <= tolerance:  # NaN fails too
        raise RuntimeError(
            f"{what}: the authors' op and ours differ by up to {difference:.3g} (allowed "
            f"{tolerance:g}); the comparison would time different computations"
        )
    return difference
