import statistics

import pytest
from benchmarks.ddp import block_median

from tests.benchmarks import ROOT, assert_provenance, read_json, run_benchmark


def test_block_median_keeps_a_cost_paid_once_per_block():
    # Updates of 10 ms, every 4th interval 30 ms more (a collective every 4 updates), then one 1 s stall.
    gaps = [0.010 + (0.030 if i % 4 == 3 else 0.0) for i in range(40)] + [1.0] + [0.010] * 3
    starts = [sum(gaps[:i]) for i in range(len(gaps) + 1)]
    assert statistics.median(gaps) == pytest.approx(0.010)  # the single-interval median drops the collective
    assert block_median(starts, 4) == pytest.approx(0.010 + 0.030 / 4)  # every block holds one, the stall one block
    assert block_median(starts[:6], 4) == pytest.approx(0.0175)  # one whole block; the last, shorter one dropped


@pytest.mark.slow
def test_ddp_benchmark_quick_run_writes_json(tmp_path):
    args = ("--src", ROOT / "src", "--rounds", "1", "--steps", "12", "--warmup", "1", "--block", "10")
    run_benchmark("ddp", *args, "--out", tmp_path, timeout=300)
    report = read_json(tmp_path / "ddp.json")
    assert_provenance(report, "ddp", *args, "--out", str(tmp_path))
    [(tree, rounds)] = report["rounds_s"].items()
    assert tree == str(ROOT / "src") and len(rounds) == 1 and report["block"] == 10
    assert report["median_s"][tree] == report["best_s"][tree] == rounds[0] > 0
