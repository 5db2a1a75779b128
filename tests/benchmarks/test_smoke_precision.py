import pytest

from tests.benchmarks import assert_provenance, read_json, run_benchmark


def test_precision_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "precision.json"
    run_benchmark("precision", "--quick", "--repeats", "1", "--out", out)
    report = read_json(out)
    assert_provenance(report, "precision", "--quick", "--repeats", "1", "--out", str(out))
    assert report["bf16_speedup"] == pytest.approx(report["step_seconds"]["fp32"] / report["step_seconds"]["bf16"])
    assert 0 <= report["self_cpu_shares"]["bf16"]["aten::copy_"] < 1
