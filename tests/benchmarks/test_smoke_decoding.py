import shutil

import pytest
from benchmarks.decoding import over_float32, same_tokens, summarise

from srupp.ops import library
from tests.benchmarks import ROOT, assert_provenance, read_json, run_benchmark

PATHS = ("float32_compiled", "float32_torch_ops", "bfloat16_compiled", "bfloat16_torch_ops")


@pytest.mark.slow
@pytest.mark.skipif(not library.is_available(), reason=library.unavailable_reason())
def test_decoding_benchmark_quick_run_writes_json_and_records_what_a_tree_lacks(tmp_path):
    pytest.importorskip("transformers")
    # A second tree without srupp.hf stands for an old one: its beam search is recorded missing, the rest timed.
    shutil.copytree(ROOT / "src", tmp_path / "old", ignore=shutil.ignore_patterns("__pycache__", "hf"))
    args = ("--src", tmp_path / "old", "--src", ROOT / "src", "--quick")
    run_benchmark("decoding", *args, "--out", tmp_path, timeout=300)
    report = read_json(tmp_path / "decoding_quick.json")
    assert_provenance(report, "decoding", *args, "--out", str(tmp_path))
    old, new = str(tmp_path / "old"), str(ROOT / "src")
    assert report["missing"][new] == {} and report["new_tokens"] == 8
    assert list(report["missing"][old]) == ["beam"] and "srupp.hf" in report["missing"][old]["beam"]
    greedy = [f"greedy_{path}" for path in PATHS]
    for name in ["beam", *greedy]:
        for figure in (report["figures"][name], report["figures"][f"{name}_cpu"]):
            trees = [new] if name == "beam" else [old, new]
            assert list(figure["rounds"]) == trees, name
            assert all(
                figure["rounds"][tree][0] == figure["median"][tree] == figure["best"][tree] > 0 for tree in trees
            )
    # The session of either dtype runs the compiled step unless told not to.
    for tree in (old, new):
        assert report["compiled"][tree] == {name: name.endswith("compiled") for name in greedy}
    # The same code in both trees gives the same tokens.
    assert all(report["same_tokens"][name] for name in ["beam", *greedy])


def run(figures: dict[str, float], tokens: dict[str, list[int]] | None = None) -> dict:
    return {"figures": figures, "tokens": tokens or {}, "missing": {}, "compiled": {}}


def test_summarise_takes_median_and_best_per_tree_and_leaves_out_a_tree_without_the_figure(capsys):
    runs = {
        "old": [run({"beam": 100.0, "greedy": 10.0}), run({"beam": 300.0, "greedy": 30.0}), run({"beam": 200.0})],
        "new": [run({"beam": 250.0}), run({"beam": 150.0}), run({"beam": 400.0})],
    }
    summary = summarise(runs)
    assert summary["beam"]["median"] == {"old": 200.0, "new": 250.0}
    assert summary["beam"]["best"] == {"old": 300.0, "new": 400.0}  # tokens/s: the highest is the best
    assert summary["greedy"]["median"] == {"old": 20.0} and summary["greedy"]["rounds"] == {"old": [10.0, 30.0]}
    assert (
        "beam: new: median round 250.000 tokens/s (1.250x the first tree), best round 400.000"
        in capsys.readouterr().out
    )


def test_same_tokens_compares_every_process_and_bfloat16_with_float32():
    first = {"beam": [1, 2], "greedy_float32_compiled": [5, 6], "greedy_bfloat16_compiled": [5, 6]}
    first["greedy_bfloat16_torch_ops"] = [5, 7]
    other = {**first, "beam": [1, 3]}
    agree = same_tokens({"old": [run({}, first)], "new": [run({}, other)]})
    assert agree["beam"] is False and agree["greedy_float32_compiled"] is True
    assert agree["greedy_bfloat16_compiled_as_float32"] is True
    assert agree["greedy_bfloat16_torch_ops_as_float32"] is False


def test_over_float32_is_the_median_of_each_process_ratio():
    processes = [
        run({"greedy_float32_compiled": 100.0, "greedy_bfloat16_compiled": 110.0, "beam": 5.0}),
        run({"greedy_float32_compiled": 50.0, "greedy_bfloat16_compiled": 60.0}),
        run({"greedy_float32_compiled": 200.0, "greedy_bfloat16_compiled": 180.0}),
    ]
    processes[0]["figures"] |= {"greedy_float32_compiled_cpu": 10.0, "greedy_bfloat16_torch_ops_cpu": 2.0}
    assert over_float32({"tree": processes}) == {
        "tree": {"greedy_bfloat16_compiled": 1.1, "greedy_bfloat16_torch_ops_cpu": 0.2}
    }
