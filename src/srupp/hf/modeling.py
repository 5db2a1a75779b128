"""SRU++ as Hugging Face ``transformers`` models: a causal LM with cached generation, and a sequence classifier.

Both keep srupp's own modules and parameter names (under ``model.``), so an ``SRUppLM`` state_dict loads as is.
Inputs are batch-first ``[B, T]``; ``attention_mask`` (1 = token, 0 = padding) hides padded positions from the
recurrence and, as keys, from attention, so a left-padded batch gives each row what it gives alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from srupp.hf.configuration import SRUppConfig
from srupp.models import SRUppLM, srupp_stack
from srupp.models.lm import embedding_bound
from srupp.nn import SRUppState
from srupp.nn.layer import SRULayer

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""What this ``transformers`` calls the cache in outputs and ``generate``: ``cache`` (5.x) or ``past_key_values``."""


class SRUppCache(Cache):
    """The decoding state of an SRU++ model for ``generate``: a decoding session of its stack
    (:class:`srupp.nn.decode.SRUppDecoder`: each layer's c, attention keys and values in buffers it extends in
    place, and which earlier positions were padding) and the number of positions fed so far.

    ``forward`` feeds it and returns it. It cannot be cropped: a recurrent state does not roll back.

    Args:
        state: the state to continue from (None: nothing fed yet).
        seen: positions already fed (padding included).
    """

    def __init__(self, state: SRUppState | None = None, seen: int = 0) -> None:
        super().__init__(layers=[])
        self.session = None
        self._start = state
        self.seen = seen

    def __repr__(self) -> str:
        return f"SRUppCache(seen={self.seen}, batch_size={self.batch_size})"

    @property
    def state(self) -> SRUppState | None:
        """The state fed so far, as an ``SRUppState`` (a copy), or None before anything was fed."""
        return self._start if self.session is None else self.session.state

    def feed(
        self, stack: nn.Module, input: Tensor, mask_pad: Tensor | None, all_layers: bool = False
    ) -> tuple[Tensor, ...]:
        """``stack``'s layers' outputs for ``input`` ``[T, B, hidden_size]`` (padding ``mask_pad`` ``[T, B]``),
        continuing the state fed so far (the session starts here, on the first call): ``(output,)``, the stack's
        output, or with ``all_layers`` every layer's output, the last being the stack's."""
        if self.session is None:
            self.session, self._start = stack.decoder(input.shape[1], state=self._start), None
        self.seen += input.shape[0]
        if all_layers:
            return self.session.step_layers(input, mask_pad)
        return (self.session.step(input, mask_pad),)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        if self.session is not None:
            return self.session.batch_size
        return -1 if self._start is None else self._start.c.shape[1]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.session is not None or self._start is not None

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        # Not purely linear: it also grows attention keys, so generate slices prompts by `get_seq_length`.
        return [False]

    def select(self, indices: Tensor) -> None:
        """Keep the streams ``indices`` ``[N]`` (repeats allowed): stream i goes on from stream ``indices[i]``.
        A running session reorders its own buffers (``SRUppDecoder.select``: one gather each, no copy of the
        state), so the next token takes the one-token path again."""
        if self.session is not None:
            self.session.select(indices)
        elif self._start is not None:
            self._start = self._start.select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("an SRUppCache cannot be cropped: the recurrent state does not roll back")

    def activate_past_recording(self) -> None:
        pass

    def reset(self) -> None:
        self.session, self._start, self.seen = None, None, 0


class SRUppPreTrainedModel(PreTrainedModel):
    """Loading, saving and initialisation shared by the SRU++ models."""

    config_class = SRUppConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SRULayer"]
    # Per layer (SRUStack.gradient_checkpointing): a layer's recurrence and attention are recomputed in backward.
    supports_gradient_checkpointing = True
    # A recurrent state cannot be rewound: transformers then refuses assisted (speculative) decoding.
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        # srupp's modules initialise themselves; this re-runs that for modules that from_pretrained left unloaded.
        # transformers guards the nn.init functions against loaded parameters, not the in-place tensor ops of a
        # layer's reset, so a layer with any loaded parameter is left alone.
        if isinstance(module, (SRUppLM, SRUppEncoder)):
            module.reset_parameters()
        elif isinstance(module, SRULayer):
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.reset_parameters()
        elif module is getattr(self, "score", None):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not create a DynamicCache: forward creates its SRUppCache.
        return False


