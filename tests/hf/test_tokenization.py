import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import transformers  # noqa: E402

from srupp.data import Vocab  # noqa: E402
from srupp.data.tokenizer import train_bpe  # noqa: E402
from srupp.hf import byte_tokenizer, tokenizer_for_vocab, word_tokenizer  # noqa: E402

TEXTS = ["hello, world", "  leading spaces\tand tabs\n\nnewlines", "naïve café – 東京 🚀", "\x00\x01\x7f control", ""]


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "whitespace", "unicode", "control", "empty"])
def test_byte_tokenizer_ids_are_the_utf8_bytes(text):
    tokenizer = byte_tokenizer()
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode("utf-8")) == Vocab("byte").encode(text)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 256


def test_byte_tokenizer_pads_on_the_left_with_byte_zero():
    batch = byte_tokenizer()(["abc", "a"], padding=True)
    assert batch.input_ids == [[97, 98, 99], [0, 0, 97]]
    assert batch.attention_mask == [[1, 1, 1], [0, 0, 1]]


def test_byte_tokenizer_decodes_invalid_utf8_as_replacement():
    assert byte_tokenizer().decode([104, 0xFF, 105]) == "h\ufffdi"


def test_word_tokenizer_matches_the_word_vocab():
    vocab = Vocab("word", ("<eos>", "<unk>", "the", "cat", "sat"))
    tokenizer = tokenizer_for_vocab(vocab)
    text = "the cat sat\nthe dog"
    assert tokenizer(text).input_ids == vocab.encode(text) == [2, 3, 4, 2, 1]
    assert tokenizer.decode([2, 3, 4]) == "the cat sat"
    with pytest.raises(ValueError, match="repeat"):
        word_tokenizer(["a", "a"])


def test_bpe_vocab_gives_its_own_tokenizer():
    text = "def main():\n    return 'héllo'  # café\n" * 20
    vocab = Vocab("bpe", tokenizer=train_bpe(text, 300))
    tokenizer = tokenizer_for_vocab(vocab)
    sample = "def café():\n    return 'main'\n"
    ids = tokenizer(sample).input_ids
    assert ids == vocab.encode(sample) and len(ids) < len(sample.encode())
    assert tokenizer.decode(ids) == sample == vocab.decode(ids)
    with pytest.raises(ValueError, match="kind 'byte', 'word' or 'bpe'"):
        tokenizer_for_vocab(object())


def test_auto_tokenizer_loads_the_saved_byte_tokenizer(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("héllo").input_ids == list("héllo".encode())
    assert loaded.pad_token_id == 0 and loaded.padding_side == "left"


def test_reserved_pad_and_end_tokens_become_the_tokenizers():
    words = Vocab("word", ("the", "<eos>", "cat", "<unk>", "<pad>"))
    tokenizer = tokenizer_for_vocab(words)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (words.pad_id, words.eod_id) == (4, 1)
    batch = tokenizer(["the cat the", "cat"], padding=True)
    assert batch["input_ids"][1] == [4, 4, 2] and batch["attention_mask"][1] == [0, 0, 1]
    reserved = ("<|endoftext|>", "<pad>")
    bpe = Vocab("bpe", tokenizer=train_bpe("héllo wörld, hello world. " * 30, 280, special_tokens=reserved))
    tokenizer = tokenizer_for_vocab(bpe)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (bpe.pad_id, bpe.eod_id) == (1, 0)
    # A vocabulary prepared before the reserved tokens keeps working, without padding.
    assert tokenizer_for_vocab(Vocab("word", ("the", "cat"))).pad_token is None
