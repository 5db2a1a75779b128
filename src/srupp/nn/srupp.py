"""SRU++ (Lei, EMNLP 2021): SRU layers whose input transform is a small attention, with memory and decoding."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor

from srupp.nn.attention import SRUppAttention, SRUppProjectedLinear
from srupp.nn.checks import (
    check_mask_pad,
    check_probability,
    check_sequence,
    check_state,
    check_tensor,
    resolve_causal,
    zero_padding,
)
from srupp.nn.decode import SRUppDecoder
from srupp.nn.layer import HIGHWAY_BIAS, SRUStack, attention_layer_indices
from srupp.nn.state import SRUppState

Context = tuple[Tensor | None, tuple[Tensor, Tensor] | None]
# ``step`` runs longer inputs in pieces of this many positions: attention's scores and mask grow with the piece
# times the positions it attends to, so memory grows linearly with the input's length rather than with its square.
PREFILL_CHUNK = 256


class SRUpp(SRUStack):
    """SRU++: stacked SRU layers whose input transform is a small single- or multi-head attention.

    Layer i has attention iff ``(i + 1) % attention_every_n_layers == 0``, or iff ``i`` is in
    ``attention_layers`` when that is given. Other layers use ``U = Wo LayerNorm(Wq x)``.

    Args:
        input_size: features of the input.
        hidden_size: features of the recurrent state per direction (the paper's d).
        proj_size: attention size (the paper's d'), divisible by ``num_heads``.
        num_layers: stacked layers.
        num_heads: attention heads.
        dropout: dropout before each ``Wo`` and variational c-term dropout (all layers but the last).
        attn_dropout: dropout on attention probabilities.
        bidirectional: bidirectional recurrence. Attention is causal in a unidirectional SRUpp and non-causal in a
            bidirectional one, unless ``forward(causal=...)`` says otherwise.
        batch_first: input, output and ``mask_pad`` are batch-major (state and memory stay time-major).
        layer_norm: pre-LayerNorm on every layer's transform input.
        highway_bias: initial bias of the reset (highway) gate.
        attention_every_n_layers: the paper's k.
        attention_layers: explicit 0-based indices of the attention layers (overrides k).
        backend: recurrence backend, see ``srupp.ops.sru_recurrence`` (a runtime choice: ``set_backend``).

    Example:
        >>> model = SRUpp(32, 32, 8, num_layers=2)
        >>> x = torch.randn(10, 4, 32)
        >>> out, state = model(x)  # causal: unidirectional
        >>> out2, state = model(x, state)  # attends to the previous segment
        >>> out.shape, state.c.shape
        (torch.Size([10, 4, 32]), torch.Size([2, 4, 32]))
    """

    _repr_defaults = {"proj_size": None, "num_heads": 1, "attn_dropout": 0.0}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        proj_size: int,
        num_layers: int = 2,
        num_heads: int = 1,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        bidirectional: bool = False,
        batch_first: bool = False,
        layer_norm: bool = False,
        highway_bias: float = HIGHWAY_BIAS,
        attention_every_n_layers: int = 1,
        attention_layers: Iterable[int] | None = None,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, dropout, bidirectional, batch_first, layer_norm, highway_bias
        )
        for name, value in (("proj_size", proj_size), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if proj_size % num_heads != 0:
            raise ValueError(f"`proj_size` ({proj_size}) must be divisible by `num_heads` ({num_heads})")
        self.proj_size = proj_size
        self.num_heads = num_heads
        self.attn_dropout = check_probability("attn_dropout", attn_dropout)
        self.attention_every_n_layers = attention_every_n_layers
        self.attention_layers = attention_layer_indices(num_layers, attention_every_n_layers, attention_layers)
        factory = {"device": device, "dtype": dtype}
        attention = partial(
            SRUppAttention,
            proj_size=proj_size,
            num_heads=num_heads,
            dropout=dropout,
            attn_dropout=attn_dropout,
            **factory,
        )
        projected = partial(SRUppProjectedLinear, proj_size=proj_size, dropout=dropout, **factory)
        self.build_layers(lambda i: attention if i in self.attention_layers else projected, backend, **factory)

    def _check_memory(self, memory: object, batch: int) -> list[Tensor | None]:
        if not isinstance(memory, (list, tuple)):
            raise TypeError(f"`memory` must be a list of tensors (one per layer), got {type(memory).__name__}")
        if len(memory) != self.num_layers:
            raise ValueError(f"`memory` must have one entry per layer ({self.num_layers}), got {len(memory)}")
        for i, item in enumerate(memory):
            if item is None:
                continue
            check_tensor(f"memory[{i}]", item)
            size = self.layer_input_size(i)
            if item.dim() != 3 or item.shape[2] != size:
                raise ValueError(f"`memory[{i}]` must have shape [M, B, {size}], got {list(item.shape)}")
            if item.shape[1] != batch:
                raise ValueError(
                    f"`memory[{i}]` must have the input's batch size B = {batch}, got shape {list(item.shape)}"
                )
        return list(memory)

    def _check_cache(self, state: SRUppState, batch: int) -> list[tuple[Tensor, Tensor] | None]:
        caches: list[tuple[Tensor, Tensor] | None] = [None] * self.num_layers
        if state.keys is None and state.values is None:
            return caches
        for name in ("keys", "values"):
            items = getattr(state, name)
            if not isinstance(items, (list, tuple)) or len(items) != self.num_layers:
                raise ValueError(f"`state.{name}` must be a list with one entry per layer ({self.num_layers})")
        head_size = self.proj_size // self.num_heads
        for i, (keys, values) in enumerate(zip(state.keys, state.values, strict=True)):
            if keys is None and values is None:
                continue
            for name, item in ((f"state.keys[{i}]", keys), (f"state.values[{i}]", values)):
                tensor = check_tensor(name, item)
                if tensor.dim() != 4 or (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (
                    batch,
                    self.num_heads,
                    head_size,
                ):
                    raise ValueError(
                        f"`{name}` must have shape [B, num_heads, S, proj_size/num_heads] = "
                        f"[{batch}, {self.num_heads}, S, {head_size}], got {list(tensor.shape)}"
                    )
            if keys.shape != values.shape:
                raise ValueError(f"`state.keys[{i}]` and `state.values[{i}]` must have the same shape")
            caches[i] = (keys, values)
        return caches

    def _context(self, state: SRUppState | None, memory: object, batch: int) -> list[Context]:
        """Per layer the earlier positions to attend to: ``(memory, (keys, values))``, each None if absent."""
        if state is None:
            caches: list[tuple[Tensor, Tensor] | None] = [None] * self.num_layers
        else:
            if memory is not None and state.memory is not None:
                raise ValueError("give the memory once: `state.memory` or `memory`, not both")
            memory = state.memory if memory is None else memory
            caches = self._check_cache(state, batch)
        memory = [None] * self.num_layers if memory is None else self._check_memory(memory, batch)
        for i, (item, cache) in enumerate(zip(memory, caches, strict=True)):
            if item is not None and cache is not None:
                raise ValueError(f"layer {i} has both a memory and a key/value cache in its state; keep one")
        return list(zip(memory, caches, strict=True))

    def _key_pad(self, state: SRUppState | None, context: list[Context], batch: int) -> tuple[Tensor | None, int]:
        """``state.key_pad`` checked against the earlier positions of ``context``, and their number S."""
        present = [(item, cache) for item, cache in context if item is not None or cache is not None]
        lengths = {item.shape[0] if item is not None else cache[0].shape[2] for item, cache in present}
        length = max(lengths, default=0)
        key_pad = None if state is None else state.key_pad
        if key_pad is None:
            return None, length
        check_tensor("state.key_pad", key_pad)
        if key_pad.dtype != torch.bool:
            raise TypeError(f"`state.key_pad` must be a bool tensor (True = padding), got dtype {key_pad.dtype}")
        if len(lengths) != 1 or list(key_pad.shape) != [batch, length]:
            raise ValueError(
                f"`state.key_pad` must have shape [B, S] = [{batch}, {sorted(lengths) or 'no memory or cache'}] "
                f"(S: earlier positions in the memory or cache), got {list(key_pad.shape)}"
            )
        return key_pad, length

    def forward(
        self,
        input: Tensor,
        state: SRUppState | Tensor | None = None,
        *,
        mask_pad: Tensor | None = None,
        causal: bool | None = None,
        memory: list[Tensor | None] | None = None,
        attn_window: int | None = None,
    ) -> tuple[Tensor, SRUppState]:
        """Run every layer over a segment.

        Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``).
            state: None (zeros), the ``SRUppState`` of the previous call (``forward`` or ``step``), read whole:
                c, and the memory or key/value cache each attention layer attends to; or just c
                ``[num_layers*dirs, B, hidden_size]`` (ordered like ``nn.LSTM``: layer-major, then direction).
            mask_pad: ``[T, B]`` (``[B, T]`` with ``batch_first``) bool, True marks padding: padded
                positions are hidden from attention, carry c unchanged, output 0 and cannot affect real
                outputs (even when they hold NaN).
            causal: each position attends only to itself, earlier positions and the memory. None (the default)
                means causal for a unidirectional SRUpp and non-causal for a bidirectional one; pass
                ``causal=False`` to let a unidirectional encoder see later positions.
            memory: per layer None or ``[M, B, d_layer_in]`` (time-major): the same as ``state.memory``, for
                a state given as a tensor or without memory (an error when ``state.memory`` is set too).
                Every memory position is attended to, but those ``state.key_pad`` marks as padding.
            attn_window: each query sees at most this many earlier positions (memory included) and,
                without ``causal``, as many later ones: the paper's fixed-length evaluation context.

        Returns:
            ``(output [T, B, dirs*hidden_size], SRUppState)``; its ``memory`` holds each attention layer's
            input of this segment, for the next call, and its ``key_pad`` the transposed ``mask_pad``.
        """
        if state is not None and not isinstance(state, (SRUppState, Tensor)):
            raise TypeError(f"`state` must be an SRUppState, a tensor or None, got {type(state).__name__}")
        full_state = state if isinstance(state, SRUppState) else None
        c0 = state.c if full_state is not None else state
        x, mask_pad = self._check_input(input, c0, mask_pad)
        context = self._context(full_state, memory, x.shape[1])
        if attn_window is not None and (isinstance(attn_window, bool) or not isinstance(attn_window, int)):
            raise TypeError(f"`attn_window` must be an int or None, got {type(attn_window).__name__}")
        if attn_window is not None and attn_window < 0:
            raise ValueError(f"`attn_window` must be >= 0, got {attn_window}")
        key_pad, _ = self._key_pad(full_state, context, x.shape[1])
        output, c, inputs = self._run(
            x,
            c0,
            lambda i: {"memory": context[i][0], "cache": context[i][1], "memory_pad": key_pad},
            mask_pad=mask_pad,
            causal=resolve_causal(causal, self.bidirectional),
            attn_window=attn_window,
        )
        memory = [x if layer.has_attention else None for x, layer in zip(inputs, self.layers, strict=True)]
        max_context = None if full_state is None else full_state.max_context
        key_pad = mask_pad.t() if mask_pad is not None and self.attention_layers else None
        return output, SRUppState(c, memory, max_context=max_context, key_pad=key_pad)

    def init_decode_state(
        self,
        batch_size: int,
        max_context: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SRUppState:
        """An empty state for ``step`` (or ``forward``): zero c and empty key/value caches (no earlier positions).

        Args:
            batch_size: B.
            max_context: earlier positions each new token attends to in ``step`` (a sliding window); None
                keeps all.
            device, dtype: of the state; default those of the parameters.
        """
        if self.bidirectional:
            raise NotImplementedError("step-by-step decoding needs a unidirectional SRUpp")
        if max_context is not None and max_context < 0:
            raise ValueError(f"`max_context` must be >= 0 or None, got {max_context}")
        reference = next(self.parameters())
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
        c = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=dtype)
        head_size = self.proj_size // self.num_heads
        empty = [
            c.new_empty(batch_size, self.num_heads, 0, head_size) if layer.has_attention else None
            for layer in self.layers
        ]
        return SRUppState(c, keys=empty, values=list(empty), max_context=max_context)

    def decoder(self, batch_size: int, max_context: int | None = None, state: SRUppState | None = None):
        """A decoding session (:class:`srupp.nn.decode.SRUppDecoder`) of ``batch_size`` streams: it keeps the
        caches in preallocated buffers and decodes one token per call without copying them (the compiled CPU
        kernel, where it applies). ``max_context`` bounds the cache (a sliding window); ``state`` continues an
        ``SRUppState`` (from ``forward``, ``step`` or ``init_decode_state``).

        Example:
            >>> session = model.eval().decoder(batch_size=2)
            >>> out = session.step(torch.randn(5, 2, model.input_size))  # prefill
            >>> out = session.step(torch.randn(1, 2, model.input_size))  # one token
        """
        return SRUppDecoder(self, batch_size, max_context, state)

    def step(self, input: Tensor, state: SRUppState, *, mask_pad: Tensor | None = None) -> tuple[Tensor, SRUppState]:
        """Causal decoding of the next token(s) with a key/value cache: one token, or a chunk (prefill).

        The result equals ``forward(..., causal=True, attn_window=max_context)`` over everything fed
        so far, i.e. the full causal forward when the total length is at most ``max_context + 1``. A state
        from ``forward`` continues too: its memory becomes the cache. This is the general, functional path:
        it copies the cache into the state it returns. Long inputs run in pieces of ``PREFILL_CHUNK`` positions,
        so that memory grows linearly with their length (and stays bounded with ``max_context``); a decoding
        loop is faster with a session, ``decoder()``.

        Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``), T >= 1.
            state: from ``init_decode_state``, ``step`` or ``forward``; it is not modified.
            mask_pad: ``[T, B]`` (``[B, T]`` with ``batch_first``) bool, True marks padding (e.g. the left padding
                of batched prompts): as in ``forward`` it carries c unchanged and outputs 0, and the state's
                ``key_pad`` keeps it hidden from every later token.

        Returns:
            ``(output [T, B, hidden_size], next state)``; the state holds c and each attention layer's cache.

        Example:
            >>> model = SRUpp(16, 16, 4).eval()
            >>> state = model.init_decode_state(batch_size=2)
            >>> out, state = model.step(torch.randn(3, 2, 16), state)
            >>> out, state = model.step(torch.randn(1, 2, 16), state)
        """
        outputs, state = self._step(input, state, mask_pad, all_layers=False)
        return outputs[-1], state

    def step_layers(
        self, input: Tensor, state: SRUppState, *, mask_pad: Tensor | None = None
    ) -> tuple[tuple[Tensor, ...], SRUppState]:
        """``step``, returning every layer's output: ``(num_layers tensors shaped as step's output, the last being
        it; the next state)``."""
        return self._step(input, state, mask_pad, all_layers=True)

    def _step(
        self, input: Tensor, state: SRUppState, mask_pad: Tensor | None, all_layers: bool
    ) -> tuple[tuple[Tensor, ...], SRUppState]:
        """``step``'s work: every layer's output (only the last one's without ``all_layers``) and the next state."""
        if self.bidirectional:
            raise NotImplementedError("step-by-step decoding needs a unidirectional SRUpp")
        if not isinstance(state, SRUppState):
            raise TypeError(f"`state` must be an SRUppState, got {type(state).__name__}")
        check_tensor("input", input)
        x = input.transpose(0, 1) if self.batch_first and input.dim() == 3 else input
        x = check_sequence("input", x, self.input_size)
        steps, batch = x.shape[:2]
        check_state("state.c", state.c, [self.num_layers, batch, self.hidden_size], "[num_layers, B, hidden_size]")
        if mask_pad is not None:
            mask_pad = check_mask_pad(mask_pad, steps, batch, self.batch_first)
            x = zero_padding(x, mask_pad)
        pieces = []  # per piece, every layer's output
        for start in range(0, steps, PREFILL_CHUNK):
            piece = x[start : start + PREFILL_CHUNK]
            pad = None if mask_pad is None else mask_pad[start : start + PREFILL_CHUNK]
            layers, state = self._step_piece(piece, state, pad)
            pieces.append(layers if all_layers else layers[-1:])

        def join(parts: tuple[Tensor, ...]) -> Tensor:
            joined = parts[0] if len(parts) == 1 else torch.cat(parts)
            return joined.transpose(0, 1) if self.batch_first else joined

        return tuple(join(parts) for parts in zip(*pieces, strict=True)), state

    def _step_piece(self, x: Tensor, state: SRUppState, mask_pad: Tensor | None) -> tuple[list[Tensor], SRUppState]:
        """``step`` over checked time-major input ``[T, B, input_size]`` and its padding ``[T, B]``: every layer's
        output and the next state."""
        steps, batch = x.shape[:2]
        context = self._context(state, None, batch)
        key_pad, earlier = self._key_pad(state, context, batch)
        if (mask_pad is not None or key_pad is not None) and self.attention_layers:
            chunk = x.new_zeros(batch, steps, dtype=torch.bool) if mask_pad is None else mask_pad.t()
            key_pad = torch.cat([chunk.new_zeros(batch, earlier) if key_pad is None else key_pad, chunk], dim=1)
        outputs, states, keys, values = [], [], [], []
        for i, layer in enumerate(self.layers):
            x, c, cache = layer.step(x, state.c[i : i + 1], *context[i], state.max_context, mask_pad, key_pad)
            outputs.append(x)
            states.append(c)
            keys.append(None if cache is None else cache[0])
            values.append(None if cache is None else cache[1])
        if key_pad is not None and state.max_context is not None:
            key_pad = key_pad[:, key_pad.shape[1] - min(state.max_context, key_pad.shape[1]) :]
        return outputs, SRUppState(
            torch.cat(states), keys=keys, values=values, max_context=state.max_context, key_pad=key_pad
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.attention_layers != tuple(range(self.num_layers)):
            text += f", attention_layers={self.attention_layers}"
        return text
