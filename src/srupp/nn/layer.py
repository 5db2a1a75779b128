"""The one recurrence layer of SRU and SRU++ (an input transform, then the elementwise recurrence), the stack
both build on, and the checks and rules they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from srupp.nn.attention import project
from srupp.nn.checks import (
    check_mask_pad,
    check_probability,
    check_sequence,
    check_state,
    check_tensor,
    resolve_causal,
    zero_padding,
)
from srupp.ops import sru_recurrence

HIGHWAY_BIAS = -2.0
"""Default initial bias of the reset (highway) gate: the authors' ``highway_bias`` in their LM runs."""


def attention_layer_indices(
    num_layers: int, attention_every_n_layers: int = 1, attention_layers: Iterable[int] | None = None
) -> tuple[int, ...]:
    """Which layers (0-based) of an SRU++ stack have attention: ``attention_layers`` when given, else every
    layer i with ``(i + 1) % attention_every_n_layers == 0`` (the paper's k). Sorted, without repeats."""
    if attention_every_n_layers <= 0:
        raise ValueError(f"`attention_every_n_layers` must be positive, got {attention_every_n_layers}")
    if attention_layers is None:
        return tuple(i for i in range(num_layers) if (i + 1) % attention_every_n_layers == 0)
    indices = tuple(sorted(set(attention_layers)))
    for index in indices:
        if not 0 <= index < num_layers:
            raise ValueError(f"`attention_layers` must be indices in [0, {num_layers}), got {index}")
    return indices


def variational_mask(num_directions: int, batch: int, hidden: int, p: float, like: Tensor) -> Tensor:
    """One Bernoulli mask per sequence and feature, constant over time, scaled by 1/(1-p)."""
    keep = torch.full((num_directions, batch, hidden), 1.0 - p, dtype=torch.float32, device=like.device)
    return torch.bernoulli(keep).div_(1.0 - p)


def linear_transform(
    input_size: int, output_size: int, projection_size: int = 0, *, device=None, dtype=None
) -> nn.Module:
    """The SRU transform ``U = W x``: one Linear, or ``W = W2 W1`` through ``projection_size`` when > 0."""
    factory = {"device": device, "dtype": dtype}
    if projection_size > 0:
        transform: nn.Module = nn.Sequential(
            nn.Linear(input_size, projection_size, bias=False, **factory),
            nn.Linear(projection_size, output_size, bias=False, **factory),
        )
    else:
        transform = nn.Linear(input_size, output_size, bias=False, **factory)
    reset_linear_transform(transform)
    return transform


def reset_linear_transform(transform: nn.Module) -> None:
    # Xavier-uniform W: the authors' SRUCell.reset_parameters.
    for module in transform.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)


def autocast_input(x: Tensor) -> Tensor:
    """A float32 input in autocast's dtype where autocast is on for its device, else as it is: converted once
    here, where the first layer would convert it twice (autocast for its transform's matmul, the recurrence for
    its skip), and every layer after reads the one before's 16-bit output as it is."""
    device = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return x
    return x.to(torch.get_autocast_dtype(device))


