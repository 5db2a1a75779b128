"""``SRUppConfig``: the Hugging Face configuration of an SRU++ model, one-to-one with :class:`LMConfig`."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from srupp.models.config import LMConfig

_LM_DEFAULTS = LMConfig()
LM_FIELDS = tuple(field.name for field in dataclasses.fields(LMConfig))
POOLINGS = ("last", "mean")


class SRUppConfig(PretrainedConfig):
    """The architecture of :class:`SRUppForCausalLM` and :class:`SRUppForSequenceClassification`.

    The language-model fields are those of :class:`srupp.models.LMConfig` (same names, same defaults, validated
    the same way); the rest only concern the Hugging Face models.

    Args:
        vocab_size, hidden_size, proj_size, num_layers, num_heads, dropout, attn_dropout, emb_dropout,
            attention_every_n_layers, attention_layers, highway_bias, layer_norm, cutoffs, embed_size,
            div_value: see :class:`LMConfig`.
        bidirectional: sequence classification runs a bidirectional SRU++ with non-causal attention (the
            encoder use of the layer); the causal LM is always unidirectional.
        classifier_pooling: ``"last"`` (the last non-padding position; the default for a causal encoder) or
            ``"mean"`` (the mean over non-padding positions; the default when ``bidirectional``).
        use_cache: return the recurrent state and attention cache from ``forward`` (for generation).
        pad_token_id, bos_token_id, eos_token_id: special token ids (None: the vocabulary has none).
        **kwargs: passed to ``PretrainedConfig`` (``num_labels``, ``pad_token_id``, ``eos_token_id``, ...).

    Example:
        >>> config = SRUppConfig.from_lm_config(LMConfig(hidden_size=64, proj_size=16, num_layers=2))
        >>> config.to_lm_config().hidden_size
        64
    """

    model_type = "srupp"
    # Trainer's evaluation leaves the decoding cache out of the gathered outputs.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    def __init__(
        self,
        vocab_size: int = _LM_DEFAULTS.vocab_size,
        hidden_size: int = _LM_DEFAULTS.hidden_size,
        proj_size: int = _LM_DEFAULTS.proj_size,
        num_layers: int = _LM_DEFAULTS.num_layers,
        num_heads: int = _LM_DEFAULTS.num_heads,
        dropout: float = _LM_DEFAULTS.dropout,
        attn_dropout: float = _LM_DEFAULTS.attn_dropout,
        emb_dropout: float = _LM_DEFAULTS.emb_dropout,
        attention_every_n_layers: int = _LM_DEFAULTS.attention_every_n_layers,
        attention_layers: list[int] | None = None,
        highway_bias: float = _LM_DEFAULTS.highway_bias,
        layer_norm: bool = _LM_DEFAULTS.layer_norm,
        cutoffs: list[int] | None = None,
        embed_size: int | None = None,
        div_value: float = _LM_DEFAULTS.div_value,
        bidirectional: bool = False,
        classifier_pooling: str | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.emb_dropout = emb_dropout
        self.attention_every_n_layers = attention_every_n_layers
        self.attention_layers = None if attention_layers is None else list(attention_layers)
        self.highway_bias = highway_bias
        self.layer_norm = layer_norm
        self.cutoffs = None if cutoffs is None else list(cutoffs)
        self.embed_size = embed_size
        self.div_value = div_value
        if classifier_pooling is not None and classifier_pooling not in POOLINGS:
            raise ValueError(f"`classifier_pooling` must be one of {POOLINGS} or None, got {classifier_pooling!r}")
        self.bidirectional = bool(bidirectional)
        self.classifier_pooling = classifier_pooling
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        # After the base __init__, which in transformers 4 sets these (to None) itself.
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.to_lm_config()  # validates the architecture with LMConfig's own checks

    @property
    def pooling(self) -> str:
        """The pooling sequence classification uses (``classifier_pooling`` or its default)."""
        return self.classifier_pooling or ("mean" if self.bidirectional else "last")

    @classmethod
    def from_lm_config(cls, config: LMConfig, **kwargs) -> SRUppConfig:
        """The Hugging Face config of an srupp ``LMConfig``; ``kwargs`` set the Hugging Face-only fields."""
        if not isinstance(config, LMConfig):
            raise TypeError(f"`config` must be an LMConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)

    def to_lm_config(self) -> LMConfig:
        """The srupp ``LMConfig`` of this architecture (raises ValueError/TypeError on invalid fields)."""
        return LMConfig(**{name: getattr(self, name) for name in LM_FIELDS})
