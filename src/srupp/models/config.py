"""The language model's configuration: a typed dataclass, validated on construction, round-tripping JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from srupp.nn.layer import HIGHWAY_BIAS, attention_layer_indices


@dataclass
class LMConfig:
    """Architecture of an :class:`~srupp.models.SRUppLM`. Defaults are the paper's enwik8 base model.

    Args:
        vocab_size: number of token ids (256 for bytes).
        hidden_size: d, the recurrent state and embedding size.
        proj_size: d', the attention size (d : d' = 4 : 1 in the paper's base models).
        num_layers: SRU++ layers.
        num_heads: attention heads (the paper uses one).
        dropout: on the embeddings, inside every layer and on the final hidden states.
        attn_dropout: on attention probabilities.
        emb_dropout: inside the adaptive input, between a cluster's embedding and its projection.
        attention_every_n_layers: k; layer i (0-based) has attention iff (i + 1) % k == 0.
        attention_layers: explicit 0-based attention layer indices (overrides k when given); ``[]`` for none,
            an SRU stack whose layers keep the d -> d' -> 3d transform.
        highway_bias: initial bias of the reset (highway) gate.
        layer_norm: per-layer input layer norm (off in the paper's LM runs).
        cutoffs: adaptive input/softmax cluster boundaries; None means a plain embedding and output layer.
        embed_size: the adaptive head's size (the paper's n_e = 1024 for WikiText-103), reached from d by one
            tied projection; None uses d directly.
        div_value: adaptive cluster i has size ``embed_size // div_value ** (i + 1)``.

    The recurrence backend is not part of the architecture: see ``SRUppLM(config, backend=...)``.
    """

    vocab_size: int = 256
    hidden_size: int = 3072
    proj_size: int = 768
    num_layers: int = 10
    num_heads: int = 1
    dropout: float = 0.22
    attn_dropout: float = 0.22
    emb_dropout: float = 0.0
    attention_every_n_layers: int = 1
    attention_layers: list[int] | None = None
    highway_bias: float = HIGHWAY_BIAS
    layer_norm: bool = False
    cutoffs: list[int] | None = None
    embed_size: int | None = None
    div_value: float = 4.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "proj_size", "num_layers", "num_heads", "attention_every_n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if self.vocab_size < 2:
            raise ValueError(f"`vocab_size` must be >= 2, got {self.vocab_size}")
        if self.proj_size % self.num_heads:
            raise ValueError(f"`proj_size` ({self.proj_size}) must be divisible by `num_heads` ({self.num_heads})")
        for name in ("dropout", "attn_dropout", "emb_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}")
        attention_layer_indices(self.num_layers, self.attention_every_n_layers, self.attention_layers)
        if self.cutoffs is not None:
            edges = [0, *self.cutoffs, self.vocab_size]
            if not self.cutoffs or any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
                raise ValueError(
                    f"`cutoffs` must be strictly increasing within (0, vocab_size={self.vocab_size}), "
                    f"got {self.cutoffs}"
                )
            if self.embed_size is not None and self.embed_size < 1:
                raise ValueError(f"`embed_size` must be >= 1 or None, got {self.embed_size}")
            if self.div_value <= 1.0 or self.adaptive_size // self.div_value ** len(self.cutoffs) < 1:
                raise ValueError(
                    f"`div_value` must be > 1 and leave every cluster >= 1 dim "
                    f"(size {self.adaptive_size}, {len(self.cutoffs)} clusters), got {self.div_value}"
                )

    @property
    def adaptive(self) -> bool:
        """Whether the model uses the tied adaptive input and adaptive softmax (word-level corpora)."""
        return self.cutoffs is not None

    @property
    def adaptive_size(self) -> int:
        """Width of the adaptive softmax head: ``embed_size`` or d."""
        return self.embed_size or self.hidden_size

    @property
    def attention_layer_indices(self) -> list[int]:
        """The 0-based layers with attention (the rule of ``srupp.nn.attention_layer_indices``)."""
        return list(attention_layer_indices(self.num_layers, self.attention_every_n_layers, self.attention_layers))

    @property
    def num_parameters(self) -> int:
        """Parameter count from the paper's formula (as the authors' README): per layer d*d' + 3d*d' + 2d' + 4d, plus
        2d'^2 + 1 per attention layer, plus the embedding and output layers."""
        d, p = self.hidden_size, self.proj_size
        layers = self.num_layers * (4 * d * p + 2 * p + 4 * d) + len(self.attention_layer_indices) * (2 * p * p + 1)
        if self.layer_norm:
            layers += self.num_layers * 2 * d
        if not self.adaptive:
            return layers + self.vocab_size * d + d * self.vocab_size + self.vocab_size
        edges, e = [*self.cutoffs, self.vocab_size], self.adaptive_size
        head = e * (self.cutoffs[0] + len(self.cutoffs)) + (d * e if self.embed_size else 0)
        tails = 0
        for i in range(len(self.cutoffs)):
            inner = int(e // self.div_value ** (i + 1))
            tails += e * inner + inner * (edges[i + 1] - edges[i])
        return layers + head + tails

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LMConfig:
        """The config of ``to_dict``. A ``backend`` key (saved by srupp <= 0.1, a runtime choice since) is
        dropped, so old checkpoints load."""
        values = {key: value for key, value in values.items() if key != "backend"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LMConfig:
        return cls.from_dict(json.loads(text))


__all__ = ["LMConfig"]
