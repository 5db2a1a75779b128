import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


def test_quality_benchmark_quick_run_writes_json_plot_and_table(tmp_path):
    # One thread: tiny matmuls with several OpenMP threads crawl on a busy shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "quality.json").read_text())
    assert report["runs"].keys() == {"srupp", "srupp_one_attn", "sru", "lstm", "transformer"}
    for run in report["runs"].values():
        assert run["steps"] > 0 and run["history"]
        assert 0 < run["best_valid_bpc"] < 10 and 0 < run["test_bpc"] < 10
    assert report["sweep"].keys() == {"transformer", "srupp"}
    # the default corpus exists wherever Python does, and the report says exactly what was read
    assert report["corpus"]["path"].startswith("stdlib: ") and len(report["corpus"]["sha256"]) == 64
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert "| LSTM |" in (tmp_path / "quality.md").read_text()
