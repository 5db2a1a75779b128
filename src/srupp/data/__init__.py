"""Corpora prepared into memory-mapped token files, vocabularies, downloads and batching into streams."""

from srupp.data.batching import Segment, StreamBatcher
from srupp.data.corpus import (
    Corpus,
    Vocab,
    open_corpus,
    prepare_enwik8,
    prepare_stdlib,
    prepare_text,
    prepare_text8,
    prepare_wikitext103,
    stdlib_source,
)
from srupp.data.download import ARCHIVES, URLS, download, download_wikitext103, sha256_file

__all__ = [
    "ARCHIVES",
    "URLS",
    "Corpus",
    "Segment",
    "StreamBatcher",
    "Vocab",
    "download",
    "download_wikitext103",
    "open_corpus",
    "prepare_enwik8",
    "prepare_stdlib",
    "prepare_text",
    "prepare_text8",
    "prepare_wikitext103",
    "sha256_file",
    "stdlib_source",
]
