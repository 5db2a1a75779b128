"""benchmarks/gpu.py on CPU (--dry-run): its stages, result files and error handling, without a GPU.

One subprocess run goes the way the GPU machine runs it (``python -m benchmarks.gpu`` with PYTHONPATH=src); the
other cases call ``main`` in this process on a few stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import gpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STAGES = list(gpu.STAGE_CAPS)


@pytest.fixture
def interpreter_env(monkeypatch):
    # main() sets TRITON_INTERPRET=1 for a dry run; monkeypatch puts the old value back afterwards.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))


def read(out: Path) -> dict:
    return json.loads((out / "gpu.json").read_text())


def rows(results: dict, stage: str) -> list[dict]:
    return results["stages"][stage].get("rows", [])


@pytest.mark.slow
def test_dry_run_as_on_the_gpu_machine(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    command = [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = read(tmp_path)
    assert list(results["summary"]) == STAGES and set(results["summary"].values()) == {"ok"}
    assert all(row["ok"] for row in rows(results, "spec"))
    assert {(row["variant"], row["dtype"], row["reverse"]) for row in rows(results, "spec")} == {
        (variant, dtype, reverse) for variant in gpu.kernel_variants() for dtype in gpu.DTYPES for reverse in (0, 1)
    }
    sweep = [row for row in rows(results, "raw") if "steps" not in row]
    assert {(row["variant"], row["dtype"]) for row in sweep} == {
        (variant, dtype) for variant in gpu.kernel_variants() for dtype in gpu.DTYPES
    }
    assert all(row["forward_backward_raw_ms"] > 0 for row in sweep)
    depths = [row for row in rows(results, "raw") if "steps" in row]
    assert [row["steps"] for row in depths] == list(gpu.PREFETCH_DEPTHS)
    assert all(row["forward_keep_states_ms"] > 0 for row in depths)
    assert {(row["T"], row["B"], row["D"]) for row in rows(results, "autograd")} == {(1, 1, 8), *gpu.DRY_SHAPES}
    sdpa = {row["case"]: row for row in rows(results, "sdpa")}
    assert sdpa["lower-right, 1 head"]["max_abs_diff_to_mask"] < 1e-5
    assert all(row["ops"] for row in sdpa.values())  # which kernel served each is recorded
    for stage in ("paper", "small"):
        timed = [row for row in rows(results, stage) if "tokens_per_s" in row]
        assert [row["model"] for row in timed] == ["srupp", "transformer"]
        assert all(row["skipped"] == "CUDA graphs need a GPU" for row in rows(results, stage) if "skipped" in row)
    assert "parts_ms" in rows(results, "paper")[0]["profile"]
    assert "reason" in results["stages"]["authors"]["result"]  # why the authors' kernel did not run here
    assert [row["model"] for row in rows(results, "race")] == ["srupp", "transformer"]
    tests = results["stages"]["tests"]["result"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"]  # the GPU tests collect and skip on CPU
    assert list(tests["runs"]) == ["priority", "rest"]
    assert all("skipped" in run["summary"] and "passed" not in run["summary"] for run in tests["runs"].values())
    assert "done in" in (tmp_path / "gpu.log").read_text()


def test_a_failing_stage_is_recorded_and_the_rest_still_runs(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--only", "spec,raw,autograd", "--fail", "raw", "--out", str(tmp_path)])
    assert code == 1
    results = read(tmp_path)
    assert results["stages"]["raw"]["status"] == "failed" and "on purpose" in results["stages"]["raw"]["error"]
    assert results["stages"]["spec"]["status"] == "ok" and rows(results, "spec")  # the stage before kept its rows
    assert results["stages"]["autograd"]["status"] == "ok" and rows(results, "autograd")  # the one after ran
    assert results["stages"]["paper"] == {"status": "skipped", "reason": "not in --only"}
    assert "FAILED" in (tmp_path / "gpu.log").read_text()


def test_failing_gpu_tests_fail_their_stage_with_a_summary(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--only", "tests", "--fail", "tests", "--out", str(tmp_path)])
    assert code == 1
    tests = read(tmp_path)["stages"]["tests"]
    assert tests["status"] == "failed" and "GPU tests failed" in tests["error"]
    assert (tmp_path / "gpu_tests.log").exists()


def test_the_results_file_is_rewritten_after_every_row(tmp_path, interpreter_env, monkeypatch):
    snapshots = []
    original = gpu.write_atomic

    def recording(path, text):
        original(path, text)
        snapshots.append(json.loads(Path(path).read_text()))

    monkeypatch.setattr(gpu, "write_atomic", recording)
    assert gpu.main(["--dry-run", "--only", "autograd", "--out", str(tmp_path)]) == 0
    counts = [len(snapshot["stages"].get("autograd", {}).get("rows", [])) for snapshot in snapshots]
    assert counts[-1] == 2 * (1 + len(gpu.DRY_SHAPES)) and set(range(1, counts[-1] + 1)) <= set(counts)


def test_the_time_limit_skips_what_does_not_fit(tmp_path, interpreter_env):
    code = gpu.main(["--dry-run", "--time-limit", "0", "--out", str(tmp_path)])
    assert code == 0
    results = read(tmp_path)
    assert {name: stage["status"] for name, stage in results["stages"].items()} == dict.fromkeys(STAGES, "skipped")
    assert "time limit" in results["stages"]["raw"]["reason"]


def test_arguments(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.parse_args([]).out == str(tmp_path)
    monkeypatch.delenv("OUT")
    assert gpu.parse_args([]).out == str(ROOT / "benchmarks" / "results")
    assert gpu.parse_args(["--only", "raw,paper"]).only == ["raw", "paper"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "raw,nope"])
    assert "unknown stages ['nope']" in capsys.readouterr().err


def test_the_gpu_tests_it_runs_include_the_triton_and_training_ones():
    files = gpu.gpu_test_files()
    assert "tests/ops/test_triton_kernel.py" in files and "tests/train/test_loop.py" in files


def test_the_priority_gpu_tests_exist_and_the_caps_leave_them_time():
    files = gpu.gpu_test_files()
    for node in gpu.PRIORITY_TESTS:
        path, _, name = node.partition("::")
        assert path in files and (not name or f"def {name}(" in (ROOT / path).read_text())
    assert sum(gpu.STAGE_CAPS.values()) <= 420 - 30


def test_the_spec_stage_runs_the_odd_shape_first_and_stops_at_its_cap(tmp_path):
    cases = gpu.spec_cases(dry=False)
    odd = [case for case in cases if case[0] == gpu.ODD_SPEC_SHAPE]
    assert cases[: len(odd)] == odd and len(odd) == 4 * len(gpu.kernel_variants())
    assert {(variant, dtype, reverse) for _, variant, dtype, reverse in odd} == {
        (variant, dtype, reverse) for variant in gpu.kernel_variants() for dtype in gpu.DTYPES for reverse in (0, 1)
    }
    run = gpu.Run(tmp_path, time.monotonic() + 100, torch.device("cpu"), dry=True)
    run.results["stages"]["spec"] = {}
    run.stage_deadline = time.monotonic()  # the stage's cap is spent: every row is skipped, none fails
    result = gpu.stage_spec(run)
    assert result["rows"] == 0 and len(result["skipped_for_time"]) == len(gpu.spec_cases(dry=True))
