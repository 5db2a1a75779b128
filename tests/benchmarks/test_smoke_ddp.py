import pytest

from tests.benchmarks import ROOT, assert_provenance, read_json, run_benchmark


@pytest.mark.slow
def test_ddp_benchmark_quick_run_writes_json(tmp_path):
    args = ("--src", ROOT / "src", "--rounds", "1", "--steps", "4", "--warmup", "1")
    run_benchmark("ddp", *args, "--out", tmp_path, timeout=300)
    report = read_json(tmp_path / "ddp.json")
    assert_provenance(report, "ddp", *args, "--out", str(tmp_path))
    [(tree, rounds)] = report["rounds_s"].items()
    assert tree == str(ROOT / "src") and len(rounds) == 1
    assert report["median_s"][tree] == report["best_s"][tree] == rounds[0] > 0