def _check_ids(input_ids: object, inputs_embeds: object) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of `input_ids` [B, T] and `inputs_embeds` [B, T, hidden_size]")
    if input_ids is not None and (not isinstance(input_ids, Tensor) or input_ids.dim() != 2):
        shape = list(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must have shape [B, T], got {shape}")


def _padding(attention_mask: Tensor | None, batch: int, steps: int) -> Tensor | None:
    """``[B, T]`` bool, True at padding, from an ``attention_mask`` ``[B, L >= T]`` whose last T columns are the
    new positions; None when nothing is padded."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        shape = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"`attention_mask` must have shape [B, L] (L >= T = {steps}), got {shape}")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < steps:
        raise ValueError(
            f"`attention_mask` must have shape [B, L] with B = {batch} and L >= T = {steps}, "
            f"got {list(attention_mask.shape)}"
        )
    pad = attention_mask[:, attention_mask.shape[1] - steps :] == 0
    return pad if bool(pad.any()) else None


class SRUppForCausalLM(SRUppPreTrainedModel, GenerationMixin):
    """An :class:`srupp.models.SRUppLM` as a ``transformers`` causal LM: ``generate``, ``Trainer``,
    ``save_pretrained``/``from_pretrained`` (safetensors) and the Auto classes after ``import srupp.hf``.

    The wrapped ``SRUppLM`` is ``self.model``; its state_dict names appear under ``model.``. With adaptive
    embeddings (``cutoffs``) the logits are the adaptive softmax's log-probabilities.

    Example:
        >>> import srupp.hf
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> model = AutoModelForCausalLM.from_pretrained("exported/")
        >>> tokenizer = AutoTokenizer.from_pretrained("exported/")
        >>> ids = tokenizer("def main", return_tensors="pt").input_ids
        >>> tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0])
    """

    # With `tie_word_embeddings` the output layer shares the input embedding's weight (its bias stays its own).
    _tied_weights_keys = {"model.output.weight": "model.embedding.weight"}

    def __init__(self, config: SRUppConfig) -> None:
        super().__init__(config)
        self.model = SRUppLM(config.to_lm_config())
        self.post_init()

    @classmethod
    def from_lm(cls, lm: SRUppLM, **config_kwargs) -> SRUppForCausalLM:
        """The Hugging Face model holding a copy of ``lm``'s weights (``config_kwargs`` go to ``SRUppConfig``)."""
        if not isinstance(lm, SRUppLM):
            raise TypeError(f"`lm` must be an SRUppLM, got {type(lm).__name__}")
        parameter = next(lm.parameters())
        model = cls(SRUppConfig.from_lm_config(lm.config, **config_kwargs)).to(parameter.device, parameter.dtype)
        model.model.load_state_dict(lm.state_dict())
        model.model.set_backend(lm.rnn.backend)
        return model.train(lm.training)

    def get_input_embeddings(self) -> nn.Module:
        if self.config.cutoffs is not None:
            raise NotImplementedError("the adaptive input shares the adaptive softmax's weights: no separate embedding")
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        if self.config.cutoffs is not None:
            raise NotImplementedError("the adaptive input shares the adaptive softmax's weights: no separate embedding")
        self.model.embedding = value

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.config.cutoffs is not None else self.model.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        if self.config.cutoffs is not None:
            raise NotImplementedError("the adaptive softmax is not one output layer: it cannot be replaced")
        self.model.output = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Embedding:
        """``PreTrainedModel.resize_token_embeddings``, resizing the embedding and the output layer (tied or not)
        and keeping the wrapped model's ``LMConfig.vocab_size`` equal to ``config.vocab_size``."""
        embeddings = super().resize_token_embeddings(new_num_tokens, *args, **kwargs)
        self.model.config = dataclasses.replace(self.model.config, vocab_size=embeddings.weight.shape[0])
        return embeddings

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = inputs.get(CACHE_NAME)
        if isinstance(cache, SRUppCache) and cache.seen > 0:
            # Generated tokens are never padding and the state already knows the prompt's padding.
            inputs["attention_mask"] = None
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        cache: SRUppCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: SRUppCache | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Run the model over new positions.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, hidden_size]``).
            attention_mask: ``[B, L]`` with 1 at tokens and 0 at padding (left padding for batched prompts); L is
                T, or the cache's length plus T (as ``generate`` passes it).
            cache: an :class:`SRUppCache` to continue (``past_key_values`` is the same, its older name). Fed any
                number of new positions, it continues exactly where it stopped.
            labels: ``[B, T]`` ids; the loss is the mean cross-entropy of position t predicting ``labels[:, t+1]``,
                ignoring ``-100``.
            use_cache: return the cache (default: ``config.use_cache`` outside training, and always when a cache
                is given).
            logits_to_keep: compute the logits of only the last k positions (0: all; ignored with ``labels``).
            output_hidden_states: also return the embedding output and every layer's output, ``num_layers + 1``
                tensors ``[B, T, hidden_size]`` for the new positions (default ``config.output_hidden_states``).

        Returns:
            ``CausalLMOutputWithPast`` with ``loss``, ``logits`` ``[B, T, V]``, the cache and ``hidden_states``.
        """
        _check_ids(input_ids, inputs_embeds)
        cache = _given_cache(past_key_values if cache is None else cache)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if use_cache is None:
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        if use_cache and cache is None:
            cache = SRUppCache()
        hidden, layers = self._hidden_states(input_ids, inputs_embeds, attention_mask, cache, output_hidden_states)
        hidden = hidden.transpose(0, 1)

        loss = None
        if labels is None and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.model.scores(hidden)
        if labels is not None:
            loss = _shifted_cross_entropy(logits, labels, kwargs.get("num_items_in_batch"))
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=None if layers is None else tuple(layer.transpose(0, 1) for layer in layers),
            **{CACHE_NAME: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _hidden_states(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        attention_mask: Tensor | None,
        cache: SRUppCache | None,
        all_layers: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """``forward``'s hidden states ``[T, B, d]`` before the output layer, through ``cache`` where given (fed
        after what it holds), and with ``all_layers`` the embedding output and every layer's output (else None)."""
        lm = self.model
        ids = None if input_ids is None else input_ids.t()
        embeds = None if inputs_embeds is None else inputs_embeds.transpose(0, 1)
        steps, batch = (ids if ids is not None else embeds).shape[:2]
        pad = _padding(attention_mask, batch, steps)
        mask_pad = None if pad is None else pad.t()
        if cache is None:
            hidden, _, layers = lm.hidden_states(ids, mask_pad=mask_pad, inputs_embeds=embeds, all_layers=all_layers)
            return hidden, layers
        x = lm.dropout(lm.embed(ids) if embeds is None else embeds)
        outputs = cache.feed(lm.rnn, x, mask_pad, all_layers=all_layers)
        return lm.dropout(outputs[-1]), (x, *outputs) if all_layers else None


