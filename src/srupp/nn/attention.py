"""The input transforms of an SRU++ layer: single- or multi-head attention, and the projected linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from srupp.nn.checks import zero_padding
from srupp.ops import cached_linear


def project(linear: nn.Module, input: Tensor) -> Tensor:
    """``linear(input)`` for the linear map that makes U: a plain bias-free ``nn.Linear`` with no hooks goes
    through ``srupp.ops.cached_linear`` (in CPU inference its large output reuses cached storage); anything
    else (a subclass, a quantised or adapted replacement, a module with hooks) is called as it is."""
    if (
        type(linear) is nn.Linear
        and linear.bias is None
        and not (linear._forward_hooks or linear._forward_pre_hooks)
        and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)
    ):
        return cached_linear(input, linear.weight)
    return linear(input)


def attention_mask(
    query_len: int,
    key_len: int,
    *,
    causal: bool,
    window: int | None,
    key_pad: Tensor | None,
    device: torch.device,
    first_position: int | None = None,
) -> Tensor | None:
    """A boolean mask (True = may attend) of shape ``[B or 1, 1, query_len, key_len]``, or None.

    Query i sits at key position ``first_position + i``, by default ``key_len - query_len + i`` (the keys are
    memory, then the queries). ``causal`` hides later keys; ``window`` hides keys more than ``window`` positions
    away. A query always sees its own key, so no row is empty even where padding covers the window (padded
    queries' outputs are discarded by the recurrence anyway)."""
    if not causal and window is None and key_pad is None:
        return None
    first = key_len - query_len if first_position is None else first_position
    position = torch.arange(query_len, device=device).unsqueeze(1) + first
    key = torch.arange(key_len, device=device).unsqueeze(0)
    allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (key <= position)
    if window is not None:
        allowed = allowed & (key >= position - window)
        if not causal:
            allowed = allowed & (key <= position + window)
    allowed = allowed.unsqueeze(0)
    if key_pad is not None:
        allowed = allowed & ~key_pad.unsqueeze(1)
    allowed = allowed | (key == position)
    return allowed.unsqueeze(1)


# Queries are attended a block at a time where attention needs a mask: the block's mask (and the score matrix of
# SDPA's math kernel, its fallback, e.g. for dropout on the CPU) stays near this many elements however long the
# sequence (issue 24: memory that grew with the square of the length).
MASK_ELEMENTS = 1 << 24


def tracing() -> bool:
    """Whether the call is being traced or compiled (torch.compile, torch.export, ONNX, TorchScript): one block
    then, with the plain boolean mask, as graphs take neither Python loops over symbolic lengths nor
    ``CausalBias``."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class SRUppProjectedLinear(nn.Module):
    """The transform of an SRU++ layer without attention: ``U = Wo dropout(LayerNorm(Wq x))``.

    Args:
        input_size: features of ``x``.
        output_size: features of ``U``.
        proj_size: the bottleneck ``d'``.
        dropout: dropout before ``Wo``.

    Example:
        >>> SRUppProjectedLinear(16, 24, 4)(torch.randn(5, 2, 16)).shape
        torch.Size([5, 2, 24])
    """

    def __init__(
        self, input_size: int, output_size: int, proj_size: int, dropout: float = 0.0, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.output_size, self.proj_size = input_size, output_size, proj_size
        self.in_proj = nn.Linear(input_size, proj_size, bias=False, **factory)
        self.norm = nn.LayerNorm(proj_size, **factory)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(proj_size, output_size, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        # Wo scaled by sqrt(1 - dropout): the authors' SRUppProjectedLinear.reset_parameters.
        with torch.no_grad():
            self.out_proj.weight.mul_(math.sqrt(1.0 - self.dropout.p))
        self.norm.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        """Args: input ``[T, B, input_size]``.

        Returns: ``U [T, B, output_size]``."""
        return project(self.out_proj, self.dropout(self.norm(self.in_proj(input))))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.output_size}, proj_size={self.proj_size}, dropout={self.dropout.p}"


class SRUppAttention(nn.Module):
    """The attention transform of an SRU++ layer (Lei, 2021, Sec. 3).

    ``Q = Wq x``; ``K = Wk Q``, ``V = Wv Q`` from the un-normalised ``Q``;
    ``A = softmax(Q K^T / sqrt(d'/heads)) V``; ``U = Wo dropout(LayerNorm(Q + alpha * A))``,
    with ``alpha`` a learned scalar initialised to 0. Keys and values cover the optional memory
    (earlier positions, projected by the same ``Wq``) followed by the input.

    Args:
        input_size: features of ``x``.
        output_size: features of ``U``.
        proj_size: the attention size ``d'``.
        num_heads: attention heads; must divide ``proj_size``.
        dropout: dropout before ``Wo``.
        attn_dropout: dropout on the attention probabilities.

    Example:
        >>> attention = SRUppAttention(16, 24, 8, num_heads=2)
        >>> attention(torch.randn(5, 2, 16)).shape  # causal unless causal=False
        torch.Size([5, 2, 24])
    """

    attends = True  # takes earlier positions (a memory, a key/value cache): ``SRULayer`` passes them on

    def __init__(
        self,
        input_size: int,
        output_size: int,
        proj_size: int,
        num_heads: int = 1,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or proj_size % num_heads != 0:
            raise ValueError(f"`proj_size` ({proj_size}) must be divisible by `num_heads` ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.output_size, self.proj_size = input_size, output_size, proj_size
        self.num_heads = num_heads
        self.head_size = proj_size // num_heads
        self.attn_dropout = float(attn_dropout)
        self.in_proj = nn.Linear(input_size, proj_size, bias=False, **factory)
        # One matmul for [Wk; Wv] (keys are the first proj_size rows), as one d' -> 2d' map.
        self.kv_proj = nn.Linear(proj_size, 2 * proj_size, bias=False, **factory)
        self.alpha = nn.Parameter(torch.zeros((), **factory))
        self.norm = nn.LayerNorm(proj_size, **factory)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(proj_size, output_size, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.kv_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        with torch.no_grad():
            # Wo scaled by sqrt(1 - dropout), alpha = 0: the authors' SRUppAttention.reset_parameters.
            self.out_proj.weight.mul_(math.sqrt(1.0 - self.dropout.p))
            self.alpha.zero_()
        self.norm.reset_parameters()

    def _heads(self, tensor: Tensor) -> Tensor:
        steps, batch, _ = tensor.shape
        return tensor.reshape(steps, batch, self.num_heads, self.head_size).permute(1, 2, 0, 3)

    def keys_values(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, heads, T, head_size]`` of un-normalised queries ``[T, B, proj_size]``."""
        keys, values = self.kv_proj(query).chunk(2, dim=-1)
        return self._heads(keys), self._heads(values)

    def attend(
        self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, is_causal: bool = False
    ) -> Tensor:
        """``U`` ``[T, B, output_size]`` from queries ``[T, B, proj_size]`` and head-split keys and values."""
        return self.output(query, self.mix(query, keys, values, mask, is_causal))

    def output(self, query: Tensor, mixed: Tensor) -> Tensor:
        """``U`` from queries and their attention result ``mixed``, both ``[T, B, proj_size]``."""
        return project(self.out_proj, self.dropout(self.norm(query + self.alpha * mixed)))

    def mix(self, query: Tensor, keys: Tensor, values: Tensor, mask, is_causal: bool = False) -> Tensor:
        """Scaled dot-product attention ``[T, B, proj_size]`` of queries ``[T, B, proj_size]`` to head-split keys
        and values, where ``mask`` (boolean, a ``CausalBias`` or None) allows."""
        steps, batch, _ = query.shape
        mixed = F.scaled_dot_product_attention(
            self._heads(query),
            keys.to(query.dtype),
            values.to(query.dtype),
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return mixed.permute(2, 0, 1, 3).reshape(steps, batch, self.proj_size)

    def mix_blocks(
        self, query: Tensor, keys: Tensor, values: Tensor, *, causal: bool, window: int | None, key_pad: Tensor | None
    ) -> Tensor:
        """``mix`` for the queries ``[T, B, proj_size]`` of the last T of the keys' positions, a block of queries
        at a time (``MASK_ELEMENTS``). Causal attention over memory, without window or padding, takes a
        lower-right causal bias: SDPA's flash and memory-efficient kernels apply it with no mask in memory
        (the CPU's kernel materialises it, one block at a time)."""
        steps, batch, _ = query.shape
        key_len = keys.shape[2]
        plain_causal = causal and window is None and key_pad is None
        rows = steps if tracing() else max(1, MASK_ELEMENTS // (key_len * batch * self.num_heads))
        blocks = []
        for start in range(0, steps, rows):
            end = min(steps, start + rows)
            # Keys after the block's last query are hidden from all of it under causal attention: left out.
            visible = key_len - steps + end if causal else key_len
            first_position = key_len - steps + start
            # A tensor subclass such as CausalBias cannot be made under a dispatch mode (e.g. FlopCounterMode).
            if plain_causal and not tracing() and not is_in_torch_dispatch_mode():
                # Imported here: torch.nn.attention.bias pulls in torch._dynamo and triton, a second
                # or more and hundreds of MB that `import srupp` should not cost.
                from torch.nn.attention.bias import causal_lower_right

                mask = causal_lower_right(end - start, visible)
            else:
                pad = None if key_pad is None else key_pad[:, :visible]
                mask = attention_mask(
                    end - start,
                    visible,
                    causal=causal,
                    window=window,
                    key_pad=pad,
                    device=query.device,
                    first_position=first_position,
                )
            blocks.append(self.mix(query[start:end], keys[:, :, :visible], values[:, :, :visible], mask))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def forward(
        self,
        input: Tensor,
        *,
        mask_pad: Tensor | None = None,
        causal: bool = True,
        memory: Tensor | None = None,
        cache: tuple[Tensor, Tensor] | None = None,
        attn_window: int | None = None,
        memory_pad: Tensor | None = None,
    ) -> Tensor:
        """Args:
            input: ``[T, B, input_size]``.
            mask_pad: ``[T, B]`` bool, True marks padded positions: hidden as keys, and their values (even NaN)
                cannot reach other positions.
            causal: queries see only keys at or before their position (all memory positions precede); the default,
                as the attention of a unidirectional layer. False lets every query see every key (an encoder).
            memory: ``[M, B, input_size]`` earlier positions to attend to.
            cache: instead of ``memory``, its keys and values ``[B, heads, M, head_size]`` (see ``step``).
            attn_window: each query sees at most this many earlier positions.
            memory_pad: ``[B, M]`` bool, True marks memory (or cache) positions that were padding: hidden as keys.

        Returns: ``U [T, B, output_size]``.
        """
        steps, batch, _ = input.shape
        # Masked scores alone are not enough: 0 * NaN = NaN in the probability-weighted sum of values.
        input = zero_padding(input, mask_pad)
        query = self.in_proj(input)
        keys, values = self.keys_values(query)
        if memory is not None:
            cache = self.keys_values(self.in_proj(memory))
        memory_len = 0
        if cache is not None:
            memory_len = cache[0].shape[2]
            keys = torch.cat([cache[0].to(keys.dtype), keys], dim=2)
            values = torch.cat([cache[1].to(values.dtype), values], dim=2)
        key_pad = None
        if mask_pad is not None or memory_pad is not None:
            key_pad = (
                torch.zeros(batch, steps, dtype=torch.bool, device=input.device) if mask_pad is None else mask_pad.t()
            )
            if memory_len:
                earlier = key_pad.new_zeros(batch, memory_len) if memory_pad is None else memory_pad
                key_pad = torch.cat([earlier, key_pad], dim=1)
        # Plain causal attention takes SDPA's own causal path (flash kernels on GPU, blocked on the CPU).
        if causal and memory_len == 0 and key_pad is None and attn_window is None:
            return self.attend(query, keys, values, None, is_causal=True)
        if not causal and attn_window is None and key_pad is None:
            return self.attend(query, keys, values, None)
        return self.output(
            query, self.mix_blocks(query, keys, values, causal=causal, window=attn_window, key_pad=key_pad)
        )

    def step(
        self,
        input: Tensor,
        cache: tuple[Tensor, Tensor] | None,
        max_context: int | None,
        key_pad: Tensor | None = None,
        memory: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Causal attention of a chunk ``[T, B, input_size]`` over the cached keys and values
        ``[B, heads, S, head_size]`` (None: no earlier positions), or over those of ``memory`` ``[S, B,
        input_size]`` (earlier inputs, normalised like ``input``); returns ``U`` and the cache extended by the
        chunk, keeping its last ``max_context`` positions (all when None). ``key_pad`` ``[B, S + T]`` bool hides
        padded keys (cache, then chunk)."""
        steps = input.shape[0]
        if memory is not None:
            cache = self.keys_values(self.in_proj(memory))
        query = self.in_proj(input)
        keys, values = self.keys_values(query)
        if cache is not None:
            keys = torch.cat([cache[0].to(keys.dtype), keys], dim=2)
            values = torch.cat([cache[1].to(values.dtype), values], dim=2)
        key_len = keys.shape[2]
        mask = attention_mask(steps, key_len, causal=True, window=max_context, key_pad=key_pad, device=input.device)
        u = self.attend(query, keys, values, mask)
        if max_context is not None:
            keep = min(max_context, key_len)
            keys, values = keys[:, :, key_len - keep :], values[:, :, key_len - keep :]
        return u, (keys, values)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.output_size}, proj_size={self.proj_size}, num_heads={self.num_heads}, "
            f"dropout={self.dropout.p}, attn_dropout={self.attn_dropout}"
        )
