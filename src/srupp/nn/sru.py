"""The plain SRU (Lei et al., 2018): a stack of ``SRULayer``s whose input transform is a Linear."""

from __future__ import annotations

from functools import partial

from torch import Tensor

from srupp.nn.layer import HIGHWAY_BIAS, SRUStack, linear_transform


class SRU(SRUStack):
    """A stack of SRU layers with the ``nn.LSTM`` conventions.

    Each layer computes ``U = W x`` (low-rank ``W = W2 W1`` when ``projection_size`` > 0), then the
    elementwise recurrence (see ``SRULayer``).

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
        backend: recurrence backend, see ``srupp.ops.sru_recurrence`` (a runtime choice: ``set_backend``).

    Example:
        >>> sru = SRU(16, 32, num_layers=2)
        >>> output, c = sru(torch.randn(10, 4, 16))
        >>> output.shape, c.shape
        (torch.Size([10, 4, 32]), torch.Size([2, 4, 32]))
    """

    _repr_defaults = {"projection_size": 0}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 2,
        dropout: float = 0.0,
        bidirectional: bool = False,
        batch_first: bool = False,
        layer_norm: bool = False,
        highway_bias: float = HIGHWAY_BIAS,
        projection_size: int = 0,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, dropout, bidirectional, batch_first, layer_norm, highway_bias
        )
        if projection_size < 0:
            raise ValueError(f"`projection_size` must be >= 0, got {projection_size}")
        self.projection_size = projection_size
        transform = partial(linear_transform, projection_size=projection_size, device=device, dtype=dtype)
        self.build_layers(lambda i: transform, backend, device, dtype)

    def forward(self, input: Tensor, state: Tensor | None = None, *, mask_pad: Tensor | None = None):
        """Args:
            input: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``).
            state: c of every layer ``[num_layers*dirs, B, hidden_size]`` (zeros when None).
            mask_pad: ``[T, B]`` (``[B, T]``) bool, True marks padding: padded positions carry c unchanged,
                output 0 and cannot affect real outputs.

        Returns:
            ``(output [T, B, dirs*hidden_size], c [num_layers*dirs, B, hidden_size])``.
        """
        x, mask_pad = self._check_input(input, state, mask_pad)
        output, c, _ = self._run(x, state, mask_pad=mask_pad)
        return output, c
