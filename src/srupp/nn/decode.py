"""A decoding session of an ``SRUpp`` stack: its caches in preallocated buffers, extended a token at a time.

``SRUpp.step`` is the general, functional path: it takes a state and returns the next one, copying the caches.
A session (``SRUpp.decoder``) is the fast one, and openly mutable: it owns the key/value buffers of every
attention layer and the weights a one-token step reads, gathered once, and each ``step`` extends them in place.
A one-token step runs either ``token_step`` below, per layer (the reference, in torch ops), or the whole stack as
one call into the compiled CPU kernel (``srupp.ops.decode_kernel``), which computes the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srupp.nn.checks import check_stream_indices
from srupp.nn.state import SRUppState
from srupp.ops.decode_kernel import TokenKernel, TokenRun, token_kernel

# Weight dtypes the compiled one-token step serves: float32 as is, the others on float32 copies of the weights.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LayerWeights(NamedTuple):
    """What ``token_step`` reads of one layer, gathered when a session starts: module attribute lookups would
    cost a one-token step more than its arithmetic, and a matrix-vector product reads a weight stored ``[in, out]``
    row by row. Layer norms are ``(normalized_shape, weight, bias, eps)``; ``kv_proj_t``
    and ``alpha`` are None without attention; ``u_bias`` puts the gate biases b_f, b_r in U's layout."""

    input_norm: tuple | None
    in_proj_t: Tensor
    kv_proj_t: Tensor | None
    alpha: Tensor | None
    norm: tuple
    out_proj_t: Tensor
    u_bias: Tensor
    gate_weight: Tensor
    heads: int
    project_skip: bool


