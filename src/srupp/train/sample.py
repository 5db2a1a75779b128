"""Sampling text from a trained model: the prompt in, printable pieces out (shared by generate and demo)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from srupp.data import Vocab
from srupp.data.corpus import EOS
from srupp.errors import ConfigError
from srupp.models import SRUppLM, generate


def sample_text(
    model: SRUppLM, vocab: Vocab, prompt: str, max_new_tokens: int, *, generator: torch.Generator, **sampling
) -> Iterator[str]:
    """Yield the text of ``max_new_tokens`` sampled tokens after ``prompt``, piece by piece.

    Bytes are held back until they form whole UTF-8 characters (at most 4), so a multi-byte character is
    never printed as replacement marks; word vocabularies yield each word with a leading space.
    ``sampling`` goes to :func:`srupp.models.generate` (``temperature``, ``top_k``, ``top_p``, ``max_context``).

    Raises:
        ConfigError: the prompt has words outside a word vocabulary without ``<unk>``.
    """
    try:
        ids = vocab.encode(prompt)
    except ValueError as err:
        raise ConfigError(f"`prompt`: {err}") from err
    # An empty prompt starts at a line break; word vocabularies spell it <eos> (encode drops newlines).
    ids = ids or vocab.encode(EOS if vocab.kind == "word" else "\n")
    pending: list[int] = []
    for token in generate(model, ids, max_new_tokens, generator=generator, **sampling):
        pending.append(token)
        text = vocab.decode(pending)
        if vocab.kind == "word" or "\ufffd" not in text or len(pending) > 4:
            yield " " + text if vocab.kind == "word" else text
            pending = []
    if pending:
        yield vocab.decode(pending)
