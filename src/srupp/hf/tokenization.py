"""Tokenizers that ``AutoTokenizer`` loads for srupp's vocabularies: bytes (id = byte value), words, or a BPE
corpus's ``tokenizer.json``, all as ``PreTrainedTokenizerFast``."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from srupp.data.corpus import EOS, PAD, UNK
from srupp.data.tokenizer import EOD


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 used by the ``ByteLevel`` pre-tokenizer (GPT-2's scheme):
    printable Latin-1 bytes stand for themselves, the others take code points 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols, extra = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(extra))
            extra += 1
    return symbols


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """srupp's byte vocabulary: a text's ids are its UTF-8 bytes, and decoding turns ids back into those bytes
    (invalid UTF-8 becomes U+FFFD). Byte 0 (NUL) doubles as the padding token; padding goes on the left, as
    batched generation needs.

    Example:
        >>> byte_tokenizer()("hé").input_ids
        [104, 195, 169]
    """
    symbols = _byte_symbols()
    tokenizer = Tokenizer(models.BPE(vocab={symbol: byte for byte, symbol in enumerate(symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=symbols[0], padding_side="left")


def _specials(tokenizer: Tokenizer) -> dict[str, str]:
    """The special tokens of srupp's vocabularies that ``tokenizer`` has, as ``PreTrainedTokenizerFast`` kwargs."""
    names = {"unk_token": UNK, "pad_token": PAD, "eos_token": EOS}
    if tokenizer.token_to_id(EOD) is not None:
        names["eos_token"] = EOD
    return {name: token for name, token in names.items() if tokenizer.token_to_id(token) is not None}


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """srupp's word vocabulary: whitespace-separated words, id = index in ``words`` (unknown words map to
    ``<unk>`` when the vocabulary has it); decoding joins words with spaces. ``<pad>`` and ``<eos>`` are the
    padding and end tokens where the vocabulary has them (``srupp data prepare`` reserves ``<pad>``)."""
    vocab = {word: index for index, word in enumerate(words)}
    if len(vocab) != len(words):
        raise ValueError("`words` must not repeat a word")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **_specials(tokenizer))


def tokenizer_for_vocab(vocab: object) -> PreTrainedTokenizerFast:
    """The tokenizer of an srupp ``Vocab`` (as saved in checkpoints): a BPE vocabulary's own ``tokenizer.json``
    (``vocab.tokenizer``, with ``<pad>`` and ``<|endoftext|>`` as its padding and end tokens where it has them:
    ``srupp data prepare`` reserves both), else the byte or word tokenizer.

    Example:
        >>> model, cfg, vocab, _ = srupp.train.load_model("runs/bpe/checkpoints/best.safetensors")
        >>> tokenizer_for_vocab(vocab)("def main").input_ids == vocab.encode("def main")
        True
    """
    kind = getattr(vocab, "kind", None)
    tokenizer_json = getattr(vocab, "tokenizer", None)
    if isinstance(tokenizer_json, str) and tokenizer_json:
        tokenizer = Tokenizer.from_str(tokenizer_json)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **_specials(tokenizer))
    if kind == "byte":
        return byte_tokenizer()
    if kind == "word":
        return word_tokenizer(vocab.words)
    raise ValueError(f"`vocab` must be an srupp Vocab (kind 'byte', 'word' or 'bpe'), got {vocab!r}")
