"""Sampling from an :class:`SRUppLM` on the cached decoding path, one token at a time, streamed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from srupp.models.lm import SRUppLM


def sample_next(
    log_probs: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one id per row from ``[B, V]`` log-probabilities.

    ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely ids; ``top_p`` keeps the smallest set of
    most likely ids whose probability reaches p (nucleus sampling). Returns ``[B]`` int64.
    """
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"`top_k` must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if temperature == 0:
        return log_probs.argmax(dim=-1)
    logits = log_probs.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop an id when the ids ranked above it already reach top_p (the top id always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: SRUppLM,
    prompt: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_context: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Continue ``prompt`` token by token, yielding each new id as soon as it is drawn.

    The prompt is fed once through a decoding session (``model.decoder``; the recurrent state and attention cache
    then hold it, and it runs in pieces, so memory grows linearly with its length); each new token costs one
    cached step on the session's one-token path (under ``torch.inference_mode``).

    Args:
        model: the language model (put in eval mode here).
        prompt: ``[P]`` token ids, P >= 1.
        max_new_tokens: how many ids to draw.
        temperature, top_k, top_p: see :func:`sample_next`.
        max_context: attention cache length (None keeps everything); it bounds the session's memory.
        generator: for reproducible sampling.

    Example:
        >>> text = vocab.decode(list(generate(model, vocab.encode("def "), 100, top_p=0.9)))
    """
    if max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}")
    ids = torch.as_tensor(list(prompt) if not isinstance(prompt, Tensor) else prompt, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"`prompt` must be a non-empty 1-D sequence of ids, got shape {list(ids.shape)}")
    vocab_size = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"`prompt` ids must be in [0, {vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]")
    model.eval()
    if max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    session = model.decoder(1, max_context=max_context)
    log_probs = session.step(ids.to(device)[:, None])
    for _ in range(max_new_tokens):
        token = sample_next(log_probs, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield int(token[0])
        log_probs = session.step(token[None, :])
