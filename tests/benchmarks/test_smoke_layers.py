from tests.benchmarks import assert_provenance, read_json, run_benchmark


def test_layers_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "layers.json"
    run_benchmark("layers", "--quick", "--out", out)
    report = read_json(out)
    assert_provenance(report, "layers", "--quick", "--out", str(out))
    results = report["sizes"][0]["results"]
    assert {"srupp", "lstm", "transformer"} <= results.keys()
    assert all(r["train_tokens_per_s"] > 0 and r["inference_tokens_per_s"] > 0 for r in results.values())
    assert "train_srupp_over_lstm" in report["sizes"][0]["ratios"]
