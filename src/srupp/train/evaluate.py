"""Evaluation: mean negative log-likelihood over a split, carrying state across segments."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from srupp.data import Corpus, StreamBatcher, Vocab, open_corpus
from srupp.errors import ConfigError, CorpusError
from srupp.models import SRUppLM


@torch.no_grad()
def evaluate(
    model: SRUppLM,
    tokens: np.ndarray,
    *,
    batch_size: int = 1,
    unroll: int = 512,
    attn_window: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> float:
    """Mean NLL in nats per token of ``tokens`` read as ``batch_size`` streams of ``unroll``-token segments.

    Each segment attends to the previous one as memory; ``attn_window`` (default ``unroll``) caps how far
    back a position looks, the paper's ``same_length`` evaluation. Use ``batch_size`` 1 to score every token.

    Raises:
        ConfigError: ``batch_size``, ``unroll`` or ``max_tokens`` is below 1, or ``attn_window`` below 0.
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("unroll", unroll, 1),
        ("max_tokens", max_tokens, 1),
        ("attn_window", attn_window, 0),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"`{name}` must be an integer >= {low}, got {value!r}")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    batch_size = max(1, min(batch_size, (len(tokens) - 1) // unroll))
    batcher = StreamBatcher(tokens, batch_size, unroll, drop_last=False)
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    window = unroll if attn_window is None else attn_window  # 0 is a valid window: each token sees itself only
    try:
        for x, y in batcher.epoch_segments():
            with autocast or contextlib.nullcontext():
                nll, state = model(x.to(device), state, targets=y.to(device), attn_window=window)
            total += float(nll.double().sum())
            count += nll.numel()
    finally:
        model.train(was_training)
    return total / count


def bpc(nats: float, bytes_per_token: float = 1.0) -> float:
    """Bits per byte of a mean loss in nats per token (``Corpus.bytes_per_token``: 1 for byte corpora)."""
    return nats / (math.log(2) * bytes_per_token)


def ppl(nats: float) -> float:
    return math.exp(min(nats, 50.0))


def evaluation_corpus(checkpoint: str | os.PathLike, trained_on: str, vocab: Vocab, data: str | None = None) -> Corpus:
    """The corpus to score a checkpoint on, opened read-only; nothing is prepared or written.

    ``data`` (the user's ``--data``) when given, else the corpus the model was trained on: its folder, or for
    ``"stdlib"`` the ``data/`` folder of the run the checkpoint file sits in (``<run>/checkpoints/x``).

    Raises:
        CorpusError: the corpus's vocabulary differs from the checkpoint's ``vocab``.
        FileNotFoundError: no prepared corpus there (the message says how to make one).
    """
    if data is None and trained_on == "stdlib":
        data = str(Path(checkpoint).resolve().parent.parent / "data")
        if not Path(data, "meta.json").is_file():
            raise FileNotFoundError(
                f"checkpoint {checkpoint} was trained on the embedded stdlib corpus, which is not prepared at {data}; "
                f"prepare it with `srupp data prepare stdlib --out DIR` and pass --data DIR"
            )
    corpus = open_corpus(data or trained_on)
    if corpus.vocab != vocab:
        raise CorpusError(f"corpus {corpus.path} has a different vocabulary from checkpoint {checkpoint}")
    return corpus
