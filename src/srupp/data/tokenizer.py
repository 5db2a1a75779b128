"""Byte-level BPE tokenizers (the ``tokenizers`` package) for subword corpora.

A tokenizer travels as its ``tokenizer.json`` text: in the corpus folder, in ``Vocab.tokenizer`` and so in every
checkpoint. Byte-level BPE maps any UTF-8 text to ids and back exactly, and each id stands for a fixed run of
bytes, so a model's loss can be reported per byte and compared with a byte-level model's.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from srupp.errors import ConfigError, CorpusError, UnavailableError

TOKENIZER_FILE = "tokenizer.json"
EOD = "<|endoftext|>"
"""The end-of-document token reserved in BPE vocabularies (GPT-2's name for it)."""
MIN_BPE_VOCAB = 259  # the 256 bytes, the two reserved tokens (end of document, padding) and one merge
_CHUNK_CHARS = 1 << 20
MAX_TOKENS = 1 << 24  # the largest vocabulary srupp builds a model for (srupp.models.config.MAX_VOCAB)
_EXTRA = "pip install 'srupp[hf]'"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise UnavailableError(f"BPE corpora need the package `tokenizers`: {_EXTRA}") from error
    return tokenizers


def parse_spec(spec: str) -> tuple[str, int | Path | None]:
    """Read a ``--tokenizer`` value: ``"bytes"``, ``"bpe:VOCAB"`` (train one of VOCAB ids) or a path to a
    ``tokenizer.json``. Returns ``("bytes", None)``, ``("bpe", VOCAB)`` or ``("file", Path)``."""
    if not isinstance(spec, str):
        raise TypeError(f"`tokenizer` must be a str, got {type(spec).__name__}")
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or not MIN_BPE_VOCAB <= int(size) <= MAX_TOKENS:
            raise ConfigError(
                f"`--tokenizer` bpe:VOCAB needs an integer VOCAB in [{MIN_BPE_VOCAB}, {MAX_TOKENS}], got {spec!r}"
            )
        return "bpe", int(size)
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.suffix != ".json" or not path.is_file():
        raise ConfigError(
            f"`--tokenizer` must be 'bytes', 'bpe:VOCAB' or an existing tokenizer.json file, got {spec!r}"
        )
    _tokenizers()  # a missing package is reported before any corpus is read
    return "file", path


_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")


def _chunks(text: str) -> Iterator[str]:
    """About ``_CHUNK_CHARS`` characters at a time and never more than twice that (memory stays bounded on text
    without line breaks), cut where the byte-level pre-tokenizer cuts anyway, so encoding by chunks equals
    encoding the whole: after a line break, else before a single space between two words, else (one word that
    long) anywhere."""
    start = 0
    while start < len(text):
        end = start + 2 * _CHUNK_CHARS
        if end < len(text):
            window = text[start + _CHUNK_CHARS : end]
            newline = window.find("\n")
            gap = _WORD_GAP.search(window) if newline < 0 else None
            if newline >= 0:
                end = start + _CHUNK_CHARS + newline + 1
            elif gap is not None:
                end = start + _CHUNK_CHARS + gap.start()
        yield text[start:end]
        start = end


def train_bpe(text: str, vocab_size: int, special_tokens: tuple[str, ...] = ()) -> str:
    """Train a byte-level BPE with at most ``vocab_size`` ids (``special_tokens`` first, then the 256 bytes and
    merges) on ``text``.

    Returns:
        The tokenizer as ``tokenizer.json`` text.
    """
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    # No prefix space and no normalizer: decode(encode(text)) is text, byte for byte.
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=list(special_tokens),
    )
    tokenizer.train_from_iterator(_chunks(text), trainer)
    return tokenizer.to_str()


