"""Evaluation: mean negative log-likelihood over a split, carrying state across segments."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from srupp.data import StreamBatcher
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
    """
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
