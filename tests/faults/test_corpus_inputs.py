"""Issue 24, items 7 and 8: an atomic corpus swap, bounded BPE chunks, and bad tokenizer inputs as one line."""

import errno
import json
import time

import numpy as np
import pytest

from srupp.cli import main
from srupp.data import corpus as corpus_module
from srupp.data import open_corpus
from srupp.data import tokenizer as bpe

pytest.importorskip("tokenizers")


def _prepare(source, out, *extra):
    return main(["data", "prepare", "text", "--source", str(source), "--out", str(out), *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe:300"])
def test_a_crash_between_the_renames_of_a_re_prepare_leaves_the_old_corpus_whole(
    tmp_path, monkeypatch, capsys, tokenizer
):
    (tmp_path / "old.txt").write_text("old corpus line\n" * 300)
    (tmp_path / "new.txt").write_text("the new corpus, longer and different\n" * 600)
    out = tmp_path / "data"
    assert _prepare(tmp_path / "old.txt", out, "--tokenizer", tokenizer) == 0
    old = open_corpus(out)
    expected = {split: np.array(old.split(split)) for split in old.lengths}
    real = corpus_module.os.replace

    def crash_before_meta(src, dst):  # the process dies after the token files are renamed, before meta.json
        if str(dst).endswith("meta.json"):
            raise OSError(errno.EIO, "simulated crash")
        real(src, dst)

    monkeypatch.setattr(corpus_module.os, "replace", crash_before_meta)
    assert _prepare(tmp_path / "new.txt", out, "--tokenizer", tokenizer, "--overwrite") == 2
    monkeypatch.setattr(corpus_module.os, "replace", real)
    capsys.readouterr()
    reopened = open_corpus(out)
    assert reopened.vocab == old.vocab
    for split, tokens in expected.items():
        np.testing.assert_array_equal(np.array(reopened.split(split)), tokens)
    assert _prepare(tmp_path / "new.txt", out, "--tokenizer", tokenizer, "--overwrite") == 0  # and then completes
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".bin") == sorted(open_corpus(out).files.values())


def test_bpe_chunks_are_bounded_without_line_breaks_and_encode_exactly(monkeypatch):
    monkeypatch.setattr(bpe, "_CHUNK_CHARS", 1000)
    words = [f"w{i % 97}x" * (1 + i % 3) for i in range(20_000)]
    text = " ".join(words) + "  two  spaces " + "z" * 5000  # no line break at all; one 5000-character word
    chunks = list(bpe._chunks(text))
    assert "".join(chunks) == text and max(map(len, chunks)) <= 2000 and len(chunks) > 40
    tokenizer = bpe.train_bpe(text, 400)
    whole = bpe.load(tokenizer).encode(text[:-5000]).ids
    np.testing.assert_array_equal(bpe.encode(text[:-5000], tokenizer), whole)


def test_invalid_utf8_for_bpe_is_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"valid text\n" * 100 + b"\xff\xfe not utf-8\n" * 100)
    assert _prepare(tmp_path / "a.txt", tmp_path / "out", "--tokenizer", "bpe:300") == 2
    assert "not valid UTF-8" in _one_line(capsys)


@pytest.fixture(scope="module")
def trained():
    return json.loads(bpe.train_bpe("the cat sat on the mat\n" * 200, 300))


@pytest.mark.parametrize("change", ["id-huge", "id-negative", "id-string", "added-id-huge"])
def test_out_of_range_token_ids_in_a_tokenizer_are_one_line(trained, tmp_path, capsys, change):
    data = json.loads(json.dumps(trained))
    token = next(iter(data["model"]["vocab"]))
    value = {"id-huge": 2**31, "id-negative": -5, "id-string": "7", "added-id-huge": None}[change]
    if change == "added-id-huge":
        data["added_tokens"] = [
            {
                "id": 2**40,
                "content": "<x>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ]
    else:
        data["model"]["vocab"][token] = value
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    (tmp_path / "a.txt").write_text("the cat\n" * 100)
    assert _prepare(tmp_path / "a.txt", tmp_path / "out", "--tokenizer", str(path)) == 2
    assert "token ids must be integers" in _one_line(capsys)


def test_a_regex_bomb_pre_tokenizer_is_refused_at_once(trained, tmp_path, capsys):
    data = json.loads(json.dumps(trained))
    bomb = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [bomb, data["pre_tokenizer"]]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    (tmp_path / "a.txt").write_text("a" * 40 + "!\n")
    start = time.perf_counter()
    assert _prepare(tmp_path / "a.txt", tmp_path / "out", "--tokenizer", str(path)) == 2
    assert "regular expression" in _one_line(capsys) and time.perf_counter() - start < 10
