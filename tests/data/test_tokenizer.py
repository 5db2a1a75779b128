import json
import math
import random
import re

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from srupp.cli import main  # noqa: E402
from srupp.data import Vocab, open_corpus, prepare_text  # noqa: E402
from srupp.data import tokenizer as bpe  # noqa: E402
from srupp.data.corpus import write_corpus  # noqa: E402
from srupp.errors import CorpusError  # noqa: E402

WORDS = ["def", "return", "self", "value", "naïve", "größe", "日本語", "emoji😀", "(", ")", ":", "\t", "  "]


def _text(seed: int, size: int) -> str:
    rng = random.Random(seed)
    out = []
    while sum(map(len, out)) < size:
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) + "\n")
    return "".join(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe") / "src"
    root.mkdir()
    for i in range(40):
        (root / f"f{i:02d}.txt").write_text(_text(i, 400), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpora(folder):
    kwargs = {"valid_ratio": 0.2, "test_ratio": 0.2}
    as_bytes = prepare_text(folder, folder.parent / "bytes", **kwargs)
    as_bpe = prepare_text(folder, folder.parent / "bpe", tokenizer="bpe:300", **kwargs)
    return as_bytes, as_bpe


def test_bpe_corpus_files_and_vocab(corpora):
    as_bytes, as_bpe = corpora
    meta = json.loads((as_bpe.path / "meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["dtype"] == "int32" and meta["vocab_size"] == as_bpe.vocab.size
    assert (as_bpe.path / "tokenizer.json").is_file()
    assert 256 < as_bpe.vocab.size <= 300
    assert open_corpus(as_bpe.path).vocab == as_bpe.vocab
    assert Vocab.from_dict(json.loads(json.dumps(as_bpe.vocab.to_dict()))) == as_bpe.vocab
    for split in ("train", "valid", "test"):
        ids = as_bpe.split(split)
        assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < as_bpe.vocab.size
        # Subwords: fewer tokens than bytes.
        assert len(ids) < 0.8 * as_bytes.lengths[split]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_round_trip_is_exact(corpora, split):
    as_bytes, as_bpe = corpora
    text = bytes(as_bytes.split(split)).decode("utf-8")
    assert any(ord(ch) > 0xFFFF for ch in text)  # 4-byte characters are in the test
    assert as_bpe.vocab.decode(as_bpe.split(split).tolist()) == text
    assert as_bpe.vocab.encode(text) == as_bpe.split(split).tolist()


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_bytes_per_token_counts_the_scored_text(corpora, split):
    as_bytes, as_bpe = corpora
    ids = as_bpe.split(split)
    lengths = as_bpe.vocab.token_bytes()
    # Every id stands for a fixed run of bytes: they add up to the split's UTF-8 size.
    assert int(lengths[ids].sum()) == as_bytes.lengths[split]
    expected = (as_bytes.lengths[split] - int(lengths[ids[0]])) / (len(ids) - 1)
    assert as_bpe.bytes_per_token(split) == pytest.approx(expected)
    prefix = ids[1:51].tolist()
    assert as_bpe.bytes_per_token(split, 50) == pytest.approx(sum(int(lengths[i]) for i in prefix) / 50)
    assert as_bytes.bytes_per_token(split) == 1.0


def test_bytes_per_token_of_a_split_with_nothing_to_score_is_a_corpus_error(corpora, tmp_path):
    _, as_bpe = corpora
    splits = {"train": np.asarray(as_bpe.split("train")), "valid": np.asarray(as_bpe.split("valid")[:1])}
    corpus = write_corpus(tmp_path / "one", splits, as_bpe.vocab, "test")
    with pytest.raises(CorpusError, match="split 'valid' of corpus .* has no token to score"):
        corpus.bytes_per_token("valid")


def test_tokenizer_is_trained_on_the_training_split_only(tmp_path):
    # The held-out end of one file is made of a string that never occurs in the training part.
    train_part = _text(0, 4000).replace("Q", "")
    held_out = "QZQZ QZQZ\n" * 200
    (tmp_path / "a.txt").write_text(train_part + held_out, encoding="utf-8")
    corpus = prepare_text(tmp_path / "a.txt", tmp_path / "out", valid_ratio=0.2, test_ratio=0.2, tokenizer="bpe:400")
    assert "QZQZ" in corpus.vocab.decode(corpus.split("valid").tolist())
    merged = [token for token in json.loads(corpus.vocab.tokenizer)["model"]["vocab"] if len(token) > 1]
    assert merged and not any("Q" in token or "Z" in token for token in merged)
    # The same trainer on text that includes the held-out part does learn those merges.
    full = json.loads(bpe.train_bpe(train_part + held_out, 400))["model"]["vocab"]
    assert any("QZ" in token for token in full)
    # Held-out text still round-trips, spelled with single-byte tokens.
    assert corpus.vocab.decode(corpus.split("test").tolist()).strip("\n").startswith("QZQZ")


def test_single_file_split_inside_a_character(tmp_path):
    text = "日本" * 333 + "\n"  # 3-byte characters: byte-ratio boundaries fall inside them
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    corpus = prepare_text(tmp_path / "a.txt", tmp_path / "out", valid_ratio=0.1, test_ratio=0.1, tokenizer="bpe:270")
    parts = [corpus.vocab.decode(corpus.split(s).tolist()) for s in ("train", "valid", "test")]
    assert "".join(parts) == text + "\n" and all("\ufffd" not in p for p in parts)


def test_given_tokenizer_json_is_used_as_is(corpora, folder, tmp_path):
    _, as_bpe = corpora
    again = prepare_text(
        folder, tmp_path / "again", valid_ratio=0.2, test_ratio=0.2, tokenizer=str(as_bpe.path / "tokenizer.json")
    )
    assert again.vocab == as_bpe.vocab
    assert again.split("valid").tolist() == as_bpe.split("valid").tolist()


def test_bytes_stay_the_default(corpora):
    as_bytes, _ = corpora
    assert as_bytes.vocab == Vocab("byte") and as_bytes.dtype == "uint8"
    assert not (as_bytes.path / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        pytest.param("bpe:abc", "integer VOCAB", id="not-a-number"),
        pytest.param("bpe:100", "integer VOCAB", id="too-small"),
        pytest.param("missing/tokenizer.json", "existing tokenizer.json", id="missing-file"),
        pytest.param("words", "'bytes', 'bpe:VOCAB'", id="unknown"),
    ],
)
def test_bad_tokenizer_spec(spec, message, folder, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare_text(folder, tmp_path / "out", tokenizer=spec)


def test_non_byte_level_tokenizer_is_refused(folder, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    wordlevel = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    wordlevel.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="must be byte-level"):
        prepare_text(folder, tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"))


def test_vocab_needs_its_tokenizer():
    with pytest.raises(ValueError, match="`tokenizer`"):
        Vocab("bpe")
    with pytest.raises(ValueError, match="`kind`"):
        Vocab("subword")


def test_cli_bpe_prepare_train_eval_generate(folder, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    argv = ["data", "prepare", "text", "--source", str(folder), "--out", str(data), "--tokenizer", "bpe:320"]
    assert main([*argv, "--valid-ratio", "0.2", "--test-ratio", "0.2"]) == 0
    corpus = open_corpus(data)
    assert corpus.vocab.kind == "bpe"
    common = ["--data", str(data), "--out_dir", str(run), "--progress", "false", "--eval_every", "4"]
    assert main(["train", "--config", "tiny", *common, "--max_steps", "4", "--unroll_size", "16"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid_bpc" in r][-1]
    # The valid metric is bits per byte: the loss per token over the bytes per token of the scored text.
    bpt = corpus.bytes_per_token("valid")
    assert bpt > 1.5 and valid["valid_bpc"] == pytest.approx(valid["valid_loss"] / math.log(2) / bpt)

    ckpt = run / "checkpoints" / "last.safetensors"
    from srupp.train import load_model

    _, _, vocab, _ = load_model(ckpt)
    assert vocab == corpus.vocab  # the checkpoint carries the tokenizer
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--split", "test", "--context", "16", "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    got_bpc, nats = (float(x) for x in re.search(r"bpc ([\d.]+) \(loss ([\d.]+) nats", out).groups())
    scored = corpus.split("test")[1:201].tolist()
    n_bytes = len(corpus.vocab.decode(scored).encode("utf-8"))
    assert got_bpc == pytest.approx(nats * len(scored) / (math.log(2) * n_bytes), rel=2e-3)

    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "naïve ", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("naïve ") and "12 tokens" in captured.err


def test_bpe_vocabularies_reserve_pad_and_end_of_document(folder, tmp_path):
    from srupp.data.tokenizer import EOD, reserve_special_tokens, train_bpe

    trained = prepare_text(folder, tmp_path / "trained", tokenizer="bpe:300", valid_ratio=0.2, test_ratio=0.2)
    vocab = trained.vocab
    assert vocab.size <= 300 and vocab.pad_id is not None and vocab.eod_id is not None
    assert vocab.decode([vocab.eod_id]) == EOD and vocab.decode([vocab.pad_id]) == "<pad>"
    assert not {vocab.pad_id, vocab.eod_id} & set(trained.split("train").tolist())  # reserved: never in the data
    # A given tokenizer keeps its ids; the two reserved tokens come after them.
    plain = train_bpe("some text, some more text. " * 20, 270)
    (tmp_path / "given.json").write_text(plain)
    given = prepare_text(
        folder, tmp_path / "given", tokenizer=str(tmp_path / "given.json"), valid_ratio=0.2, test_ratio=0.2
    ).vocab
    size = len(json.loads(plain)["model"]["vocab"])
    assert (given.eod_id, given.pad_id, given.size) == (size, size + 1, size + 2)
    assert given.encode("some text") == Vocab("bpe", tokenizer=plain).encode("some text")
    assert reserve_special_tokens(given.tokenizer, (EOD, "<pad>")) == given.tokenizer  # nothing left to add