class RecurrentGates(nn.Module):
    """The recurrence parameters of one layer: v and b of each direction."""

    def __init__(self, hidden_size: int, num_directions: int, highway_bias: float, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.highway_bias = float(highway_bias)
        # [direction, (forget, reset), hidden]: the op's v = (v_f, v_r) and b = (b_f, b_r) per direction.
        self.weight = nn.Parameter(torch.empty(num_directions, 2, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_directions, 2, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # v ~ U(-1, 1), forget bias 0, reset bias = highway_bias: the authors' SRUCell.reset_parameters.
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.bias[:, 0].zero_()
            self.bias[:, 1].fill_(self.highway_bias)


class SRULayer(nn.Module):
    """One SRU layer over a whole sequence (time-major): an input transform computes ``U``, then the
    elementwise recurrence of each direction runs over it.

    The transform is a plain or low-rank Linear (SRU), the projected linear ``Wo LayerNorm(Wq x)`` or the
    attention of SRU++. Per direction ``U`` holds the candidate, forget and reset pre-activations; the highway
    skip is the input itself when ``input_size == num_directions * hidden_size``, else a fourth block of ``U``.

    Args:
        input_size: features of the input.
        hidden_size: features of the state, per direction.
        transform: builds the (initialised) transform from ``(input_size, features of U)``.
        bidirectional: run a second, reversed recurrence on the same ``U``; outputs are concatenated.
        layer_norm: LayerNorm on the transform input (pre-norm; the skip uses the raw input).
        highway_bias: initial bias of the reset (highway) gate.
        dropout: variational dropout on the c-term of ``h`` (one mask per sequence, training only).
        backend: recurrence backend, see ``srupp.ops.sru_recurrence``.

    Example:
        >>> layer = SRULayer(16, 8, linear_transform)
        >>> h, c = layer(torch.randn(5, 2, 16))
        >>> h.shape, c.shape
        (torch.Size([5, 2, 8]), torch.Size([1, 2, 8]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        transform: Callable[[int, int], nn.Module],
        *,
        bidirectional: bool = False,
        layer_norm: bool = False,
        highway_bias: float = HIGHWAY_BIAS,
        dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"`input_size` and `hidden_size` must be positive, got {input_size}, {hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.num_directions * hidden_size
        self.dropout = check_probability("dropout", dropout)
        self.backend = backend
        self.project_skip = input_size != self.output_size
        self.transform = transform(input_size, self.output_size * (4 if self.project_skip else 3))
        # A transform that attends to earlier positions (SRU++'s attention) gets the memory or cache.
        self.has_attention = bool(getattr(self.transform, "attends", False))
        self.input_norm = nn.LayerNorm(input_size, **factory) if layer_norm else None
        # Every part initialises itself on construction.
        self.gates = RecurrentGates(hidden_size, self.num_directions, highway_bias, **factory)

    def reset_parameters(self) -> None:
        if isinstance(self.transform, (nn.Linear, nn.Sequential)):
            reset_linear_transform(self.transform)
        else:
            self.transform.reset_parameters()
        if self.input_norm is not None:
            self.input_norm.reset_parameters()
        self.gates.reset_parameters()

    def _norm(self, input: Tensor) -> Tensor:
        return input if self.input_norm is None else self.input_norm(input)

    def forward(
        self,
        input: Tensor,
        c0: Tensor | None = None,
        *,
        mask_pad: Tensor | None = None,
        causal: bool | None = None,
        memory: Tensor | None = None,
        cache: tuple[Tensor, Tensor] | None = None,
        attn_window: int | None = None,
        memory_pad: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Args: input ``[T, B, input_size]``; c0 ``[dirs, B, hidden_size]``; mask_pad ``[T, B]`` bool (True =
        padding); for an attention transform, ``memory`` ``[M, B, input_size]`` or its ``cache`` of keys and
        values, ``causal`` (None: causal iff unidirectional, see ``resolve_causal``), ``attn_window`` and
        ``memory_pad`` (see ``SRUppAttention``). Shapes are checked by the stacks.

        Returns: ``(h [T, B, dirs*hidden_size], c [dirs, B, hidden_size])``."""
        # A NaN or inf in a padded position must not reach real outputs through U or the skip.
        input = zero_padding(input, mask_pad)
        normed = self._norm(input)
        if self.has_attention:
            memory = None if memory is None else self._norm(memory)
            causal = resolve_causal(causal, self.num_directions == 2)
            u = self.transform(
                normed,
                mask_pad=mask_pad,
                causal=causal,
                memory=memory,
                cache=cache,
                attn_window=attn_window,
                memory_pad=memory_pad,
            )
        else:
            u = project(self.transform, normed)
        return self._recur(input, u, c0, mask_pad)

    def step(
        self,
        input: Tensor,
        c0: Tensor,
        memory: Tensor | None,
        cache: tuple[Tensor, Tensor] | None,
        max_context: int | None,
        mask_pad: Tensor | None = None,
        key_pad: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Causal step over a chunk ``[T, B, input_size]``, attending to the ``memory`` (layer inputs) or the
        ``cache`` of keys and values; ``mask_pad`` ``[T, B]`` marks padding in the chunk and ``key_pad``
        ``[B, S + T]`` the padded keys. Returns ``(h, c [1, B, hidden_size], extended cache or None)``."""
        input = zero_padding(input, mask_pad)
        normed = self._norm(input)
        if self.has_attention:
            memory = None if memory is None else self._norm(memory)
            u, cache = self.transform.step(normed, cache, max_context, key_pad, memory)
        else:
            u = project(self.transform, normed)
        h, c = self._recur(input, u, c0, mask_pad)
        return h, c, cache

    def _recur(self, input: Tensor, u: Tensor, c0: Tensor | None, mask_pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """Each direction's recurrence over its planar block of ``U``."""
        hidden, batch = self.hidden_size, input.shape[1]
        skip = u[..., 3 * self.output_size :] if self.project_skip else input
        mask_c = None
        if self.training and self.dropout > 0:
            mask_c = variational_mask(self.num_directions, batch, hidden, self.dropout, input)
        outputs, states = [], []
        for direction in range(self.num_directions):
            h, c = sru_recurrence(
                u[..., 3 * hidden * direction : 3 * hidden * (direction + 1)],
                skip[..., hidden * direction : hidden * (direction + 1)],
                self.gates.weight[direction],
                self.gates.bias[direction],
                None if c0 is None else c0[direction],
                mask_pad=mask_pad,
                mask_c=None if mask_c is None else mask_c[direction],
                reverse=direction == 1,
                backend=self.backend,
            )
            outputs.append(h)
            states.append(c)
        if self.num_directions == 1:
            return outputs[0], states[0].unsqueeze(0)
        return torch.cat(outputs, dim=-1), torch.stack(states)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.num_directions == 2:
            parts.append("bidirectional=True")
        if self.input_norm is not None:
            parts.append("layer_norm=True")
        if self.gates.highway_bias != HIGHWAY_BIAS:
            parts.append(f"highway_bias={self.gates.highway_bias}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        return ", ".join(parts)


class SRUStack(nn.Module):
    """What ``SRU`` and ``SRUpp`` share: a stack of ``SRULayer``s with the ``nn.LSTM`` conventions.

    Subclasses build their layers (``build_layers``) and their own ``forward``; this class checks the inputs,
    runs the layers and prints the non-default arguments.
    """

    _repr_defaults: dict[str, object] = {}
    # Per-layer activation checkpointing in training (the name and the `_gradient_checkpointing_func` that
    # transformers' `gradient_checkpointing_enable` sets on every module that has this attribute).
    gradient_checkpointing: bool = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        bidirectional: bool,
        batch_first: bool,
        layer_norm: bool,
        highway_bias: float,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.num_directions * hidden_size
        self.batch_first = batch_first
        self.layer_norm = layer_norm
        self.highway_bias = float(highway_bias)
        self.layers = nn.ModuleList()

    def layer_input_size(self, index: int) -> int:
        """Features of layer ``index``'s input (and of its memory)."""
        return self.input_size if index == 0 else self.output_size

    def layer_dropout(self, index: int) -> float:
        """The c-term dropout of layer ``index``: ``dropout`` in every layer but the last."""
        return self.dropout if index + 1 < self.num_layers else 0.0

    def build_layers(
        self, transform_of: Callable[[int], Callable[[int, int], nn.Module]], backend: str, device=None, dtype=None
    ) -> None:
        """Append the ``num_layers`` ``SRULayer``s; layer ``i``'s input transform is ``transform_of(i)``."""
        self.layers.extend(
            SRULayer(
                self.layer_input_size(i),
                self.hidden_size,
                transform_of(i),
                bidirectional=self.bidirectional,
                layer_norm=self.layer_norm,
                highway_bias=self.highway_bias,
                dropout=self.layer_dropout(i),
                backend=backend,
                device=device,
                dtype=dtype,
            )
            for i in range(self.num_layers)
        )

    @property
    def backend(self) -> str:
        """The recurrence backend of the layers (see ``srupp.ops.sru_recurrence``)."""
        return self.layers[0].backend

    def set_backend(self, name: str) -> None:
        """Run every layer's recurrence on backend ``name`` (``"auto"``, ``"naive"``, ``"cpu"``, ``"triton"``):
        a runtime choice, not saved in the state_dict."""
        if not isinstance(name, str):
            raise TypeError(f"`name` must be a backend name (str), got {type(name).__name__}")
        for layer in self.layers:
            layer.backend = name

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def _check_input(self, input: object, c0: Tensor | None, mask_pad: object) -> tuple[Tensor, Tensor | None]:
        """The time-major input and mask, with the shapes of input, c0 and mask checked."""
        check_tensor("input", input)
        x = input.transpose(0, 1) if self.batch_first and input.dim() == 3 else input
        x = check_sequence("input", x, self.input_size)
        steps, batch = x.shape[:2]
        if c0 is not None:
            check_state("state", c0, [self.num_layers * self.num_directions, batch, self.hidden_size])
        if mask_pad is not None:
            mask_pad = check_mask_pad(mask_pad, steps, batch, self.batch_first)
            # Clean padded positions once here too, as the first layer's input is also the next memory.
            x = zero_padding(x, mask_pad)
        return x, mask_pad

    def _run(
        self, x: Tensor, c0: Tensor | None, per_layer: Callable[[int], dict] = lambda i: {}, **kwargs
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Every layer in turn; returns the output (batch-major with ``batch_first``), c of every layer and
        direction, and each layer's input."""
        dirs, inputs, states = self.num_directions, [], []
        x = autocast_input(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            c_in = None if c0 is None else c0[i * dirs : (i + 1) * dirs]
            if recompute:
                # Non-reentrant: keyword inputs pass through and the layer's output keeps its graph (its hooks see
                # it); the RNG state is replayed, so dropout masks and gradients equal those without.
                run = getattr(self, "_gradient_checkpointing_func", torch.utils.checkpoint.checkpoint)
                x, c = run(partial(layer, **kwargs, **per_layer(i)), x, c_in, use_reentrant=False)
            else:
                x, c = layer(x, c_in, **kwargs, **per_layer(i))
            states.append(c)
        output = x.transpose(0, 1) if self.batch_first else x
        return output, torch.cat(states), inputs

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        defaults = {
            "num_layers": None,
            **self._repr_defaults,
            "dropout": 0.0,
            "bidirectional": False,
            "batch_first": False,
            "layer_norm": False,
            "highway_bias": HIGHWAY_BIAS,
        }
        parts += [
            f"{name}={getattr(self, name)}" for name, default in defaults.items() if getattr(self, name) != default
        ]
        return ", ".join(parts)
