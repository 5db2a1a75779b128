import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "layers.py"


def test_layers_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "layers.json"
    # One thread: tiny matmuls with several OpenMP threads crawl on a busy shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    results = report["sizes"][0]["results"]
    assert {"srupp", "lstm", "transformer"} <= results.keys()
    assert all(r["train_tokens_per_s"] > 0 and r["inference_tokens_per_s"] > 0 for r in results.values())
    assert "train_srupp_over_lstm" in report["sizes"][0]["ratios"]
