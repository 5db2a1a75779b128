"""SRU++ (Lei, EMNLP 2021): SRU layers whose input transform is a small attention, with memory and decoding."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from srupp.nn.attention import SRUppAttention, SRUppProjectedLinear
from srupp.nn.sru import (
    RecurrentGates,
    check_mask_pad,
    check_probability,
    check_sequence,
    check_state,
    check_tensor,
    run_recurrence,
    variational_mask,
)


@dataclass
class SRUppState:
    """What one ``SRUpp.forward`` hands to the next segment.

    Attributes:
        c: ``[num_layers*dirs, B, hidden_size]`` last recurrent state of every layer and direction.
        memory: per layer, that layer's input ``[T, B, d_layer_in]`` for this segment (time-major),
            to be passed as ``memory`` with the next segment.
    """

    c: Tensor
    memory: list[Tensor] = field(default_factory=list)

    def detach(self) -> SRUppState:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return SRUppState(self.c.detach(), [m.detach() for m in self.memory])


@dataclass
class SRUppDecodeState:
    """The cache of ``SRUpp.step``: per layer the recurrent state and the attention keys and values.

    Attributes:
        c: ``[num_layers, B, hidden_size]``.
        keys, values: per layer ``[B, num_heads, S, proj_size/num_heads]`` for attention layers
            (S <= ``max_context``), None for layers without attention.
        max_context: how many earlier positions each new token attends to; None for all.
    """

    c: Tensor
    keys: list[Tensor | None]
    values: list[Tensor | None]
    max_context: int | None = None


class SRUppCell(nn.Module):
    """One SRU++ layer: attention (or a projected linear) computes ``U``, then the SRU recurrence.

    Args:
        input_size: features of the layer input.
        hidden_size: features of the state, per direction.
        proj_size: the attention size ``d'``.
        num_heads: attention heads.
        dropout: dropout before ``Wo`` and variational dropout on the c-term.
        attn_dropout: dropout on attention probabilities.
        bidirectional: run a second, reversed recurrence on the same ``U`` transform.
        layer_norm: LayerNorm on the transform input (pre-norm; the skip uses the raw input).
        highway_bias: initial bias of the reset gate.
        attention: use attention; otherwise ``U = Wo LayerNorm(Wq x)``.
        recurrence_dropout: c-term dropout if different from ``dropout`` (0 in the last layer).
        backend: recurrence backend, see ``srupp.ops.sru_recurrence``.

    Example:
        >>> cell = SRUppCell(16, 16, 4, num_heads=2)
        >>> h, c = cell(torch.randn(5, 2, 16), causal=True)
        >>> h.shape, c.shape
        (torch.Size([5, 2, 16]), torch.Size([1, 2, 16]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        proj_size: int,
        num_heads: int = 1,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        bidirectional: bool = False,
        layer_norm: bool = False,
        highway_bias: float = -2.0,
        attention: bool = True,
        recurrence_dropout: float | None = None,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.num_directions * hidden_size
        self.recurrence_dropout = dropout if recurrence_dropout is None else recurrence_dropout
        self.backend = backend
        # The skip is the input when widths match, else a fourth block of Wo's output.
        self.project_skip = input_size != self.output_size
        out_features = self.output_size * (4 if self.project_skip else 3)
        self.has_attention = attention
        if attention:
            self.transform: SRUppAttention | SRUppProjectedLinear = SRUppAttention(
                input_size, out_features, proj_size, num_heads, dropout, attn_dropout, **factory
            )
        else:
            self.transform = SRUppProjectedLinear(input_size, out_features, proj_size, dropout, **factory)
        self.input_norm = nn.LayerNorm(input_size, **factory) if layer_norm else None
        self.gates = RecurrentGates(hidden_size, self.num_directions, highway_bias, **factory)

    def reset_parameters(self) -> None:
        self.transform.reset_parameters()
        if self.input_norm is not None:
            self.input_norm.reset_parameters()
        self.gates.reset_parameters()

    def _recur(self, input: Tensor, u: Tensor, c0: Tensor | None, mask_pad: Tensor | None):
        skip = u[..., 3 * self.output_size :] if self.project_skip else input
        mask_c = None
        if self.training and self.recurrence_dropout > 0:
            batch = input.shape[1]
            mask_c = variational_mask(self.num_directions, batch, self.hidden_size, self.recurrence_dropout, input)
        return run_recurrence(u, skip, self.gates.weight, self.gates.bias, c0, mask_pad, mask_c, self.backend)

    def forward(
        self,
        input: Tensor,
        c0: Tensor | None = None,
        *,
        mask_pad: Tensor | None = None,
        causal: bool = False,
        memory: Tensor | None = None,
        attn_window: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Args: input ``[T, B, input_size]``; c0 ``[dirs, B, hidden_size]``; mask_pad ``[T, B]``;
        memory ``[M, B, input_size]``. Shapes are checked by ``SRUpp``.

        Returns: ``(h [T, B, dirs*hidden_size], c [dirs, B, hidden_size])``."""
        normed = input if self.input_norm is None else self.input_norm(input)
        if self.has_attention:
            if memory is not None and self.input_norm is not None:
                memory = self.input_norm(memory)
            u = self.transform(normed, mask_pad=mask_pad, causal=causal, memory=memory, attn_window=attn_window)
        else:
            u = self.transform(normed)
        return self._recur(input, u, c0, mask_pad)

    def step(self, input: Tensor, c0: Tensor, keys: Tensor | None, values: Tensor | None, max_context: int | None):
        """Causal step over a chunk ``[T, B, input_size]`` with the layer's cache; returns
        ``(h, c [1, B, hidden_size], keys, values)``."""
        normed = input if self.input_norm is None else self.input_norm(input)
        if isinstance(self.transform, SRUppAttention):
            assert keys is not None and values is not None
            u, keys, values = self.transform.step(normed, keys, values, max_context)
        else:
            u = self.transform(normed)
        h, c = self._recur(input, u, c0, None)
        return h, c, keys, values


class SRUpp(nn.Module):
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
        bidirectional: bidirectional recurrence; attention is then usually non-causal.
        batch_first: input, output and ``mask_pad`` are batch-major (state and memory stay time-major).
        layer_norm: pre-LayerNorm on every layer's transform input.
        highway_bias: initial bias of the reset (highway) gate.
        attention_every_n_layers: the paper's k.
        attention_layers: explicit 0-based indices of the attention layers (overrides k).
        backend: recurrence backend, see ``srupp.ops.sru_recurrence``.

    Example:
        >>> model = SRUpp(32, 32, 8, num_layers=2)
        >>> x = torch.randn(10, 4, 32)
        >>> out, state = model(x, causal=True)
        >>> out2, state = model(x, state.c, causal=True, memory=state.memory)
        >>> out.shape, state.c.shape
        (torch.Size([10, 4, 32]), torch.Size([2, 4, 32]))
    """

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
        highway_bias: float = -2.0,
        attention_every_n_layers: int = 1,
        attention_layers: Iterable[int] | None = None,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("proj_size", proj_size),
                            ("num_layers", num_layers), ("num_heads", num_heads)):  # fmt: skip
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if proj_size % num_heads != 0:
            raise ValueError(f"`proj_size` ({proj_size}) must be divisible by `num_heads` ({num_heads})")
        if attention_every_n_layers <= 0:
            raise ValueError(f"`attention_every_n_layers` must be positive, got {attention_every_n_layers}")
        if attention_layers is None:
            attention_layers = [i for i in range(num_layers) if (i + 1) % attention_every_n_layers == 0]
        attention_layers = tuple(sorted(set(attention_layers)))
        for index in attention_layers:
            if not 0 <= index < num_layers:
                raise ValueError(f"`attention_layers` must be indices in [0, {num_layers}), got {index}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = check_probability("dropout", dropout)
        self.attn_dropout = check_probability("attn_dropout", attn_dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.num_directions * hidden_size
        self.batch_first = batch_first
        self.layer_norm = layer_norm
        self.highway_bias = float(highway_bias)
        self.attention_every_n_layers = attention_every_n_layers
        self.attention_layers = attention_layers
        self.backend = backend
        self.layers = nn.ModuleList(
            SRUppCell(
                self.layer_input_size(i),
                hidden_size,
                proj_size,
                num_heads=num_heads,
                dropout=dropout,
                attn_dropout=attn_dropout,
                bidirectional=bidirectional,
                layer_norm=layer_norm,
                highway_bias=highway_bias,
                attention=i in attention_layers,
                recurrence_dropout=dropout if i + 1 < num_layers else 0.0,
                backend=backend,
                device=device,
                dtype=dtype,
            )
            for i in range(num_layers)
        )

    def layer_input_size(self, index: int) -> int:
        """Features of layer ``index``'s input (and of its memory)."""
        return self.input_size if index == 0 else self.output_size

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

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

    def forward(
        self,
        input: Tensor,
        state: SRUppState | Tensor | None = None,
        *,
        mask_pad: Tensor | None = None,
        causal: bool = False,
        memory: list[Tensor | None] | None = None,
        attn_window: int | None = None,
    ) -> tuple[Tensor, SRUppState]:
        """Run every layer over a segment.

        Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``).
            state: None (zeros), an ``SRUppState`` or its c ``[num_layers*dirs, B, hidden_size]``
                (ordered like ``nn.LSTM``: layer-major, then direction).
            mask_pad: ``[T, B]`` (``[B, T]`` with ``batch_first``) bool, True marks padding: padded
                positions are hidden from attention, carry c unchanged and output 0.
            causal: each position attends only to itself, earlier positions and the memory.
            memory: per layer None or ``[M, B, d_layer_in]`` (time-major): the previous segment's
                layer inputs, i.e. ``state.memory`` of the previous call. Every memory position is attended to.
            attn_window: each query sees at most this many earlier positions (memory included) and,
                without ``causal``, as many later ones: the paper's fixed-length evaluation context.

        Returns:
            ``(output [T, B, dirs*hidden_size], SRUppState)``; ``state.memory`` holds each layer's input.
        """
        check_tensor("input", input)
        x = input.transpose(0, 1) if self.batch_first and input.dim() == 3 else input
        x = check_sequence("input", x, self.input_size)
        steps, batch = x.shape[:2]
        dirs = self.num_directions
        c0 = state.c if isinstance(state, SRUppState) else state
        if c0 is not None:
            check_state("state", c0, [self.num_layers * dirs, batch, self.hidden_size])
        if mask_pad is not None:
            mask_pad = check_mask_pad(mask_pad, steps, batch, self.batch_first)
        if memory is not None:
            memory = self._check_memory(memory, batch)
        if attn_window is not None and (isinstance(attn_window, bool) or not isinstance(attn_window, int)):
            raise TypeError(f"`attn_window` must be an int or None, got {type(attn_window).__name__}")
        if attn_window is not None and attn_window < 0:
            raise ValueError(f"`attn_window` must be >= 0, got {attn_window}")
        inputs, states = [], []
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            x, c = layer(
                x,
                None if c0 is None else c0[i * dirs : (i + 1) * dirs],
                mask_pad=mask_pad,
                causal=causal,
                memory=None if memory is None else memory[i],
                attn_window=attn_window,
            )
            states.append(c)
        output = x.transpose(0, 1) if self.batch_first else x
        return output, SRUppState(torch.cat(states), inputs)

    def init_decode_state(
        self,
        batch_size: int,
        max_context: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SRUppDecodeState:
        """An empty cache for ``step``: zero c and no cached positions.

        Args:
            batch_size: B.
            max_context: earlier positions each new token attends to (a sliding window); None keeps all.
            device, dtype: of the cache; default those of the parameters.
        """
        if self.bidirectional:
            raise NotImplementedError("step-by-step decoding needs a unidirectional SRUpp")
        if max_context is not None and max_context < 0:
            raise ValueError(f"`max_context` must be >= 0 or None, got {max_context}")
        reference = next(self.parameters())
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
        c = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=dtype)
        keys: list[Tensor | None] = []
        values: list[Tensor | None] = []
        for layer in self.layers:
            if isinstance(layer.transform, SRUppAttention):
                empty = (batch_size, self.num_heads, 0, self.proj_size // self.num_heads)
                keys.append(torch.zeros(empty, device=device, dtype=dtype))
                values.append(torch.zeros(empty, device=device, dtype=dtype))
            else:
                keys.append(None)
                values.append(None)
        return SRUppDecodeState(c, keys, values, max_context)

    def step(self, input: Tensor, decode_state: SRUppDecodeState) -> tuple[Tensor, SRUppDecodeState]:
        """Causal decoding of the next token(s) with a cache: one token, or a chunk (prefill).

        The result equals ``forward(..., causal=True, attn_window=max_context)`` over everything fed
        so far, i.e. the full causal forward when the total length is at most ``max_context + 1``.

        Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``), T >= 1.
            decode_state: from ``init_decode_state`` or a previous ``step``; it is not modified.

        Returns:
            ``(output [T, B, hidden_size], new decode state)``.

        Example:
            >>> model = SRUpp(16, 16, 4).eval()
            >>> cache = model.init_decode_state(batch_size=2)
            >>> out, cache = model.step(torch.randn(3, 2, 16), cache)
            >>> out, cache = model.step(torch.randn(1, 2, 16), cache)
        """
        if self.bidirectional:
            raise NotImplementedError("step-by-step decoding needs a unidirectional SRUpp")
        if not isinstance(decode_state, SRUppDecodeState):
            raise TypeError(f"`decode_state` must be an SRUppDecodeState, got {type(decode_state).__name__}")
        check_tensor("input", input)
        x = input.transpose(0, 1) if self.batch_first and input.dim() == 3 else input
        x = check_sequence("input", x, self.input_size)
        batch = x.shape[1]
        check_state(
            "decode_state.c", decode_state.c, [self.num_layers, batch, self.hidden_size], "[num_layers, B, hidden_size]"
        )
        states, keys, values = [], [], []
        for i, layer in enumerate(self.layers):
            x, c, layer_keys, layer_values = layer.step(
                x, decode_state.c[i : i + 1], decode_state.keys[i], decode_state.values[i], decode_state.max_context
            )
            states.append(c)
            keys.append(layer_keys)
            values.append(layer_values)
        output = x.transpose(0, 1) if self.batch_first else x
        return output, SRUppDecodeState(torch.cat(states), keys, values, decode_state.max_context)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}, proj_size={self.proj_size}, num_layers={self.num_layers}"]
        defaults = {"num_heads": 1, "dropout": 0.0, "attn_dropout": 0.0, "bidirectional": False,
                    "batch_first": False, "layer_norm": False, "highway_bias": -2.0}  # fmt: skip
        parts += [
            f"{name}={getattr(self, name)}" for name, default in defaults.items() if getattr(self, name) != default
        ]
        if self.attention_layers != tuple(range(self.num_layers)):
            parts.append(f"attention_layers={self.attention_layers}")
        return ", ".join(parts)