def read_tokenizer(path: str | os.PathLike) -> str:
    """The text of a ``tokenizer.json``, checked to be a byte-level tokenizer that ``tokenizers`` loads.

    Raises:
        ConfigError: the file is not such a tokenizer (unreadable text, not JSON, another decoder, rejected by
            ``tokenizers``).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise ConfigError(f"`--tokenizer` {path} is not a tokenizer.json file: {error}") from None
    decoder = (data.get("decoder") or {}).get("type") if isinstance(data, dict) else None
    if decoder != "ByteLevel":
        raise ConfigError(
            f"`--tokenizer` {path} must be byte-level (decoder 'ByteLevel', as GPT-2 style BPEs), got decoder "
            f"{decoder!r}: only byte-level tokenizers decode exactly and give bits per byte"
        )
    try:
        load(text)
    except Exception as error:  # tokenizers raises its own Exception subclass for a malformed file
        raise ConfigError(f"`--tokenizer` {path} is not a tokenizer `tokenizers` can load: {error}") from None
    return text


def reserve_special_tokens(tokenizer_json: str, tokens: tuple[str, ...]) -> str:
    """``tokenizer_json`` with each of ``tokens`` it lacks added as a special token (a new id at the end)."""
    tokenizer = _tokenizers().Tokenizer.from_str(tokenizer_json)
    missing = [token for token in tokens if tokenizer.token_to_id(token) is None]
    if not missing:
        return tokenizer_json
    tokenizer.add_special_tokens(missing)
    return tokenizer.to_str()


@functools.lru_cache(maxsize=8)
def load(text: str):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` text (cached: vocabularies are compared and reused),
    after :func:`check_untrusted`."""
    check_untrusted(text)
    return _tokenizers().Tokenizer.from_str(text)


def check_untrusted(text: str) -> None:
    """Raise ConfigError for what a crafted ``tokenizer.json`` could do to this process: run a regular
    expression of its choosing (one that backtracks takes hours on a line), or claim ids that size an array
    beyond any vocabulary. Byte-level BPEs need neither (their ByteLevel pre-tokenizer has its pattern built in)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"a tokenizer must be tokenizer.json text ({error})") from None
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "Regex" in item:
                raise ConfigError(
                    f"the tokenizer uses a regular expression of its own ({str(item['Regex'])!r:.60}), which srupp "
                    "does not run (a crafted one can take hours on a line); use a ByteLevel pre-tokenizer"
                )
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    data = data if isinstance(data, dict) else {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else {}
    added = data.get("added_tokens") if isinstance(data.get("added_tokens"), list) else []
    ids = [*vocab.values(), *(token.get("id") for token in added if isinstance(token, dict))]
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_TOKENS]
    if bad:
        raise ConfigError(f"the tokenizer's token ids must be integers in [0, {MAX_TOKENS:,}), got {bad[0]!r}")


def encode(text: str, tokenizer_json: str) -> np.ndarray:
    """Token ids ``[N]`` int32 of ``text``."""
    tokenizer = load(tokenizer_json)
    parts = [np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(list(_chunks(text)))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def decode(ids: list[int], tokenizer_json: str) -> str:
    """Text of ``ids``; an id range that ends inside a UTF-8 character decodes that character as U+FFFD."""
    return load(tokenizer_json).decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def token_bytes(tokenizer_json: str) -> np.ndarray:
    """``[V]`` int64: how many bytes of text each id stands for.

    Byte-level vocabularies spell every byte as one character of a 256-character alphabet, so a token's length
    is its byte count; added tokens (e.g. ``<|endoftext|>``) are their UTF-8 text.
    """
    tokenizer = load(tokenizer_json)
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=False).items():
        lengths[index] = len(token)
    for index, added in tokenizer.get_added_tokens_decoder().items():
        lengths[index] = len(added.content.encode("utf-8"))
    return lengths


def split_texts(splits: dict[str, np.ndarray]) -> dict[str, str]:
    """Decode consecutive byte splits as UTF-8, first moving a character cut by a split boundary (a single file
    split by byte ratio) wholly into the earlier split."""
    names = list(splits)
    data = {name: bytes(np.asarray(splits[name], dtype=np.uint8)) for name in names}
    for before, after in zip(names, names[1:], strict=False):
        cut = 0
        while cut < min(3, len(data[after])) and 0x80 <= data[after][cut] < 0xC0:
            cut += 1
        data[before], data[after] = data[before] + data[after][:cut], data[after][cut:]
    texts = {}
    for name in names:
        try:
            texts[name] = data[name].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(f"split {name!r} is not valid UTF-8 text ({error}); BPE corpora need UTF-8") from None
    return texts