def _given_cache(cache: object) -> SRUppCache | None:
    """The ``cache`` (or ``past_key_values``) given to ``forward``: an ``SRUppCache``, or None for none or an empty
    generic ``Cache`` (ours takes its place); TypeError for anything else."""
    if cache is None or isinstance(cache, SRUppCache):
        return cache
    if isinstance(cache, Cache) and cache.get_seq_length() == 0:
        return None
    raise TypeError(f"`cache` must be an SRUppCache or None, got {type(cache).__name__}")


def _shifted_cross_entropy(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None) -> Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` ignoring -100 (summed and divided by
    ``num_items_in_batch`` when ``Trainer`` gives it, for gradient accumulation)."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"`labels` must have shape [B, T] = {list(logits.shape[:2])}, got {list(labels.shape)}")
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    flat_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


class SRUppEncoder(nn.Module):
    """Token embedding and an SRU++ stack (bidirectional with non-causal attention, or causal): the body of
    :class:`SRUppForSequenceClassification`, with ``SRUppLM``'s parameter names (``embedding``, ``rnn``), so the
    weights of a plain (non-adaptive) causal LM load into a causal encoder."""

    def __init__(self, config: SRUppConfig) -> None:
        super().__init__()
        lm_config = config.to_lm_config()
        self.bidirectional = config.bidirectional
        d = lm_config.hidden_size
        self.embedding = nn.Embedding(lm_config.vocab_size, d)
        self.dropout = nn.Dropout(lm_config.dropout)
        self.rnn = srupp_stack(lm_config, bidirectional=config.bidirectional)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = embedding_bound(self.embedding.embedding_dim)  # as SRUppLM's embedding
        nn.init.uniform_(self.embedding.weight, -bound, bound)

    def forward(self, input_ids: Tensor, pad: Tensor | None) -> Tensor:
        """``[B, T]`` ids and ``[B, T]`` padding -> ``[B, T, dirs*d]`` (0 at padding)."""
        x = self.dropout(self.embedding(input_ids)).transpose(0, 1)
        hidden, _ = self.rnn(x, mask_pad=None if pad is None else pad.t(), causal=not self.bidirectional)
        return self.dropout(hidden).transpose(0, 1)


class SRUppForSequenceClassification(SRUppPreTrainedModel):
    """An SRU++ encoder with a linear head on a pooled representation: ``config.bidirectional`` selects the
    bidirectional encoder (the paper's layer as a drop-in for a Transformer encoder), ``config.pooling`` the
    last non-padding position or the mean over non-padding positions.

    ``labels`` follow ``transformers``: regression for ``num_labels == 1``, else single-label (int labels) or
    multi-label (float labels) classification, or as ``config.problem_type`` says.

    Example:
        >>> config = SRUppConfig(hidden_size=64, proj_size=16, num_layers=2, bidirectional=True, num_labels=3)
        >>> model = SRUppForSequenceClassification(config)
        >>> model(input_ids, attention_mask=mask, labels=labels).loss.backward()
    """

    def __init__(self, config: SRUppConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SRUppEncoder(config)
        self.score = nn.Linear(self.model.rnn.output_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embedding = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        """Args:
            input_ids: ``[B, T]`` token ids; attention_mask: ``[B, T]`` (0 at padding, either side).
            labels: ``[B]`` class ids, ``[B]`` or ``[B, 1]`` targets (regression) or ``[B, num_labels]`` (multi-label).

        Returns: ``SequenceClassifierOutput`` with ``logits`` ``[B, num_labels]`` and ``loss``."""
        _check_ids(input_ids, None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        batch, steps = input_ids.shape
        pad = _padding(attention_mask, batch, steps)
        if attention_mask is not None and attention_mask.shape[1] != steps:
            raise ValueError(
                f"`attention_mask` must have shape [B, T] = {[batch, steps]}, got {list(attention_mask.shape)}"
            )
        hidden = self.model(input_ids, pad)
        real = torch.ones(batch, steps, dtype=torch.bool, device=hidden.device) if pad is None else ~pad
        if self.config.pooling == "mean":
            weights = real.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            # The last real position of each row, whichever side the padding is on.
            last = (real.long() * torch.arange(1, steps + 1, device=hidden.device)).argmax(dim=1)
            pooled = hidden[torch.arange(batch, device=hidden.device), last]
        logits = self.score(pooled)
        loss = None if labels is None else self._loss(logits, labels)
        output = SequenceClassifierOutput(loss=loss, logits=logits)
        return output if return_dict else output.to_tuple()

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        labels = labels.to(logits.device)
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float().reshape(logits.shape[0]))
        if problem == "single_label_classification":
            return F.cross_entropy(logits, labels.reshape(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
