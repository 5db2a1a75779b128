"""benchmarks/gpu.py on CPU (--dry-run): its paths, result files and error handling, without a GPU.

One subprocess run goes the way the GPU machine runs it (``python -m benchmarks.gpu`` with PYTHONPATH=src,
the GPU tests in a pytest subprocess first); the failure cases call ``main`` in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import gpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def interpreter_env(monkeypatch):
    # main() sets TRITON_INTERPRET=1 for a dry run; monkeypatch puts the old value back afterwards.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))


def read(out: Path) -> dict:
    return json.loads((out / "gpu.json").read_text())


@pytest.mark.slow
def test_dry_run_as_on_the_gpu_machine(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    command = [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = read(tmp_path)
    assert results["summary"] == {
        "tests": "ok", "copy": "ok", "check": "ok", "kernels": "ok", "official": "skipped", "training": "ok",
        "tuning": "ok",
    }  # fmt: skip
    tests = results["sections"]["tests"]["result"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"]  # the GPU tests collect and skip on CPU
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()
    assert all(row["ok"] for row in results["sections"]["check"]["result"])
    rows = results["rows"]
    assert {(row["dtype"], row["stages"]) for row in rows} == {(d, s) for d in gpu.DTYPES for s in gpu.DRY_STAGES}
    for row in rows:
        for name in ("forward_inference", "forward_keep_states", "backward", "forward_backward_raw",
                     "forward_backward_autograd"):  # fmt: skip
            assert row[f"{name}_ms"] > 0 and math.isfinite(row[f"{name}_bw_fraction"])
    assert [row["model"] for row in results["training"]] == ["srupp", "transformer"]
    assert results["srupp_over_transformer_tokens_per_s"] > 0
    assert {(row["dtype"], row["block_d"]) for row in results["tuning_rows"]} == {
        ("fp32", 32), ("fp32", 64), ("fp32", 128), ("bf16", 64), ("bf16", 128), ("bf16", 256)
    }  # fmt: skip
    assert "done in" in (tmp_path / "gpu.log").read_text()


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--skip-tests", "--fail", "kernels", "--out", str(tmp_path)])
    assert code == 1
    results = read(tmp_path)
    kernels = results["sections"]["kernels"]
    assert kernels["status"] == "failed" and "on purpose" in kernels["error"]
    assert results["sections"]["check"]["status"] == "ok"  # the section before it kept its result
    assert results["sections"]["training"]["status"] == "ok"  # and the one after it ran
    assert "FAILED" in (tmp_path / "gpu.log").read_text()


def test_failing_gpu_tests_stop_the_script_with_their_summary(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--fail", "tests", "--out", str(tmp_path)])
    assert code == 2
    results = read(tmp_path)
    assert results["stopped"].startswith("GPU tests failed")
    assert results["sections"]["tests"]["result"]["returncode"] not in (0, None)
    assert "kernels" not in results["sections"]
    assert (tmp_path / "gpu_tests.log").exists()


def test_keep_going_runs_the_benchmarks_after_failing_tests(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--fail", "tests", "--keep-going", "--no-training", "--out", str(tmp_path)])
    assert code == 1
    results = read(tmp_path)
    assert results["sections"]["tests"]["status"] == "failed"
    assert results["sections"]["kernels"]["status"] == "ok" and results["rows"]


def test_the_time_limit_skips_what_does_not_fit(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--skip-tests", "--time-limit", "0", "--out", str(tmp_path)])
    assert code == 0
    results = read(tmp_path)
    assert results["rows"] == []
    assert {name: section["status"] for name, section in results["sections"].items()} == dict.fromkeys(
        ("tests", "copy", "check", "kernels", "official", "training", "tuning"), "skipped"
    )
    assert "time limit" in results["sections"]["kernels"]["reason"]


def test_results_go_to_out_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.parse_args([]).out == str(tmp_path)
    monkeypatch.delenv("OUT")
    assert gpu.parse_args([]).out == str(ROOT / "benchmarks" / "results")
    assert gpu.parse_args([]).official is False


def test_the_gpu_tests_it_runs_include_the_triton_ones():
    assert "tests/ops/test_triton_kernel.py" in gpu.gpu_test_files()
