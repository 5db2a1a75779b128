import math

import numpy as np
import pytest
import torch
from benchmarks.baselines import build
from benchmarks.quality import ATTENTION, BaselineLM, build_model, parse, sizes

from srupp.models import SRUppLM
from srupp.train import evaluate
from tests.benchmarks import assert_provenance, read_json, run_benchmark

MODELS = ["srupp", "srupp_one_attn", "sru", "lstm", "transformer"]


@pytest.mark.slow
def test_quality_benchmark_quick_run_writes_json_plot_and_table(tmp_path):
    run_benchmark("quality", "--quick", "--threads", "1", "--out-dir", tmp_path, timeout=240)
    report = read_json(tmp_path / "quality.json")
    assert_provenance(report, "quality", "--quick", "--threads", "1", "--out-dir", str(tmp_path))
    assert [(r["model"], r["seed"]) for r in report["runs"]] == [(m, s) for s in (0, 1) for m in MODELS]
    for run in report["runs"]:
        assert run["steps"] > 0 and run["history"] and run["tokens"] == run["history"][-1]["tokens"]
        assert 0 < run["final_valid_bpc"] < 10 and 0 < run["test_bpc"] < 10
        # the equal-token point is the same for every model, within one step of tokens; a run slower than its
        # sweep (timing on a busy machine) may stop short of it, and then says so
        if run["equal_tokens"] is None:
            assert run["tokens"] < report["equal_tokens"]
        else:
            assert report["equal_tokens"] <= run["equal_tokens"]["tokens"] < report["equal_tokens"] + 4 * 32
    assert list(report["sweep"]) == MODELS and all(len(runs) == 2 for runs in report["sweep"].values())
    for kind, row in report["summary"].items():
        values = [r["test_bpc"] for r in report["runs"] if r["model"] == kind]
        assert math.isclose(row["test_bpc"]["mean"], sum(values) / 2) and row["test_bpc"]["min"] == min(values)
    curve = report["long_context"]["models"]
    assert [r["length"] for r in curve["srupp"]] == [32, 64] and list(curve["transformer"][0]) == ["length", "test_bpc"]
    assert report["corpus"]["name"] == "stdlib" and len(report["corpus"]["sha256"]) == 64
    assert (tmp_path / "quality.png").stat().st_size > 0
    table = (tmp_path / "quality.md").read_text()
    assert "| LSTM |" in table and "Long context" in table


def test_sru_family_is_the_library_model_with_the_right_attention_layers():
    args = parse(["--quick"])
    widths = sizes(args)
    models = {kind: build_model(kind, widths[kind], args) for kind in MODELS}
    for kind in ATTENTION:
        assert isinstance(models[kind], SRUppLM)
    assert models["srupp"].config.attention_layer_indices == [0, 1]
    assert models["srupp_one_attn"].config.attention_layer_indices == [1]
    assert models["sru"].config.attention_layer_indices == []
    assert isinstance(models["lstm"], BaselineLM) and isinstance(models["transformer"], BaselineLM)


def manual_nll(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()


def test_lstm_scores_as_one_long_forward():
    torch.manual_seed(0)
    model = BaselineLM(build("lstm", 24, 2), "lstm", window=8)
    tokens = np.random.default_rng(0).integers(0, 256, 41).astype(np.int64)
    nats = evaluate(model, tokens, batch_size=1, unroll=8)
    sequence = torch.from_numpy(tokens)[:, None]
    with torch.no_grad():
        logits, _ = model.model(sequence[:-1])
    assert math.isclose(nats, manual_nll(logits, sequence[1:]) / 40, rel_tol=1e-5)


def test_transformer_scores_sliding_windows_of_its_training_context():
    # unroll = window / 2: each segment is scored after the previous half window, so every byte sees between half
    # a window and a whole one, never more than the Transformer was trained on.
    torch.manual_seed(0)
    window, half = 8, 4
    model = BaselineLM(build("transformer", 16, 2), "transformer", window=window)
    tokens = np.random.default_rng(1).integers(0, 256, 25).astype(np.int64)
    nats = evaluate(model, tokens, batch_size=1, unroll=half)
    sequence, total = torch.from_numpy(tokens)[:, None], 0.0
    with torch.no_grad():
        for start in range(0, 24, half):
            begin = max(0, start - half)
            logits, _ = model.model(sequence[begin : start + half])
            total += manual_nll(logits[start - begin :], sequence[start + 1 : start + half + 1])
    assert math.isclose(nats, total / 24, rel_tol=1e-5)
