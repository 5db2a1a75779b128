import zipfile

import numpy as np
import pytest

from srupp.data import Vocab, open_corpus, prepare_enwik8, prepare_stdlib, prepare_text, prepare_wikitext103


def test_text_file_ratio_split_memory_mapped(tmp_path):
    text = "".join(f"line {i}: some text\n" for i in range(500)).encode()
    (tmp_path / "a.txt").write_bytes(text)
    corpus = prepare_text(tmp_path / "a.txt", tmp_path / "out", valid_ratio=0.1, test_ratio=0.1)
    train, valid, test = (corpus.split(s) for s in ("train", "valid", "test"))
    assert isinstance(train, np.memmap) and train.dtype == np.uint8
    assert bytes(train) + bytes(valid) + bytes(test) == text.rstrip(b"\n") + b"\n\n"
    assert abs(len(valid) - len(text) * 0.1) < 2
    assert open_corpus(tmp_path / "out").lengths == corpus.lengths


def test_folder_split_is_deterministic_and_sorted(tmp_path):
    for i in range(30):
        (tmp_path / "src" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f"d{i % 3}" / f"f{i}.py").write_text(f"x = {i}\n")
    a = prepare_text(tmp_path / "src", tmp_path / "a", valid_ratio=0.2, test_ratio=0.2)
    b = prepare_text(tmp_path / "src", tmp_path / "b", valid_ratio=0.2, test_ratio=0.2)
    for split in ("train", "valid", "test"):
        assert bytes(a.split(split)) == bytes(b.split(split))
    assert sum(a.lengths.values()) == sum(len(f"x = {i}\n\n") for i in range(30))


def test_stdlib_source_exists():
    from srupp.data import stdlib_source

    assert (stdlib_source() / "os.py").is_file()
    assert callable(prepare_stdlib)


def test_enwik8_zip_90_5_5(tmp_path):
    data = bytes(range(256)) * 40
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)
    corpus = prepare_enwik8(tmp_path / "enwik8.zip", tmp_path / "out", check_size=False)
    n = len(data) // 20
    assert corpus.lengths == {"train": len(data) - 2 * n, "valid": n, "test": n}
    assert bytes(corpus.split("test")) == data[-n:]
    with pytest.raises(ValueError, match="100,000,000 bytes"):
        prepare_enwik8(tmp_path / "enwik8.zip", tmp_path / "out2")


def test_wikitext103_words_eos_frequency_sorted(tmp_path):
    root = tmp_path / "wikitext-103"
    root.mkdir()
    (root / "wiki.train.tokens").write_text(" = Title = \n\n the cat sat on the mat \n the the end \n")
    (root / "wiki.valid.tokens").write_text(" the cat \n")
    (root / "wiki.test.tokens").write_text(" the mat \n")
    corpus = prepare_wikitext103(tmp_path, tmp_path / "out")
    words = corpus.vocab.words
    assert words[0] == "the" and "<eos>" in words[:3]
    assert corpus.split("train").dtype == np.int32
    assert corpus.vocab.decode(list(corpus.split("valid"))) == "the cat\n"
    assert corpus.lengths["train"] == 4 + 7 + 4


def test_vocab_roundtrip():
    vocab = Vocab("byte")
    assert vocab.decode(vocab.encode("héllo")) == "héllo"
    assert Vocab("word", ("a", "<eos>", "<unk>")).encode("a b\n") == [0, 2]


@pytest.mark.parametrize(
    "content, error, match",
    [
        pytest.param(None, FileNotFoundError, "does not exist", id="missing"),
        pytest.param(b"", ValueError, "no non-empty text", id="empty"),
    ],
)
def test_clear_errors_for_missing_or_empty_data(tmp_path, content, error, match):
    source = tmp_path / "corpus.txt"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(error, match=match):
        prepare_text(source, tmp_path / "out")


def test_open_unprepared_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="srupp data prepare"):
        open_corpus(tmp_path / "nothing")


def test_word_vocabulary_reserves_pad_after_every_word(tmp_path):
    root = tmp_path / "wikitext-103"
    root.mkdir()
    for split, text in (("train", " a b a \n c a \n"), ("valid", " a \n"), ("test", " b \n")):
        (root / f"wiki.{split}.tokens").write_text(text)
    corpus = prepare_wikitext103(tmp_path, tmp_path / "out")
    words = corpus.vocab.words
    assert words[-1] == "<pad>" and words[:-1] == ("a", "<eos>", "b", "c")  # frequency order kept
    assert corpus.vocab.pad_id == len(words) - 1 and corpus.vocab.eod_id == 1
    assert corpus.vocab.pad_id not in set(corpus.split("train").tolist())


def test_a_split_that_would_be_empty_is_refused_at_prepare(tmp_path):
    # Two files, each whole in one split by a hash of its name: a.txt and c.txt both draw "train" at 5% / 5%.
    for name in ("a.txt", "c.txt"):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_text("some text\n" * 20)
    with pytest.raises(ValueError, match="the valid split of .* would be empty"):
        prepare_text(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Asking for no valid or test text is not an error.
    corpus = prepare_text(tmp_path / "src", tmp_path / "out", valid_ratio=0.0, test_ratio=0.0)
    assert corpus.lengths["valid"] == corpus.lengths["test"] == 0
