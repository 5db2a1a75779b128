"""The benchmark scripts run as the README says: ``python -m benchmarks.<name>`` from the repository root."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<name> *args`` with ``PYTHONPATH=src``, one thread, asserting it succeeded."""
    # One thread: tiny matmuls with several OpenMP threads crawl on a busy shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    command = [sys.executable, "-m", f"benchmarks.{name}", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_provenance(report: dict, name: str, *args: str) -> None:
    """The result file says where it came from: revision, command, CPU and its kernel path, torch."""
    import torch

    provenance = report["provenance"]
    assert provenance["command"] == " ".join(["python", "-m", f"benchmarks.{name}", *map(str, args)])
    assert provenance["torch"] == torch.__version__ and provenance["cpu"]
    assert provenance["git_revision"] and len(provenance["git_revision"].split("-")[0]) == 40
    assert {"loaded", "isa"} <= provenance["cpu_kernel"].keys()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
