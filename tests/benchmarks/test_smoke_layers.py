import pytest

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


def test_layers_benchmark_times_each_model_alone(tmp_path):
    from benchmarks.baselines import count_parameters
    from benchmarks.layers import QUICK, build_models

    out = tmp_path / "layers_alone.json"
    run_benchmark("layers", "--quick", "--alone", "--rounds", "1", "--no-official", "--out", out)
    report = read_json(out)
    assert report["alone"] is True
    results = report["sizes"][0]["results"]
    assert set(results) == {"srupp", "gemm_floor", "lstm", "transformer"}
    assert all(r["train_tokens_per_s"] > 0 and r["inference_tokens_per_s"] > 0 for r in results.values())
    models = build_models(QUICK[0], None)  # the children built these same models, one each
    assert {name: r["params"] for name, r in results.items()} == {n: count_parameters(m) for n, m in models.items()}
    assert report["sizes"][0]["ratios"]["inference_srupp_over_lstm"] == pytest.approx(
        results["srupp"]["inference_tokens_per_s"] / results["lstm"]["inference_tokens_per_s"]
    )


def test_layers_benchmark_times_both_precisions(tmp_path):
    out = tmp_path / "layers_both.json"
    run_benchmark("layers", "--quick", "--precision", "both", "--no-official", "--out", out)
    report = read_json(out)
    assert report["precision"] == "both" and isinstance(report["cpu_flags"], list)
    size = report["sizes"][0]
    for name, r in size["results"].items():
        assert r["train_tokens_per_s_bf16"] > 0 and r["inference_tokens_per_s_bf16"] > 0
        assert size["ratios"][f"train_bf16_over_fp32_{name}"] == pytest.approx(
            r["train_tokens_per_s_bf16"] / r["train_tokens_per_s"]
        )
