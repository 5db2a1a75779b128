import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from benchmarks.recall import FILLER, IGNORE, build_models, make_batch, parse, token_ranges

ROOT = Path(__file__).resolve().parents[2]


def lookup_answers(inputs: torch.Tensor, targets: torch.Tensor, pairs: int) -> tuple[list[int], list[int]]:
    """A hand-written solver: a dict from the pairs at the start, read at every query position."""
    predicted, expected = [], []
    for row, labels in zip(inputs.tolist(), targets.tolist(), strict=True):
        table = {row[2 * i]: row[2 * i + 1] for i in range(pairs)}
        for position, label in enumerate(labels):
            if label != IGNORE:
                predicted.append(table[row[position]])
                expected.append(label)
    return predicted, expected


@pytest.mark.parametrize(
    ("seq_len", "pairs", "vocab"), [(16, 4, 256), (64, 16, 256), (256, 64, 256), (40, 3, 9), (129, 32, 101)],
    ids=["tight", "seq64", "seq256_full", "tiny_vocab", "odd_lengths"],
)  # fmt: skip
def test_a_lookup_table_from_the_pairs_answers_every_query(seq_len, pairs, vocab):
    generator = torch.Generator().manual_seed(seq_len + pairs)
    inputs, targets = make_batch(generator, 32, seq_len, pairs, vocab)
    assert inputs.shape == targets.shape == (32, seq_len)
    key_tokens, value_tokens = token_ranges(vocab)
    assert set(key_tokens).isdisjoint(value_tokens) and FILLER not in key_tokens and FILLER not in value_tokens
    for row, labels in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row[0 : 2 * pairs : 2], row[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(k in key_tokens for k in keys)
        assert all(v in value_tokens for v in values)
        queried = [row[t] for t, label in enumerate(labels) if label != IGNORE]
        assert sorted(queried) == sorted(keys), "every key is queried exactly once"
        positions = [t for t, label in enumerate(labels) if label != IGNORE]
        assert min(positions) >= 2 * pairs, "queries come after the pairs"
        for t in positions:
            assert row[t + 1] == labels[t], "the queried key is followed by its value"
        query_tokens = {t for t in positions} | {t + 1 for t in positions}
        rest = [row[t] for t in range(2 * pairs, seq_len) if t not in query_tokens]
        assert all(token == FILLER for token in rest)
    predicted, expected = lookup_answers(inputs, targets, pairs)
    assert len(expected) == 32 * pairs
    assert predicted == expected


def test_the_answers_cannot_be_known_without_the_pairs():
    # The best guess without a sequence's pairs is the value most often seen with the key elsewhere; if the
    # generator leaked a fixed key -> value map (or a position -> value one) this would score far above chance.
    vocab, seq_len, pairs = 64, 64, 8
    chance = 1 / len(token_ranges(vocab)[1])
    train_in, train_out = make_batch(torch.Generator().manual_seed(0), 4000, seq_len, pairs, vocab)
    by_key, by_position = defaultdict(Counter), defaultdict(Counter)
    query = train_out != IGNORE
    positions = query.nonzero()[:, 1].tolist()
    for key, position, value in zip(train_in[query].tolist(), positions, train_out[query].tolist(), strict=True):
        by_key[key][value] += 1
        by_position[position][value] += 1
    test_in, test_out = make_batch(torch.Generator().manual_seed(1), 1000, seq_len, pairs, vocab)
    query = test_out != IGNORE
    answers = test_out[query].tolist()
    from_key = [by_key[k].most_common(1)[0][0] for k in test_in[query].tolist()]
    from_position = [by_position[p].most_common(1)[0][0] for p in query.nonzero()[:, 1].tolist()]
    for guesses in (from_key, from_position):
        hit_rate = sum(g == a for g, a in zip(guesses, answers, strict=True)) / len(answers)
        assert hit_rate < 2 * chance, f"{hit_rate:.3f} against chance {chance:.3f}"
    # The same queries against another sequence's pairs: agreement at chance level.
    other_in, _ = make_batch(torch.Generator().manual_seed(2), 1000, seq_len, pairs, vocab)
    swapped = torch.cat([other_in[:, : 2 * pairs], test_in[:, 2 * pairs :]], dim=1)
    agree, total = 0, 0
    for row, swapped_row, labels in zip(test_in.tolist(), swapped.tolist(), test_out.tolist(), strict=True):
        table = {swapped_row[2 * i]: swapped_row[2 * i + 1] for i in range(pairs)}
        for t, label in enumerate(labels):
            if label != IGNORE and row[t] in table:
                agree += table[row[t]] == label
                total += 1
    assert total > 0 and agree / total < 2 * chance


def test_the_generator_is_deterministic_in_its_seed():
    first = make_batch(torch.Generator().manual_seed(5), 4, 32, 4, 256)
    again = make_batch(torch.Generator().manual_seed(5), 4, 32, 4, 256)
    other = make_batch(torch.Generator().manual_seed(6), 4, 32, 4, 256)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    ("seq_len", "pairs", "vocab", "message"),
    [(15, 4, 256, "`seq_len` must be >= 4 * pairs = 16"), (64, 0, 256, "`pairs` must be in [1, 127]"),
     (256, 5, 9, "`pairs` must be in [1, 4]"), (64, 4, 300, "`vocab` must be in [5, 256]")],
    ids=["too_short", "no_pairs", "too_many_pairs", "vocab_too_big"],
)  # fmt: skip
def test_impossible_tasks_are_refused(seq_len, pairs, vocab, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        make_batch(torch.Generator(), 2, seq_len, pairs, vocab)


def test_default_models_have_equal_parameter_counts_within_ten_percent():
    args = parse(["--device", "cpu"])
    params = {kind: count for kind, (_, count) in build_models(args).items()}
    assert set(params) == {"srupp", "srupp_one_attn", "sru", "lstm", "transformer"}
    target = params["srupp"]
    assert all(abs(count - target) / target < 0.10 for count in params.values()), params


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    # One thread: tiny matmuls with several OpenMP threads crawl on a busy shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    options = ["--quick", "--threads", "1", "--device", "cpu"]
    command = [sys.executable, "-m", "benchmarks.recall", *options, "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "recall.json").read_text())
    models = ["srupp", "srupp_one_attn", "sru", "lstm", "transformer"]
    assert list(report["models"]) == models
    assert report["provenance"]["command"].endswith("--out-dir " + str(tmp_path))
    assert report["provenance"]["git_revision"] and report["provenance"]["cpu_kernel"]["threads"] >= 1
    assert report["provenance"]["torch"] == torch.__version__ and report["device_name"]
    pairs = [str(p) for p in report["config"]["pairs"]]
    assert list(report["results"]) == models, [run["status"] for run in report["runs"]]
    for result_ in report["results"].values():
        assert result_["steps"] > 0 and list(result_["test_accuracy"]) == pairs
        assert all(0.0 <= accuracy <= 1.0 for accuracy in result_["test_accuracy"].values())
    done = [run for run in report["runs"] if run["status"] == "done"]
    assert {run["model"] for run in done} == set(models)
    assert all(list(run["valid_accuracy"]) == pairs and run["history"] for run in done)
    assert report["wall_seconds"] < 60, "the budget of --quick is 5 s: the script must stop near it"
    table = (tmp_path / "recall.md").read_text()
    assert "| SRU++ (attention in the last layer only) |" in table and "| LSTM |" in table
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_budget_too_small_for_any_run_skips_them_and_still_writes_the_outputs(tmp_path):
    from benchmarks.recall import main

    task = ["--budget-s", "4", "--seq-len", "16", "--pairs", "2", "4", "--width", "16", "--batch", "4"]
    code = main([*task, "--eval-sequences", "4", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "recall.json").read_text())
    assert [run["status"] for run in report["runs"]] == ["skipped"] * 15 and report["results"] == {}
    assert "| LSTM | 0.001 | skipped |" in (tmp_path / "recall.md").read_text()
    assert (tmp_path / "recall.png").stat().st_size > 0
