"""SRU++ language model: embedding -> dropout -> SRUpp -> dropout -> output, with segment-level recurrence."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srupp.models.config import LMConfig
from srupp.models.decode import SRUppLMDecoder, check_token_ids
from srupp.nn import SRUpp, SRUppState


def srupp_stack(config: LMConfig, *, bidirectional: bool = False, backend: str = "auto", device=None, dtype=None):
    """The ``SRUpp`` stack an ``LMConfig`` describes (width ``hidden_size`` in and out), for the LM and its
    Hugging Face encoder."""
    d = config.hidden_size
    return SRUpp(
        d,
        d,
        config.proj_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        dropout=config.dropout,
        attn_dropout=config.attn_dropout,
        bidirectional=bidirectional,
        layer_norm=config.layer_norm,
        highway_bias=config.highway_bias,
        attention_every_n_layers=config.attention_every_n_layers,
        attention_layers=config.attention_layers,
        backend=backend,
        device=device,
        dtype=dtype,
    )


def embedding_bound(hidden_size: int) -> float:
    """Embeddings and softmax rows start as U(-b, b) with b = sqrt(3 / d): the authors' LM scripts."""
    return math.sqrt(3.0 / hidden_size)


class SRUppLM(nn.Module):
    """A causal SRU++ language model (Lei 2021): byte-level with a plain embedding and output layer, or
    word-level with a tied adaptive input and ``nn.AdaptiveLogSoftmaxWithLoss`` when ``config.cutoffs`` is set.

    Segment-level recurrence: ``forward`` returns a state holding each layer's final ``c`` and its input for
    this segment (the next segment's attention memory), detached; pass it back with the next segment.

    Args:
        config: the architecture (:class:`LMConfig`).
        backend: recurrence backend (see ``srupp.ops.sru_recurrence``): a runtime choice, not saved with the
            model; change it later with ``set_backend``.
        device, dtype: of the parameters.

    Example:
        >>> model = SRUppLM(LMConfig(hidden_size=32, proj_size=8, num_layers=2))
        >>> tokens = torch.randint(0, 256, (16, 4))
        >>> nll, state = model(tokens[:-1], targets=tokens[1:])  # nll [15, 4]
        >>> nll, state = model(tokens[:-1], state, targets=tokens[1:])
    """

    def __init__(
        self,
        config: LMConfig,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"`config` must be an LMConfig, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        d = config.hidden_size
        if config.adaptive:
            # Transformer-XL style (authors' WT103): d -> embed_size, then a head and clusters of shrinking width.
            self.projection = nn.Linear(d, config.embed_size, bias=False, **factory) if config.embed_size else None
            self.softmax = nn.AdaptiveLogSoftmaxWithLoss(
                config.adaptive_size, config.vocab_size, config.cutoffs, div_value=config.div_value, **factory
            )
            self.emb_dropout = nn.Dropout(config.emb_dropout)
        else:
            self.embedding = nn.Embedding(config.vocab_size, d, **factory)
            self.output = nn.Linear(d, config.vocab_size, **factory)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = srupp_stack(config, backend=backend, **factory)
        self.reset_parameters()

    def set_backend(self, name: str) -> None:
        """Run the recurrence of every layer on backend ``name`` (see ``srupp.ops.sru_recurrence``)."""
        self.rnn.set_backend(name)

    def reset_parameters(self) -> None:
        # Embedding and softmax init U(+-sqrt(3/d)), projections xavier: the authors' LM scripts.
        bound = embedding_bound(self.config.hidden_size)
        with torch.no_grad():
            if self.config.adaptive:
                if self.projection is not None:
                    nn.init.xavier_uniform_(self.projection.weight)
                nn.init.uniform_(self.softmax.head.weight, -bound, bound)
                for cluster in self.softmax.tail:
                    nn.init.xavier_uniform_(cluster[0].weight)
                    nn.init.uniform_(cluster[1].weight, -bound, bound)
            else:
                nn.init.uniform_(self.embedding.weight, -bound, bound)
                nn.init.uniform_(self.output.weight, -bound, bound)
                nn.init.zeros_(self.output.bias)

    def embed(self, tokens: Tensor) -> Tensor:
        """``[T, B]`` token ids -> ``[T, B, d]``. The adaptive input reuses the softmax's weights: head tokens
        take their head row, tail tokens their cluster row times the cluster projection, and both go back to
        d through the transposed ``embed_size`` projection (all tied)."""
        if not self.config.adaptive:
            # F.embedding, not the module call: decoding pays the module's call overhead on every token.
            return F.embedding(tokens, self.embedding.weight)
        head = self.softmax.head.weight
        out = torch.zeros(*tokens.shape, head.shape[1], device=tokens.device, dtype=head.dtype)
        edges = [0, *self.config.cutoffs, self.config.vocab_size]
        for i, (low, high) in enumerate(zip(edges, edges[1:], strict=False)):
            where = (tokens >= low) & (tokens < high)
            if not where.any():
                continue
            ids = tokens[where] - low
            if i == 0:
                vectors = F.embedding(ids, head[: self.config.cutoffs[0]])
            else:
                projection, weight = self.softmax.tail[i - 1][0].weight, self.softmax.tail[i - 1][1].weight
                vectors = self.emb_dropout(F.embedding(ids, weight)) @ projection
            out[where] = vectors.to(out.dtype)
        return out if self.projection is None else out @ self.projection.weight

    def hidden_states(
        self,
        input: Tensor | None,
        state: SRUppState | None = None,
        *,
        mask_pad: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attn_window: int | None = None,
        all_layers: bool = False,
    ) -> tuple[Tensor, SRUppState, tuple[Tensor, ...] | None]:
        """The body of ``forward``: embedding, dropout, the causal stack and dropout, before the output layer.

        Args:
            input: ``[T, B]`` token ids, or None with ``inputs_embeds`` ``[T, B, d]`` (vectors in place of
                the embedding's).
            state, attn_window: as in ``forward``.
            mask_pad: ``[T, B]`` bool, True at padding (see ``SRUpp.forward``).
            all_layers: also return the stack's input and every layer's output.

        Returns:
            ``(hidden [T, B, d], state (not detached), None or num_layers + 1 tensors [T, B, d])``.
        """
        if inputs_embeds is None:
            check_token_ids(input)
        if state is not None and not isinstance(state, SRUppState):
            raise TypeError(
                f"`state` must be the SRUppState of the previous segment or None, got {type(state).__name__}"
            )
        x = self.dropout(self.embed(input) if inputs_embeds is None else inputs_embeds)
        outputs = [x] if all_layers else None
        # Forward hooks see each layer's output as the stack computes it (also under per-layer checkpointing).
        hooks = [
            layer.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
            for layer in (self.rnn.layers if all_layers else ())
        ]
        try:
            hidden, new_state = self.rnn(x, state, mask_pad=mask_pad, causal=True, attn_window=attn_window)
        finally:
            for hook in hooks:
                hook.remove()
        return self.dropout(hidden), new_state, None if outputs is None else tuple(outputs)

    def scores(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` hidden states -> ``[..., V]`` float32 logits (log-probabilities for the adaptive softmax,
        which has no logits of its own)."""
        return self.log_probs(hidden) if self.config.adaptive else self.output(hidden).float()

    def _adaptive_input(self, hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return flat if self.projection is None else self.projection(flat)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` hidden states -> ``[..., V]`` log-probabilities (float32)."""
        if self.config.adaptive:
            return self.softmax.log_prob(self._adaptive_input(hidden)).float().reshape(*hidden.shape[:-1], -1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = F.log_softmax(F.linear(flat, self.output.weight, self.output.bias).float(), dim=-1)
        return out.reshape(*hidden.shape[:-1], -1)

    def nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Per-token negative log-likelihood in nats, ``[T, B]``, float32."""
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if self.config.adaptive:
            out = -self.softmax(self._adaptive_input(hidden), flat_targets).output
        else:
            out = F.cross_entropy(self.output(flat).float(), flat_targets, reduction="none")
        return out.float().reshape(targets.shape)

    def forward(
        self,
        input: Tensor,
        state: SRUppState | None = None,
        *,
        targets: Tensor | None = None,
        attn_window: int | None = None,
    ) -> tuple[Tensor, SRUppState]:
        """Run one segment.

        Args:
            input: ``[T, B]`` token ids.
            state: the state returned for the previous segment of the same streams (None at the start).
            targets: ``[T, B]`` next-token ids; when given the per-token loss is returned instead of log-probs.
            attn_window: each position attends to at most this many previous positions (a sliding window over
                memory and segment, the paper's ``same_length`` evaluation); None attends to all of both.

        Returns:
            ``(nll [T, B], state)`` with ``targets``, else ``(log_probs [T, B, V], state)``; the state is detached.
        """
        hidden, new_state, _ = self.hidden_states(input, state, attn_window=attn_window)
        new_state = new_state.detach()
        if targets is None:
            return self.log_probs(hidden), new_state
        if targets.shape != input.shape:
            raise ValueError(f"`targets` must have shape [T, B] = {list(input.shape)}, got {list(targets.shape)}")
        return self.nll(hidden, targets), new_state

    def init_decode_state(self, batch_size: int, max_context: int | None = None) -> SRUppState:
        """An empty state for ``batch_size`` streams (``step`` keeps at most ``max_context`` cached positions)."""
        return self.rnn.init_decode_state(batch_size, max_context=max_context)

    def decoder(self, batch_size: int, max_context: int | None = None, state: SRUppState | None = None):
        """A decoding session (:class:`srupp.models.decode.SRUppLMDecoder`): token ids in, log-probabilities out,
        one token per call without copying the caches (see ``SRUpp.decoder``).

        Example:
            >>> session = model.eval().decoder(batch_size=1, max_context=512)
            >>> with torch.no_grad():
            ...     log_probs = session.step(prompt[:, None])  # prefill, [P, 1] ids
            ...     log_probs = session.step(log_probs.argmax(-1)[None])  # one token
        """
        return SRUppLMDecoder(self, batch_size, max_context, state)

    def step(self, tokens: Tensor, state: SRUppState) -> tuple[Tensor, SRUppState]:
        """Feed ``[T_chunk, B]`` tokens through the cached decoding path (``SRUpp.step``: general and functional;
        a decoding loop is faster with a session, ``decoder()``).

        Args:
            tokens: ``[T_chunk, B]`` token ids.
            state: from ``init_decode_state``, ``step`` or ``forward`` (decoding then continues that segment).

        Returns:
            ``(log_probs [B, V] for the chunk's last position, state)``; equal to the causal forward.
        """
        check_token_ids(tokens)
        hidden, state = self.rnn.step(self.embed(tokens), state)
        return self.log_probs(hidden[-1]), state

    def extra_repr(self) -> str:
        kind = f"adaptive cutoffs={self.config.cutoffs}" if self.config.adaptive else "byte/plain softmax"
        return f"vocab_size={self.config.vocab_size}, {kind}"
