from tests.benchmarks import assert_provenance, read_json, run_benchmark


def test_ops_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "ops.json"
    run_benchmark("ops", "--quick", "--no-official", "--out", out)
    report = read_json(out)
    assert_provenance(report, "ops", "--quick", "--no-official", "--out", str(out))
    (row,) = report["rows"]
    assert (row["T"], row["B"], row["D"]) == (16, 2, 32)
    assert row["cpu_forward_s"] > 0 and row["forward_speedup"] > 0
    assert row["cpu_train_uncached_s"] > 0 and 0 < row["cpu_train_uncached_bw_fraction"] < 2