def _norm_arguments(norm: nn.LayerNorm | None) -> tuple | None:
    return None if norm is None else (norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def gather_weights(layer: nn.Module) -> LayerWeights:
    """The weights of one unidirectional SRU++ layer (``SRULayer`` with ``SRUppAttention`` or
    ``SRUppProjectedLinear``) in the form ``token_step`` reads."""
    transform, hidden = layer.transform, layer.hidden_size
    with torch.no_grad():
        u_bias = layer.gates.bias.new_zeros(transform.out_proj.weight.shape[0])
        u_bias[hidden : 3 * hidden] = layer.gates.bias.reshape(-1)
        return LayerWeights(
            _norm_arguments(layer.input_norm),
            transform.in_proj.weight.t().contiguous(),
            transform.kv_proj.weight.t().contiguous() if layer.has_attention else None,
            transform.alpha.detach() if layer.has_attention else None,
            _norm_arguments(transform.norm),
            transform.out_proj.weight.t().contiguous(),
            u_bias,
            layer.gates.weight.detach(),
            transform.num_heads if layer.has_attention else 1,
            layer.project_skip,
        )


def token_step(
    input: Tensor, c0: Tensor, c_out: Tensor, weights: LayerWeights, window: Tensor | None, mask: Tensor | None
) -> Tensor:
    """One causal step of one layer for one token: the reference of the compiled kernel, equal to
    ``SRULayer.step`` on a one-token chunk (eval mode, no gradients).

    Args:
        input: ``[B, input_size]``; c0: ``[B, hidden_size]``; c_out: ``[B, hidden_size]``, receives the next c.
        weights: the layer's ``gather_weights``.
        window: with attention, the cache positions this token attends to, ``[B, 2 (keys, values), heads, L,
            head_size]``, whose last position receives the token's own key and value; None without.
        mask: ``[B, 1, 1, L]`` bool, True where the token may attend (None: everywhere).

    Returns: h ``[B, hidden_size]``.
    """
    batch, hidden = input.shape[0], c0.shape[1]
    normed = input if weights.input_norm is None else torch.layer_norm(input, *weights.input_norm)
    query = torch.mm(normed, weights.in_proj_t)
    mixed = query
    if window is not None:
        proj = query.shape[1]
        window.select(3, -1).copy_(torch.mm(query, weights.kv_proj_t).view(batch, 2, weights.heads, -1))
        keys, values = window.unbind(1)
        attended = F.scaled_dot_product_attention(query.view(batch, weights.heads, 1, -1), keys, values, attn_mask=mask)
        mixed = torch.addcmul(query, weights.alpha, attended.view(batch, proj))
    u = torch.addmm(weights.u_bias, torch.layer_norm(mixed, *weights.norm), weights.out_proj_t)
    # The op's equations for one step (srupp.ops.naive) with the biases already in u, and
    # lerp(a, b, w) = a + w * (b - a). (narrow, not u[:, a:b]: Python's indexing builds slices per call.)
    gates = torch.addcmul(
        u.narrow(1, hidden, 2 * hidden).view(batch, 2, hidden), weights.gate_weight, c0.view(batch, 1, hidden)
    )
    forget, reset = gates.sigmoid_().unbind(1)
    torch.lerp(u.narrow(1, 0, hidden), c0, forget, out=c_out)
    return torch.lerp(u.narrow(1, 3 * hidden, hidden) if weights.project_skip else input, c_out, reset)


def _float32_weights(layer: nn.Module, weights: LayerWeights) -> LayerWeights | None:
    """float32 copies of ``weights`` that the session owns, which the compiled step binds and the torch ops read on
    float32 caches, for a CPU layer of a ``KERNEL_DTYPES`` dtype whose backend is not the naive spec; else None."""
    if (
        layer.backend == "naive"
        or weights.in_proj_t.dtype not in KERNEL_DTYPES
        or weights.in_proj_t.device.type != "cpu"
    ):
        return None

    def own(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.detach().to(torch.float32, copy=True)

    def own_norm(norm: tuple | None) -> tuple | None:
        return None if norm is None else (norm[0], own(norm[1]), own(norm[2]), norm[3])

    return weights._replace(
        input_norm=own_norm(weights.input_norm),
        in_proj_t=own(weights.in_proj_t),
        kv_proj_t=own(weights.kv_proj_t),
        alpha=own(weights.alpha),
        norm=own_norm(weights.norm),
        out_proj_t=own(weights.out_proj_t),
        u_bias=own(weights.u_bias),
        gate_weight=own(weights.gate_weight),
    )


def _kernel_weights(weights: LayerWeights | None) -> TokenKernel | None:
    """The compiled one-token step's binding of ``_float32_weights`` (None where there are none)."""
    if weights is None:
        return None
    return token_kernel(
        in_norm=weights.input_norm,
        wq_t=weights.in_proj_t,
        wkv_t=weights.kv_proj_t,
        alpha=None if weights.alpha is None else weights.alpha.reshape(1),
        norm=weights.norm,
        wo_t=weights.out_proj_t,
        u_bias=weights.u_bias,
        gate_v=weights.gate_weight,
        heads=weights.heads,
        project_skip=weights.project_skip,
    )


class SRUppDecoder:
    """A decoding session of a unidirectional ``SRUpp`` over ``batch_size`` streams (see ``SRUpp.decoder``).

    ``step`` feeds the next token(s) and returns the stack's output for them, equal to ``SRUpp.step`` (and so to
    the causal forward, windowed by ``max_context``). A one-token step without ``mask_pad``, in eval mode and
    without gradients, appends in place and runs ``token_step`` per layer, or the whole stack as one call into
    the compiled CPU kernel where ``kernel`` is set (on the CPU, any backend but ``"naive"``; set it to None to run
    the torch ops). Any other step (a chunk, a padding mask, gradients) takes ``SRUpp.step`` on the session's
    caches and stores what it returns (with gradients, on copies of what inference mode made: a session stepped or
    selected in inference mode trains after it). ``state`` is a copy of the session as an ``SRUppState``; ``load``
    continues one; ``select`` keeps, reorders or repeats streams in place (beam search); ``step_layers`` is ``step``
    returning every layer's output.

    Precision: the kernel computes in float32. For a bfloat16 or float16 model it runs on float32 copies of the
    weights that the session makes once when it starts (memory: a float32 copy of the stack's weights per
    session), keeps its caches and ``c`` in float32 (``cache_dtype``), converts a token's input to float32 and
    its output back to the model's dtype; ``step_layers`` on one token runs the torch ops on those copies and
    caches alike. The torch ops (``kernel`` None) and chunks run in the model's dtype; setting ``kernel`` to None
    converts the caches to it.

    The weights are gathered when the session starts: parameters changed afterwards are seen by a new session.
    The caches never hold more than ``max_context`` positions (a sliding window; all when None).

    Attributes:
        model: the ``SRUpp``. batch_size, max_context: as given. c: ``[num_layers, B, hidden_size]`` the state.
        dtype: the model's; cache_dtype: that of ``c`` and ``buffers`` (float32 while ``kernel`` is set).
        weights: per layer its ``LayerWeights``. kernel: the compiled step of the whole stack, or None.
        start, end: the live cache positions ``start..end-1`` of ``buffers`` (per layer ``[B, 2, heads,
        capacity, head_size]`` or None) and of ``pad`` (``[B, capacity]`` bool, True = padding, or None).
    """

    def __init__(
        self, model: nn.Module, batch_size: int, max_context: int | None = None, state: SRUppState | None = None
    ) -> None:
        if model.bidirectional:
            raise NotImplementedError("step-by-step decoding needs a unidirectional SRUpp")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        self.model = model
        self.max_context = max_context
        reference = model.layers[0].gates.weight
        self.dtype, self.device = reference.dtype, reference.device
        self.weights = [gather_weights(layer) for layer in model.layers]
        weights32 = [_float32_weights(layer, w) for layer, w in zip(model.layers, self.weights, strict=True)]
        self._kernels = [_kernel_weights(weights) for weights in weights32]
        self._weights32 = [] if None in self._kernels else weights32  # read only with float32 caches: the kernel's
        self._kernel: TokenRun | None = None
        self._torch_ops = False  # the user set ``kernel`` to None: a new batch size keeps it so
        self.cache_dtype = self.dtype
        self.batch_size = 0
        self.buffers: list[Tensor | None] = []
        self.pad: Tensor | None = None
        self._spare: tuple[list[Tensor | None], Tensor | None] | None = None  # select's targets: see there
        self.capacity = self.start = self.end = 0
        self._pending: SRUppState | None = None
        self._inference = False
        if state is None:  # empty caches: the first token may take the one-token path
            self._store(model.init_decode_state(batch_size, max_context))
        else:
            self.load(state)

    def load(self, state: SRUppState) -> None:
        """Continue from ``state`` (its ``max_context`` replaces the session's); the next step checks it."""
        if not isinstance(state, SRUppState):
            raise TypeError(f"`state` must be an SRUppState, got {type(state).__name__}")
        self.max_context = state.max_context
        self._pending = state
        self._resize(state.c.shape[1] if state.c.dim() == 3 else self.batch_size)

    def select(self, indices: Tensor) -> None:
        """Keep the streams ``indices`` ``[N]`` (integers in ``[0, batch_size)``, repeats allowed): stream i goes on
        from what stream ``indices[i]`` held, as from ``state.select(indices)`` (beam search reorders its beams so
        after every token). With N = ``batch_size`` the live positions of every cache are gathered once, into a
        second set of buffers that the session keeps from its first ``select`` on and binds the kernel to (memory:
        the caches twice); with another N, into new buffers."""
        indices = check_stream_indices(indices, self.batch_size).to(self.device)
        if self._pending is not None:
            self.load(self._pending.select(indices))
        elif indices.shape[0] != self.batch_size or (self._inference and not torch.is_inference_mode_enabled()):
            keys, values, key_pad = self._views()
            state = SRUppState(self.c, keys=keys, values=values, max_context=self.max_context, key_pad=key_pad)
            self._store(state.select(indices))
        else:
            self._gather(indices)

    def _gather(self, indices: Tensor) -> None:
        """``select`` of ``batch_size`` streams: the live positions of the buffers and padding marks gathered into
        the spare set, which becomes the live one (the old one the next spare)."""
        if self._spare is None:
            with torch.inference_mode(self._inference):  # writable where the buffers are (see ``_store``)
                buffers = [None if buffer is None else torch.empty_like(buffer) for buffer in self.buffers]
                self._spare = (buffers, None if self.pad is None else torch.zeros_like(self.pad))
        targets, target_pad = self._spare
        start, live = self.start, self.end - self.start
        with torch.no_grad():
            for buffer, target in zip(self.buffers, targets, strict=True):
                if buffer is not None:
                    torch.index_select(buffer.narrow(3, start, live), 0, indices, out=target.narrow(3, start, live))
            if self.pad is not None:
                torch.index_select(self.pad.narrow(1, start, live), 0, indices, out=target_pad.narrow(1, start, live))
            self.c = self.c.index_select(1, indices)
        self._spare = (self.buffers, self.pad)
        self.buffers, self.pad = targets, target_pad
        self._bind()

    def _resize(self, batch_size: int) -> None:
        if batch_size == self.batch_size:
            return
        self.batch_size = batch_size
        shape = (batch_size, 1) if self.model.batch_first else (1, batch_size)
        self.input_shape = (*shape, self.model.input_size)
        self.output_shape = (*shape, self.model.hidden_size)
        kernels = self._kernels
        usable = kernels and None not in kernels and not self._torch_ops
        self._kernel = TokenRun(kernels, batch_size, self.model.hidden_size) if usable else None
        self.cache_dtype = self.dtype if self._kernel is None else torch.float32
        self.capacity = 0  # new buffers at the next store

    @property
    def kernel(self) -> TokenRun | None:
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: TokenRun | None) -> None:
        """None runs the torch ops from now on (also after a ``select`` or ``load`` of another batch size), in the
        model's dtype: float32 caches are converted to it."""
        if kernel is not None and self.cache_dtype != torch.float32:
            raise ValueError("`kernel` needs a session with float32 caches: start a new session")
        self._kernel, self._torch_ops = kernel, kernel is None
        if kernel is not None:
            self._bind()  # the buffers may have moved while the torch ops ran
        elif self.cache_dtype != self.dtype:
            # (a pending state is stored, in the new dtype, once the next step checks it)
            state = None if self._pending is not None else self._live_state(copy=True)
            self.cache_dtype, self.capacity = self.dtype, 0
            if state is not None:
                self._store(state)

    @property
    def state(self) -> SRUppState:
        """The session's state as an ``SRUppState`` in the model's dtype, which ``SRUpp.step`` and ``forward`` take
        (copies: the session keeps writing its buffers; float32 caches of a lower-precision model are rounded)."""
        return self._pending if self._pending is not None else self._live_state(copy=True)

    def _live_state(self, copy: bool) -> SRUppState:
        """The live caches as an ``SRUppState`` in the model's dtype: views where ``copy`` is False and the dtypes
        agree, else copies."""
        keys, values, key_pad = self._views()

        def own(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(self.dtype, copy=copy)

        keys, values = ([own(item) for item in items] for items in (keys, values))
        key_pad = key_pad.clone() if copy and key_pad is not None else key_pad
        return SRUppState(own(self.c), keys=keys, values=values, max_context=self.max_context, key_pad=key_pad)

    def _views(self) -> tuple[list[Tensor | None], list[Tensor | None], Tensor | None]:
        """Per layer the live keys and values ``[B, heads, end - start, head_size]`` (None without attention),
        and the live ``key_pad`` ``[B, end - start]`` (None when no position was padding)."""
        length = self.end - self.start
        keys, values = [], []
        for buffer in self.buffers:
            pair = (None, None) if buffer is None else buffer.narrow(3, self.start, length).unbind(1)
            keys.append(pair[0])
            values.append(pair[1])
        return keys, values, None if self.pad is None else self.pad.narrow(1, self.start, length)

    def step(self, input: Tensor, mask_pad: Tensor | None = None) -> Tensor:
        """Feed ``input`` ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``) and, optionally, its
        padding ``mask_pad`` ``[T, B]`` (``[B, T]``); returns the output ``[T, B, hidden_size]`` (``[B, T, ...]``)."""
        if mask_pad is None and self._token_path_applies(input):
            return self._step_token(input)
        return self._step_general(input, mask_pad)[0]

    def step_layers(self, input: Tensor, mask_pad: Tensor | None = None) -> tuple[Tensor, ...]:
        """``step``, returning every layer's output for ``input``: ``num_layers`` tensors shaped as ``step``'s
        output, the last being it. The compiled kernel keeps only the last layer's, so a one-token step takes the
        torch ops of ``token_step`` on the session's buffers, in ``cache_dtype`` (float32 caches: on the kernel's
        float32 weights, each layer's output converted to the model's dtype)."""
        if mask_pad is None and self._token_path_applies(input):
            return self._step_token(input, all_layers=True)
        return self._step_general(input, mask_pad, all_layers=True)

    def _step_general(self, input: Tensor, mask_pad: Tensor | None, all_layers: bool = False) -> tuple[Tensor, ...]:
        """``SRUpp.step`` (``step_layers`` with ``all_layers``) on the session's caches, storing the state it
        returns: ``(output,)``, or with ``all_layers`` every layer's output."""
        state = self._pending if self._pending is not None else self._live_state(copy=False)
        # Tensors made in inference mode (by a step or select there) cannot be saved for backward: normal copies.
        if torch.is_grad_enabled() and any(tensor.is_inference() for tensor in state.tensors()):
            state = state.clone()
        if all_layers:
            outputs, state = self.model.step_layers(input, state, mask_pad=mask_pad)
        else:
            output, state = self.model.step(input, state, mask_pad=mask_pad)
            outputs = (output,)
        self._store(state)
        return outputs

    def _token_path_applies(self, input: object) -> bool:
        return (
            isinstance(input, Tensor)
            and input.shape == self.input_shape
            and input.dtype == self.dtype
            and input.device == self.device
            and self.ready_for_token()
        )

    def ready_for_token(self) -> bool:
        """Whether a one-token step may take the one-token path, whatever its input: the session holds no state
        still to be checked, and the model runs in eval mode without gradients or autocast."""
        return (
            self._pending is None
            and not torch.is_grad_enabled()
            and not self.model.training
            and (not self._inference or torch.is_inference_mode_enabled())
            and not torch.is_autocast_enabled(self.device.type)
        )

    def step_ids(self, ids: Tensor) -> Tensor:
        """One token per stream through ``kernel`` with a language model's ends set on it (``TokenRun.set_ends``):
        ``ids`` ``[1, B]`` int64 in, log-probabilities ``[B, vocab]`` out. The caller checked that ``kernel`` is
        set and ``ready_for_token()``."""
        return self._step_token(ids, ends=True)

    def _step_token(self, input: Tensor, ends: bool = False, all_layers: bool = False) -> Tensor | tuple[Tensor, ...]:
        """One token: the output (``ends``: the log-probabilities), or with ``all_layers`` every layer's output."""
        if self.end == self.capacity:
            self._make_room()
        c = self.c
        c_next = torch.empty_like(c)
        if self.kernel is not None and not all_layers:  # float32 in and out (token ids in with the ends)
            shape = (self.batch_size, self.kernel.vocab_out) if ends else self.output_shape
            output = c.new_empty(shape)
            x = input if ends else input.to(torch.float32)
            self.kernel(x.contiguous(), c, c_next, output, self.start, self.end, ends)
            output = output if ends else output.to(self.dtype)
        else:
            layers = self._token_ops(input, c, c_next)
            output = tuple(map(self._as_output, layers)) if all_layers else self._as_output(layers[-1])
        self.c = c_next
        self.end += 1
        if self.max_context is not None and self.end - self.start > self.max_context:
            self.start = self.end - self.max_context
        return output

    def _token_ops(self, input: Tensor, c: Tensor, c_next: Tensor) -> list[Tensor]:
        """``token_step`` through every layer, on positions ``start..end`` of the buffers (``end`` written now), in
        ``cache_dtype`` (float32 caches: on the float32 weights the kernel binds); every layer's output
        ``[B, hidden_size]`` in ``cache_dtype``."""
        start, length = self.start, self.end + 1 - self.start
        mask = None
        if self.pad is not None:
            self.pad.select(1, self.end).fill_(False)
            mask = self.pad.narrow(1, start, length).logical_not().view(-1, 1, 1, length)
        x, outputs = input.reshape(self.batch_size, -1), []
        if x.dtype != self.cache_dtype:  # (a `.to` that changes nothing still costs a dispatch, per token)
            x = x.to(self.cache_dtype)
        layers = self.weights if self.cache_dtype == self.dtype else self._weights32
        for weights, buffer, c_in, c_out in zip(layers, self.buffers, c.unbind(0), c_next.unbind(0), strict=True):
            window = None if buffer is None else buffer.narrow(3, start, length)
            x = token_step(x, c_in, c_out, weights, window, mask)
            outputs.append(x)
        return outputs

    def _as_output(self, layer_output: Tensor) -> Tensor:
        """A layer's ``[B, hidden_size]`` result of ``_token_ops`` as the step's output: its shape and dtype."""
        output = layer_output.view(self.output_shape)
        return output if output.dtype == self.dtype else output.to(self.dtype)

    def _store(self, state: SRUppState) -> None:
        """Take over a checked ``state`` (``SRUpp.step``'s result): its caches are copied into the buffers."""
        self._pending = None
        self._resize(state.c.shape[1])
        keys = state.keys or [None] * len(self.buffers or self.model.layers)
        values = state.values or keys
        length = next((item.shape[2] for item in keys if item is not None), 0)
        # (buffers made in inference mode cannot be written outside it)
        if length + 1 > self.capacity or (self._inference and not torch.is_inference_mode_enabled()):
            self._allocate(length)
        with torch.no_grad():
            for buffer, layer_keys, layer_values in zip(self.buffers, keys, values, strict=True):
                if buffer is not None:
                    buffer[:, 0, :, :length] = layer_keys
                    buffer[:, 1, :, :length] = layer_values
            if state.key_pad is not None and self.pad is None:
                self.pad = torch.zeros(self.batch_size, self.capacity, dtype=torch.bool, device=self.device)
                self._spare = None  # (it has no padding marks)
                self._bind()
            if self.pad is not None:
                self.pad[:, :length] = False if state.key_pad is None else state.key_pad
            self.c = state.c.detach().to(self.cache_dtype).contiguous().clone()
        self.start, self.end = 0, length

    def _allocate(self, length: int) -> None:
        """Fresh buffers for ``length`` live positions and room to grow: ``2 * (max_context + 1)`` positions with
        a window (then ``_make_room`` only ever moves the live ones back to the start), else twice ``length + 1``."""
        wanted = length if self.max_context is None else max(length, self.max_context)
        self.capacity = max(16, 2 * (wanted + 1))
        self._inference = torch.is_inference_mode_enabled()
        self._spare = None
        head_size = self.model.proj_size // self.model.num_heads
        shape = (self.batch_size, 2, self.model.num_heads, self.capacity, head_size)
        self.buffers = [
            torch.empty(shape, dtype=self.cache_dtype, device=self.device) if layer.has_attention else None
            for layer in self.model.layers
        ]
        if self.pad is not None:
            self.pad = torch.zeros(self.batch_size, self.capacity, dtype=torch.bool, device=self.device)
        self._bind()

    def _bind(self) -> None:
        if self.kernel is not None:
            self.kernel.bind(self.buffers, self.pad)

    def _make_room(self) -> None:
        """Room for one more position at ``end``: the live positions move to the buffers' start where they fill at
        most half of them (a sliding window), else to buffers twice their count."""
        live = self.end - self.start
        if 2 * live > self.capacity:
            old = self._views()
            self._allocate(live)
            for buffer, keys, values in zip(self.buffers, *old[:2], strict=True):
                if buffer is not None:
                    buffer[:, 0, :, :live] = keys
                    buffer[:, 1, :, :live] = values
            if old[2] is not None:
                self.pad[:, :live] = old[2]
        else:  # the live positions start at or after position ``live``: the copies do not overlap
            for buffer in self.buffers:
                if buffer is not None:
                    buffer.narrow(3, 0, live).copy_(buffer.narrow(3, self.start, live))
            if self.pad is not None:
                self.pad.narrow(1, 0, live).copy_(self.pad.narrow(1, self.start, live))
        self.start, self.end = 0, live
