from tests.benchmarks import assert_provenance, read_json, run_benchmark


def test_speed_benchmark_quick_run_writes_json_and_table(tmp_path):
    run_benchmark("speed", "--quick", "--threads", "1", "--out-dir", tmp_path)
    report = read_json(tmp_path / "speed.json")
    assert_provenance(report, "speed", "--quick", "--threads", "1", "--out-dir", str(tmp_path))
    results = report["sizes"][0]["results"]
    assert {"srupp", "lstm", "transformer"} <= results.keys()
    assert all(r["train_tokens_per_s"] > 0 and r["inference_tokens_per_s"] > 0 for r in results.values())
    assert "train_tokens_per_s_srupp_over_transformer" in report["sizes"][0]["ratios"]
    assert [d["batch"] for d in report["decoding"]] == [1, 2]
    assert all(r["decode_ms_per_token"] > 0 for d in report["decoding"] for r in d["results"].values())
    steps = [(row["call"], row["width"]) for row in report["layer_step"]]
    assert steps == [("SRUpp.decoder", 8), ("SRUppLM.decoder", 8), ("SRUpp.decoder", 32), ("SRUppLM.decoder", 32)]
    assert all(row["us_per_call"] > 0 for row in report["layer_step"])
    assert all(row["srupp_over_transformer_cost"] > 0 for row in report["lengths"]["rows"])
    assert (tmp_path / "speed.md").read_text().startswith("# Speed")
