"""The language model's configuration: a typed dataclass, validated on construction, round-tripping JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from srupp.errors import ConfigError, ConfigTypeError
from srupp.nn.layer import HIGHWAY_BIAS, attention_layer_indices

# Far above any model this library trains (the paper's largest: 10 layers, d=6016), low enough that a crafted or
# mistyped size is refused before a module is built: building 10**7 layers, even on the meta device, never ends.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 16
MAX_VOCAB = 1 << 24


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    strict: bool = False,
    at_most: float | None = None,
    optional: bool = False,
) -> None:
    """Raise unless ``value`` is a finite number (an int if ``integer``; never a bool or a string) within
    ``[low, high)`` (``(low, high)`` with ``strict``) and ``<= at_most``: ConfigTypeError (a TypeError) for the
    wrong type, ConfigError (a ValueError) for a non-finite or out-of-range value."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an int" if integer else "a finite number"
        raise ConfigTypeError(f"`{name}` must be {kind}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}")
    if low is not None and (value < low or (strict and value == low)):
        raise ConfigError(f"`{name}` must be {'>' if strict else '>='} {low}, got {value!r}")
    if high is not None and value >= high:
        raise ConfigError(f"`{name}` must be < {high}, got {value!r}")
    if at_most is not None and value > at_most:
        raise ConfigError(f"`{name}` must be <= {at_most:,}, got {value!r}")


def _check_int_list(name: str, value: Any, *, at_most: int) -> None:
    if value is None:
        return
    if not isinstance(value, list | tuple) or len(value) > at_most:
        raise ConfigTypeError(f"`{name}` must be a list of at most {at_most:,} ints or None, got {value!r:.80}")
    for item in value:
        check_number(name, item, integer=True)


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
        check_number("num_layers", self.num_layers, integer=True, low=1, at_most=MAX_LAYERS)
        check_number("vocab_size", self.vocab_size, integer=True, low=2, at_most=MAX_VOCAB)
        for name in ("hidden_size", "proj_size", "num_heads"):
            check_number(name, getattr(self, name), integer=True, low=1, at_most=MAX_WIDTH)
        check_number("attention_every_n_layers", self.attention_every_n_layers, integer=True, low=1)
        check_number("embed_size", self.embed_size, integer=True, low=1, at_most=MAX_WIDTH, optional=True)
        if self.proj_size % self.num_heads:
            raise ValueError(f"`proj_size` ({self.proj_size}) must be divisible by `num_heads` ({self.num_heads})")
        for name in ("dropout", "attn_dropout", "emb_dropout"):
            check_number(name, getattr(self, name), low=0.0, high=1.0)
        check_number("highway_bias", self.highway_bias)
        check_number("div_value", self.div_value)
        if not isinstance(self.layer_norm, bool):
            raise ConfigTypeError(f"`layer_norm` must be true or false, got {self.layer_norm!r}")
        _check_int_list("attention_layers", self.attention_layers, at_most=MAX_LAYERS)
        _check_int_list("cutoffs", self.cutoffs, at_most=MAX_LAYERS)
        attention_layer_indices(self.num_layers, self.attention_every_n_layers, self.attention_layers)
        if self.cutoffs is not None:
            edges = [0, *self.cutoffs, self.vocab_size]
            if not self.cutoffs or any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
                raise ValueError(
                    f"`cutoffs` must be strictly increasing within (0, vocab_size={self.vocab_size}), "
                    f"got {self.cutoffs}"
                )
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


__all__ = ["MAX_LAYERS", "MAX_VOCAB", "MAX_WIDTH", "LMConfig", "check_number"]
