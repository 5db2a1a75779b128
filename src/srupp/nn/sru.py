"""The plain SRU (Lei et al., 2018): a linear input transform followed by the elementwise recurrence."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from srupp.ops import sru_recurrence


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_sequence(name: str, value: object, size: int, label: str = "input_size") -> Tensor:
    tensor = check_tensor(name, value)
    if tensor.dim() != 3 or tensor.shape[-1] != size:
        raise ValueError(f"`{name}` must have shape [T, B, {label}] = [T, B, {size}], got {list(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one time step, got shape {list(tensor.shape)}")
    return tensor


def check_mask_pad(mask_pad: object, steps: int, batch: int, batch_first: bool = False) -> Tensor:
    mask = check_tensor("mask_pad", mask_pad)
    expected, labels = ([batch, steps], "[B, T]") if batch_first else ([steps, batch], "[T, B]")
    if list(mask.shape) != expected:
        raise ValueError(f"`mask_pad` must have shape {labels} = {expected}, got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask_pad` must be a bool tensor (True = padding), got dtype {mask.dtype}")
    return mask.t() if batch_first else mask


def check_state(
    name: str, value: object, expected: list[int], labels: str = "[num_layers*dirs, B, hidden_size]"
) -> Tensor:
    tensor = check_tensor(name, value)
    if list(tensor.shape) != expected:
        raise ValueError(f"`{name}` must have shape {labels} = {expected}, got {list(tensor.shape)}")
    return tensor


def check_probability(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}")
    return float(value)


def variational_mask(num_directions: int, batch: int, hidden: int, p: float, like: Tensor) -> Tensor:
    """One Bernoulli mask per sequence and feature, constant over time, scaled by 1/(1-p)."""
    keep = torch.full((num_directions, batch, hidden), 1.0 - p, dtype=torch.float32, device=like.device)
    return torch.bernoulli(keep).div_(1.0 - p)


def run_recurrence(
    u: Tensor,
    skip: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    c0: Tensor | None,
    mask_pad: Tensor | None,
    mask_c: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Run each direction of a layer: u [T, B, dirs*3*H] planar per direction, skip [T, B, dirs*H],
    gate_weight/gate_bias [dirs, 2, H], c0 [dirs, B, H]. Returns h [T, B, dirs*H], c [dirs, B, H]."""
    num_directions, _, hidden = gate_weight.shape
    outputs, states = [], []
    for direction in range(num_directions):
        gates = u[..., 3 * hidden * direction : 3 * hidden * (direction + 1)]
        h, c = sru_recurrence(
            gates,
            skip[..., hidden * direction : hidden * (direction + 1)],
            gate_weight[direction],
            gate_bias[direction],
            None if c0 is None else c0[direction],
            mask_pad=mask_pad,
            mask_c=None if mask_c is None else mask_c[direction],
            reverse=direction == 1,
            backend=backend,
        )
        outputs.append(h)
        states.append(c)
    if num_directions == 1:
        return outputs[0], states[0].unsqueeze(0)
    return torch.cat(outputs, dim=-1), torch.stack(states)


class RecurrentGates(nn.Module):
    """The per-layer recurrence parameters shared by SRUCell and SRUppCell: v and b of each direction."""

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


