"""Corpora prepared into memory-mapped token files: ``{train,valid,test}.bin`` plus ``meta.json``.

A prepared directory holds one flat token file per split (``uint8`` for bytes, ``int32`` for words and BPE
ids) and a ``meta.json`` naming the tokenizer, vocabulary size, dtype and split lengths (a BPE corpus also
holds its ``tokenizer.json``). Opening a split is an ``np.memmap``: a 100 MB corpus opens instantly and is
read lazily by the batcher.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import secrets
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from srupp.data import tokenizer as bpe
from srupp.errors import CorpusError, name_path
from srupp.files import remove_orphans, temp_path_beside, write_text_atomic

SPLITS = ("train", "valid", "test")
META = "meta.json"
EOS = "<eos>"
UNK = "<unk>"
PAD = "<pad>"
"""Padding, reserved in word and BPE vocabularies at ``prepare`` (never in the data); bytes pad with NUL."""
_ENWIK8_BYTES = 100_000_000
# A zip member of unknown expected size is read whole into memory: refuse one larger than this (the largest
# standard corpus file, WikiText-103's training split, is 0.54 GB).
MAX_MEMBER_BYTES = 1 << 30
# The SHA-1 of the 100,000,000 bytes of enwik8 as its author publishes it (the Hutter Prize's readme).
CONTENT_SHA1 = {"enwik8": "57b8363b814821dc9d47aa4d41f58733519076b2"}


@dataclass(frozen=True)
class Vocab:
    """Maps tokens to ids and back: ``kind="byte"`` is the identity over 256 byte values, ``kind="word"`` a
    frequency-sorted word list (most frequent first, as adaptive softmax cutoffs assume), ``kind="bpe"`` a
    byte-level BPE given by its ``tokenizer.json`` text (``tokenizer``)."""

    kind: str
    words: tuple[str, ...] = ()
    tokenizer: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("byte", "word", "bpe"):
            raise ValueError(f"`kind` must be 'byte', 'word' or 'bpe', got {self.kind!r}")
        if (self.kind == "bpe") != bool(self.tokenizer):
            raise ValueError(f"`tokenizer` (tokenizer.json text) is given for kind 'bpe' only, got kind {self.kind!r}")

    @property
    def pad_id(self) -> int | None:
        """The padding id: ``<pad>`` of word and BPE vocabularies (None if prepared without one), NUL for bytes."""
        return 0 if self.kind == "byte" else self._special_id(PAD)

    @property
    def eod_id(self) -> int | None:
        """The end-of-document id: ``<eos>`` of word vocabularies, ``<|endoftext|>`` of BPE ones, None for bytes
        (and for vocabularies prepared without one)."""
        return None if self.kind == "byte" else self._special_id(EOS if self.kind == "word" else bpe.EOD)

    def _special_id(self, token: str) -> int | None:
        if self.kind == "bpe":
            return bpe.load(self.tokenizer).token_to_id(token)
        return self.words.index(token) if token in self.words else None

    @property
    def size(self) -> int:
        if self.kind == "bpe":
            return len(bpe.token_bytes(self.tokenizer))
        return 256 if self.kind == "byte" else len(self.words)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (checkpoint metadata); ``Vocab.from_dict`` reads it back."""
        out: dict[str, object] = {"kind": self.kind, "words": list(self.words)}
        if self.tokenizer:
            out["tokenizer"] = self.tokenizer
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        return cls(data["kind"], tuple(data.get("words", ())), data.get("tokenizer", ""))

    def token_bytes(self) -> np.ndarray:
        """``[V]`` int64: the UTF-8 bytes of text each id stands for (bytes and BPE; words have no fixed count)."""
        if self.kind == "word":
            raise NotImplementedError("word vocabularies have no fixed number of bytes per token")
        return np.ones(256, dtype=np.int64) if self.kind == "byte" else bpe.token_bytes(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        if self.kind == "bpe":
            return bpe.encode(text, self.tokenizer).tolist()
        index = {w: i for i, w in enumerate(self.words)}
        unk = index.get(UNK)
        ids = []
        for line in text.split("\n"):
            for word in line.split():
                if word not in index and unk is None:
                    raise ValueError(f"word {word!r} is not in the vocabulary (which has no {UNK} token)")
                ids.append(index.get(word, unk))
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.kind == "bpe":
            return bpe.decode(ids, self.tokenizer)
        lines, line = [], []
        for i in ids:
            if self.words[i] == EOS:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[i])
        return "".join(lines) + " ".join(line)


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus directory, opened read-only with memory maps."""

    path: Path
    vocab: Vocab
    lengths: dict[str, int]
    dtype: str
    files: dict[str, str] = field(default_factory=dict)  # split -> token file name (default <split>.bin)

    def split(self, name: str) -> np.ndarray:
        """The token ids of split ``name`` as a read-only ``np.memmap`` of shape ``[N]``."""
        if name not in self.lengths:
            raise CorpusError(f"`split` must be one of {sorted(self.lengths)}, got {name!r}")
        if self.lengths[name] == 0:
            raise CorpusError(f"split {name!r} of corpus {self.path} is empty")
        file = self.files.get(name, f"{name}.bin")
        return np.memmap(self.path / file, dtype=self.dtype, mode="r", shape=(self.lengths[name],))

    def bytes_per_token(self, name: str, num_tokens: int | None = None) -> float:
        """Mean UTF-8 bytes per scored token of split ``name``: the targets ``tokens[1 : num_tokens + 1]`` (all
        when None), as evaluation scores them. Bits per byte = nats per token / (ln 2 * this); 1 for bytes."""
        if self.vocab.kind == "byte":
            return 1.0
        lengths, tokens = self.vocab.token_bytes(), self.split(name)
        end = len(tokens) if num_tokens is None else min(len(tokens), num_tokens + 1)
        if end < 2:
            raise CorpusError(f"split {name!r} of corpus {self.path} has no token to score")
        step = 1 << 24
        total = sum(int(lengths[tokens[i : min(i + step, end)]].sum()) for i in range(1, end, step))
        return total / (end - 1)


def open_corpus(path: str | os.PathLike) -> Corpus:
    """Open a directory written by one of the ``prepare_*`` functions (``srupp data prepare``)."""
    path = Path(path)
    if not (path / META).is_file():
        hint = "run `srupp data prepare ...` first" if not path.exists() else f"it has no {META}"
        raise FileNotFoundError(f"no prepared corpus at {path}: {hint}")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        lengths, dtype = {str(k): int(v) for k, v in meta["lengths"].items()}, np.dtype(meta["dtype"])
        kind, words = meta["kind"], tuple(meta.get("words", ()))
        files = meta.get("files") or {name: f"{name}.bin" for name in lengths}  # no "files": srupp <= 0.2
        if set(files) != set(lengths) or not all(isinstance(f, str) and _TOKEN_FILE.match(f) for f in files.values()):
            raise ValueError(f"`files` must name a <split>.bin file in the folder for each split, got {files!r:.200}")
        if kind == "bpe":
            tokenizer = meta.get("tokenizer") or _read_text(path / bpe.TOKENIZER_FILE)
            vocab = Vocab(kind, words, tokenizer)
        else:
            vocab = Vocab(kind, words)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise CorpusError(f"corpus {path} has an invalid {META} ({err!r})") from err
    for name, length in lengths.items():
        file = path / files[name]
        expected = length * dtype.itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise CorpusError(f"corpus file {file} is missing or has the wrong size (expected {expected} bytes)")
    return Corpus(path, vocab, lengths, dtype.name, files)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise name_path(err, path) from err


def _write_file(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_corpus(
    out: str | os.PathLike, splits: dict[str, np.ndarray], vocab: Vocab, source: str, *, overwrite: bool = False
) -> Corpus:
    """Write token arrays as ``<split>.bin`` files and ``meta.json`` into ``out``; replacing a corpus is atomic.

    Every file is first written in full under a temporary name of this process. The token files then take names
    no current file has (``<split>.bin``, or ``<split>.<random>.bin`` while the old corpus holds that name), and
    renaming ``meta.json``, which names them (and holds a BPE corpus's tokenizer), commits the new corpus in one
    step: a crash at any point leaves either the old corpus or the new one, never a mix. The old token files
    are removed after that (a trainer reading them keeps them open); any failure while writing (a full disk)
    leaves the old corpus whole and removes the temporary files.

    Raises:
        CorpusError: ``out`` already holds a corpus and ``overwrite`` is False, or the training split is empty.
        OSError: the folder cannot be written (naming the file).
    """
    out = Path(out)
    names = [META, *(f"{name}.bin" for name in splits)]
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise CorpusError(f"{out} already holds a corpus ({', '.join(existing)}); pass --overwrite to replace it")
    if "train" not in splits or len(splits["train"]) == 0:
        raise CorpusError(f"the training split of {source} is empty")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    dtype = "uint8" if vocab.kind == "byte" else "int32"
    files = {name: _free_name(out, name) for name in splits}
    meta = {"kind": vocab.kind, "vocab_size": vocab.size, "dtype": dtype, "source": source, "files": files}
    meta["lengths"] = {name: int(len(tokens)) for name, tokens in splits.items()}
    if vocab.kind == "word":
        meta["words"] = list(vocab.words)
    if vocab.kind == "bpe":
        meta["tokenizer"] = vocab.tokenizer
    contents = {files[name]: np.ascontiguousarray(tokens, dtype=dtype).data for name, tokens in splits.items()}
    contents[META] = json.dumps(meta, indent=1).encode()
    staged = {name: temp_path_beside(out / name) for name in contents}
    try:
        for name, data in contents.items():
            try:
                _write_file(staged[name], data)
            except OSError as err:
                raise name_path(err, out / name) from err
        for name in sorted(contents, key=lambda name: name == META):  # meta.json last: it commits the rest
            os.replace(staged[name], out / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    _remove_unnamed_token_files(out, set(files.values()))
    if vocab.kind == "bpe":  # a copy for `--tokenizer <folder>`; the corpus reads the one in meta.json
        write_text_atomic(out / bpe.TOKENIZER_FILE, vocab.tokenizer)
    return open_corpus(out)


_TOKEN_FILE = re.compile(r"^(train|valid|test)(\.[0-9a-f]{8})?\.bin$")


def _free_name(out: Path, split: str) -> str:
    """``<split>.bin`` unless a file has that name (the corpus being replaced), else ``<split>.<random>.bin``."""
    name = f"{split}.bin"
    while (out / name).exists():
        name = f"{split}.{secrets.token_hex(4)}.bin"
    return name


def _remove_unnamed_token_files(out: Path, named: set[str]) -> None:
    """Remove the token files of the replaced corpus (and of a re-prepare that crashed before committing)."""
    for entry in os.scandir(out):
        if _TOKEN_FILE.match(entry.name) and entry.name not in named and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _read_zip_member(archive: Path, name: str, expected_size: int | None) -> bytes:
    """Read member ``name`` after checking its size from the zip's directory, before decompressing it."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if Path(m.filename).name == name]
        if not members:
            raise CorpusError(f"{archive} has no member named {name!r} (members: {zf.namelist()[:5]})")
        size = members[0].file_size
        if expected_size is not None and size != expected_size:
            raise CorpusError(f"member {name} of {archive} must have {expected_size:,} bytes, got {size:,}")
        if size > MAX_MEMBER_BYTES:
            raise CorpusError(
                f"member {name} of {archive} has {size:,} bytes, more than the {MAX_MEMBER_BYTES:,} read into memory"
            )
        return zf.read(members[0])


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """Raise CorpusError if ``out`` holds a prepared corpus and ``overwrite`` is False (checked before the
    slow reading, and again by :func:`write_corpus`)."""
    if not overwrite and (Path(out) / META).exists():
        raise CorpusError(f"{out} already holds a corpus ({META}); pass --overwrite to replace it")


def _read_bytes(source: Path, name: str, expected_size: int | None = None) -> bytes:
    if not source.exists():
        raise FileNotFoundError(f"corpus source {source} does not exist")
    if source.is_dir():
        source = source / name
    if zipfile.is_zipfile(source):
        data = _read_zip_member(source, name, expected_size)
    else:
        size = source.stat().st_size
        if expected_size is not None and size != expected_size:
            raise CorpusError(f"{source} must have {expected_size:,} bytes, got {size:,}")
        data = source.read_bytes()
    if not data:
        raise CorpusError(f"corpus source {source} is empty")
    return data


def _split_90_5_5(data: bytes) -> dict[str, np.ndarray]:
    tokens = np.frombuffer(data, dtype=np.uint8)
    n_eval = len(tokens) // 20
    n_train = len(tokens) - 2 * n_eval
    return {
        "train": tokens[:n_train],
        "valid": tokens[n_train : n_train + n_eval],
        "test": tokens[n_train + n_eval :],
    }


def prepare_enwik8(
    source: str | os.PathLike, out: str | os.PathLike, *, check_size: bool = True, overwrite: bool = False
) -> Corpus:
    """enwik8 (``enwik8.zip`` or the unzipped file): bytes, first 90M train / next 5M valid / last 5M test."""
    return _prepare_100m_bytes("enwik8", source, out, check_size=check_size, overwrite=overwrite)


def prepare_text8(
    source: str | os.PathLike, out: str | os.PathLike, *, check_size: bool = True, overwrite: bool = False
) -> Corpus:
    """text8 (``text8.zip`` or the file): 100M lowercase characters split 90M / 5M / 5M like enwik8."""
    return _prepare_100m_bytes("text8", source, out, check_size=check_size, overwrite=overwrite)


def _prepare_100m_bytes(
    name: str, source: str | os.PathLike, out: str | os.PathLike, *, check_size: bool, overwrite: bool
) -> Corpus:
    refuse_existing(out, overwrite)  # before reading 100 MB
    data = _read_bytes(Path(source), name, _ENWIK8_BYTES if check_size else None)
    if check_size and name in CONTENT_SHA1 and hashlib.sha1(data).hexdigest() != CONTENT_SHA1[name]:
        raise CorpusError(
            f"{source} is not the standard {name}: its SHA-1 is {hashlib.sha1(data).hexdigest()}, the published one "
            f"{CONTENT_SHA1[name]} (pass --no-size-check to use it anyway)"
        )
    return write_corpus(out, _split_90_5_5(data), Vocab("byte"), name, overwrite=overwrite)


def _wt103_lines(source: Path, split: str) -> list[str]:
    name = f"wiki.{split}.tokens"
    if source.is_dir():
        candidates = [source / name, source / "wikitext-103" / name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{source} has no {name}")
        text = found.read_text(encoding="utf-8")
    else:
        text = _read_bytes(source, name).decode("utf-8")
    return text.splitlines()


def prepare_wikitext103(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Corpus:
    """WikiText-103 (the ``wikitext-103-v1.zip`` or its folder): words split on spaces, ``<eos>`` ending
    every non-empty line, vocabulary from the training split sorted by frequency (Transformer-XL style)."""
    source = Path(source)
    refuse_existing(out, overwrite)
    if not source.exists():
        raise FileNotFoundError(f"corpus source {source} does not exist")
    lines = {split: [ln.split() + [EOS] for ln in _wt103_lines(source, split) if ln.strip()] for split in SPLITS}
    counts = collections.Counter(w for line in lines["train"] for w in line)
    if not counts:
        raise CorpusError(f"the training split of {source} is empty")
    words = tuple(w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    # <pad> last: it never occurs, and the frequency order is what adaptive softmax cutoffs assume.
    vocab = Vocab("word", words if PAD in words else (*words, PAD))
    index = {w: i for i, w in enumerate(words)}
    unk = index.get(UNK)
    splits = {}
    for split, split_lines in lines.items():
        ids = [index.get(w, unk) for line in split_lines for w in line]
        if any(i is None for i in ids):
            raise CorpusError(f"split {split!r} of {source} has words missing from the training vocabulary")
        splits[split] = np.asarray(ids, dtype=np.int32)
    return write_corpus(out, splits, vocab, "wikitext-103", overwrite=overwrite)


def _ratio_split(chunks: list[tuple[str, bytes]], valid_ratio: float, test_ratio: float) -> dict[str, np.ndarray]:
    """Assign each file to a split by a hash of its name (stable when files are added), or, for a single
    file, split its bytes: the last ``valid_ratio + test_ratio`` fraction becomes valid then test."""
    for name, value in (("valid_ratio", valid_ratio), ("test_ratio", test_ratio)):
        if not 0.0 <= value < 0.5:
            raise CorpusError(f"`{name}` must be in [0, 0.5), got {value}")
    if len(chunks) == 1:
        tokens = np.frombuffer(chunks[0][1], dtype=np.uint8)
        n_valid, n_test = int(len(tokens) * valid_ratio), int(len(tokens) * test_ratio)
        n_train = len(tokens) - n_valid - n_test
        return {
            "train": tokens[:n_train],
            "valid": tokens[n_train : n_train + n_valid],
            "test": tokens[n_train + n_valid :],
        }
    parts: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    for name, data in chunks:
        draw = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64
        split = "valid" if draw < valid_ratio else "test" if draw < valid_ratio + test_ratio else "train"
        parts[split].append(data)
    return {split: np.frombuffer(b"".join(p), dtype=np.uint8) for split, p in parts.items()}


def _text_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes and not skip & set(p.parts)]
    return sorted(files)


def prepare_text(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    valid_ratio: float = 0.05,
    test_ratio: float = 0.05,
    suffixes: tuple[str, ...] = (".txt", ".md", ".py", ".rst"),
    tokenizer: str = "bytes",
    overwrite: bool = False,
) -> Corpus:
    """Any UTF-8 text file, or a folder of them (files with ``suffixes``, sorted), with a ratio split.

    ``tokenizer`` is ``"bytes"`` (uint8 bytes), ``"bpe:VOCAB"`` (a byte-level BPE of at most VOCAB ids trained
    on the training split only) or the path of a byte-level ``tokenizer.json`` to use as is. BPE vocabularies
    get an end-of-document token ``<|endoftext|>`` and a padding token ``<pad>`` (reserved: never in the data).

    Raises:
        ConfigError: a bad ``tokenizer``. CorpusError: no text, or a split that would be empty.
    """
    kind, arg = bpe.parse_spec(tokenizer)
    # A given tokenizer keeps its ids; the reserved tokens it lacks are added after them. Checked before any text.
    given = bpe.reserve_special_tokens(bpe.read_tokenizer(arg), (bpe.EOD, PAD)) if kind == "file" else None
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"corpus source {source} does not exist")
    files = _text_files(source, suffixes) if source.is_dir() else [source]
    chunks = [(str(f.relative_to(source) if source.is_dir() else f.name), f.read_bytes()) for f in files]
    chunks = [(name, data.rstrip(b"\n") + b"\n\n") for name, data in chunks if data.strip()]
    if not chunks:
        raise CorpusError(f"no non-empty text with suffixes {suffixes} found at {source}")
    splits = _ratio_split(chunks, valid_ratio, test_ratio)
    ratios = {"valid": valid_ratio, "test": test_ratio}
    for name, tokens in splits.items():
        if len(tokens) == 0 and ratios.get(name, 1.0) > 0:
            raise CorpusError(
                f"the {name} split of {source} would be empty ({len(chunks)} file(s); each file goes whole to one "
                f"split by a hash of its name): add files, raise --{name}-ratio, or give a single file, which is "
                f"split by bytes"
            )
    if kind == "bytes":
        return write_corpus(out, splits, Vocab("byte"), str(source), overwrite=overwrite)
    texts = bpe.split_texts(splits)
    vocab = Vocab("bpe", tokenizer=given or bpe.train_bpe(texts["train"], arg, special_tokens=(bpe.EOD, PAD)))
    ids = {name: bpe.encode(text, vocab.tokenizer) for name, text in texts.items()}
    return write_corpus(out, ids, vocab, str(source), overwrite=overwrite)


def stdlib_source() -> Path:
    """The Python standard library's own source folder (the embedded demo corpus, present wherever Python is)."""
    return Path(sysconfig.get_paths()["stdlib"])


def prepare_stdlib(
    out: str | os.PathLike, *, valid_ratio: float = 0.02, test_ratio: float = 0.02, overwrite: bool = False
) -> Corpus:
    """The standard library's ``.py`` files, sorted, split per file by a hash of the relative path."""
    return prepare_text(
        stdlib_source(), out, valid_ratio=valid_ratio, test_ratio=test_ratio, suffixes=(".py",), overwrite=overwrite
    )