class SRUCell(nn.Module):
    """One SRU layer over a whole sequence (time-major), optionally bidirectional.

    ``U = W x`` (low-rank ``W = W2 W1`` when ``projection_size`` > 0) gives, per direction, the
    candidate, forget and reset pre-activations; the highway skip is the input itself when
    ``input_size == num_directions * hidden_size``, else a fourth learned block of ``W``.

    Args:
        input_size: features of the input.
        hidden_size: features of the state, per direction.
        dropout: variational dropout on the c-term of ``h`` (one mask per sequence, training only).
        bidirectional: run a second, reversed recurrence; outputs are concatenated.
        layer_norm: LayerNorm on the input of the transform (pre-norm; the skip uses the raw input).
        highway_bias: initial bias of the reset (highway) gate.
        projection_size: if > 0, factorise ``W`` through this inner size.
        backend: recurrence backend, see ``srupp.ops.sru_recurrence``.

    Example:
        >>> cell = SRUCell(16, 8)
        >>> h, c = cell(torch.randn(5, 2, 16))
        >>> h.shape, c.shape
        (torch.Size([5, 2, 8]), torch.Size([1, 2, 8]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        dropout: float = 0.0,
        bidirectional: bool = False,
        layer_norm: bool = False,
        highway_bias: float = -2.0,
        projection_size: int = 0,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"`input_size` and `hidden_size` must be positive, got {input_size}, {hidden_size}")
        if projection_size < 0:
            raise ValueError(f"`projection_size` must be >= 0, got {projection_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.num_directions * hidden_size
        self.projection_size = projection_size
        self.backend = backend
        self.project_skip = input_size != self.output_size
        out_features = self.output_size * (4 if self.project_skip else 3)
        if projection_size > 0:
            self.transform = nn.Sequential(
                nn.Linear(input_size, projection_size, bias=False, **factory),
                nn.Linear(projection_size, out_features, bias=False, **factory),
            )
        else:
            self.transform = nn.Linear(input_size, out_features, bias=False, **factory)
        self.input_norm = nn.LayerNorm(input_size, **factory) if layer_norm else None
        self.gates = RecurrentGates(hidden_size, self.num_directions, highway_bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.transform.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
        if self.input_norm is not None:
            self.input_norm.reset_parameters()
        self.gates.reset_parameters()

    def forward(self, input: Tensor, c0: Tensor | None = None, *, mask_pad: Tensor | None = None):
        """Args: input ``[T, B, input_size]``; c0 ``[dirs, B, hidden_size]``; mask_pad ``[T, B]`` bool.

        Returns: ``(h [T, B, dirs*hidden_size], c [dirs, B, hidden_size])``."""
        input = check_sequence("input", input, self.input_size)
        steps, batch = input.shape[:2]
        if c0 is not None:
            check_state("c0", c0, [self.num_directions, batch, self.hidden_size], "[dirs, B, hidden_size]")
        if mask_pad is not None:
            mask_pad = check_mask_pad(mask_pad, steps, batch)
        normed = input if self.input_norm is None else self.input_norm(input)
        u = self.transform(normed)
        skip = u[..., 3 * self.output_size :] if self.project_skip else input
        mask_c = None
        if self.training and self.dropout > 0:
            mask_c = variational_mask(self.num_directions, batch, self.hidden_size, self.dropout, input)
        return run_recurrence(u, skip, self.gates.weight, self.gates.bias, c0, mask_pad, mask_c, self.backend)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        if self.input_norm is not None:
            parts.append("layer_norm=True")
        if self.gates.highway_bias != -2.0:
            parts.append(f"highway_bias={self.gates.highway_bias}")
        if self.projection_size:
            parts.append(f"projection_size={self.projection_size}")
        return ", ".join(parts)


class SRU(nn.Module):
    """A stack of SRU layers with the ``nn.LSTM`` conventions.

    Args:
        input_size: features of the input.
        hidden_size: features of the state, per direction.
        num_layers: number of stacked layers.
        dropout: variational dropout on the c-term in every layer but the last.
        bidirectional: bidirectional layers (each layer's output has ``2 * hidden_size`` features).
        batch_first: input and output are ``[B, T, *]`` instead of ``[T, B, *]`` (the state is not).
        layer_norm: pre-LayerNorm on each layer's transform input.
        highway_bias: initial bias of the reset (highway) gate.
        projection_size: if > 0, each layer's ``W`` is factorised through this inner size.
        backend: recurrence backend, see ``srupp.ops.sru_recurrence``.

    Example:
        >>> sru = SRU(16, 32, num_layers=2)
        >>> output, c = sru(torch.randn(10, 4, 16))
        >>> output.shape, c.shape
        (torch.Size([10, 4, 32]), torch.Size([2, 4, 32]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 2,
        dropout: float = 0.0,
        bidirectional: bool = False,
        batch_first: bool = False,
        layer_norm: bool = False,
        highway_bias: float = -2.0,
        projection_size: int = 0,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"`num_layers` must be positive, got {num_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.batch_first = batch_first
        self.layer_norm = layer_norm
        self.highway_bias = float(highway_bias)
        self.projection_size = projection_size
        self.layers = nn.ModuleList(
            SRUCell(
                input_size if i == 0 else self.num_directions * hidden_size,
                hidden_size,
                dropout=dropout if i + 1 < num_layers else 0.0,
                bidirectional=bidirectional,
                layer_norm=layer_norm,
                highway_bias=highway_bias,
                projection_size=projection_size,
                backend=backend,
                device=device,
                dtype=dtype,
            )
            for i in range(num_layers)
        )

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, input: Tensor, state: Tensor | None = None, *, mask_pad: Tensor | None = None):
        """Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``).
            state: c of every layer ``[num_layers*dirs, B, hidden_size]`` (zeros when None).
            mask_pad: ``[T, B]`` (``[B, T]``) bool, True marks padding.

        Returns:
            ``(output [T, B, dirs*hidden_size], c [num_layers*dirs, B, hidden_size])``.
        """
        check_tensor("input", input)
        x = input.transpose(0, 1) if self.batch_first and input.dim() == 3 else input
        x = check_sequence("input", x, self.input_size)
        steps, batch = x.shape[:2]
        dirs = self.num_directions
        if state is not None:
            check_state("state", state, [self.num_layers * dirs, batch, self.hidden_size])
        if mask_pad is not None:
            mask_pad = check_mask_pad(mask_pad, steps, batch, self.batch_first)
        states = []
        for i, layer in enumerate(self.layers):
            c0 = None if state is None else state[i * dirs : (i + 1) * dirs]
            x, c = layer(x, c0, mask_pad=mask_pad)
            states.append(c)
        output = x.transpose(0, 1) if self.batch_first else x
        return output, torch.cat(states)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.layer_norm:
            parts.append("layer_norm=True")
        if self.highway_bias != -2.0:
            parts.append(f"highway_bias={self.highway_bias}")
        if self.projection_size:
            parts.append(f"projection_size={self.projection_size}")
        return ", ".join(parts)
