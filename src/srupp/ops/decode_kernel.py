"""The ctypes interface of the compiled one-token decoding kernel (``srupp_token_run`` in csrc/sru_token_impl.h):
one call per token runs every layer of an SRU++ stack, optionally with a language model's embedding and output
layer."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from srupp.ops.library import address, kernel, require_kernel

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


class TokenLayer(ctypes.Structure):
    """One layer's weights for the one-token decoding kernel (``struct srupp_token_layer`` in csrc/sru_cpu.c)."""

    _fields_ = [
        (name, _P)
        for name in ("in_norm_w", "in_norm_b", "wq_t", "wkv_t", "alpha", "norm_w", "norm_b", "wo_t", "u_bias", "gate_v")
    ]
    _fields_ += [("in_norm_eps", ctypes.c_float), ("norm_eps", ctypes.c_float)]
    _fields_ += [(name, _I64) for name in ("in_", "proj", "out", "hidden", "heads")]
    _fields_ += [("has_in_norm", _INT), ("project_skip", _INT)]


class TokenRunArgs(ctypes.Structure):
    """A whole stack's decoding run for the one-token kernel (``struct srupp_token_run`` in csrc/sru_cpu.c)."""

    _fields_ = [
        ("layers", ctypes.POINTER(TokenLayer)),
        ("windows", ctypes.POINTER(_P)),
        ("strides", ctypes.POINTER(_I64)),
        ("pad", _P),
    ]
    _fields_ += [(name, _I64) for name in ("pad_stride", "num_layers", "batch", "width")]
    _fields_ += [(name, _P) for name in ("embedding", "head_t", "head_bias")]
    _fields_ += [(name, _I64) for name in ("vocab_in", "vocab_out")]


_RUN_ARGS = [ctypes.POINTER(TokenRunArgs), _P, _P, _P, _P, _I64, _I64]


def _kernel_ready(tensor: Tensor) -> bool:
    """Whether the one-token kernel can read ``tensor`` as is: float32, on the CPU, contiguous."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


@dataclass
class TokenKernel:
    """One layer's weights bound for the one-token decoding kernel (see ``token_kernel``; ``TokenRun`` runs it)."""

    layer: TokenLayer
    tensors: tuple[Tensor, ...]  # what ``layer`` points into, kept alive with it


class TokenRun:
    """The compiled one-token step of a whole stack (``srupp_token_run_f32_<isa>``) over one decoding run's
    buffers: one call per token for all layers. ``bind`` points it at the run's cache buffers (again whenever
    they are replaced); calling it runs a token. ``set_ends`` adds a language model's embedding and output
    layer, for calls with ``ends=True``: token ids in, log-probabilities out.

    Args:
        kernels: per layer, ``token_kernel``'s binding of its weights.
        batch: rows per token. width: the layers' output size (``hidden_size``).
    """

    def __init__(self, kernels: list[TokenKernel], batch: int, width: int) -> None:
        count = len(kernels)
        self._kernels = kernels
        self._layers = (TokenLayer * count)(*(kernel.layer for kernel in kernels))
        self._windows = (_P * count)()
        self._strides = (_I64 * (4 * count))()
        self._args = TokenRunArgs(self._layers, self._windows, self._strides, None, 0, count, batch, width)
        self._ends_args = TokenRunArgs.from_buffer_copy(self._args)
        self._refs = (ctypes.byref(self._args), ctypes.byref(self._ends_args))
        self._run = require_kernel().function("srupp_token_run_f32", _RUN_ARGS, _INT)
        self._held: tuple = ()
        self._ends: tuple = ()
        self.vocab_out = 0

    def bind(self, buffers: list[Tensor | None], pad: Tensor | None) -> None:
        """Point the run at per layer its cache buffer ``[B, 2, heads, capacity, head_size]`` (None without
        attention) and at the padding marks ``[B, capacity]`` (bool, True = padding; None when the run has none),
        which the kernel clears at each new position."""
        for index, buffer in enumerate(buffers):
            self._windows[index] = address(buffer)
            self._strides[4 * index : 4 * index + 4] = (0, 0, 0, 0) if buffer is None else buffer.stride()[:4]
        for args in (self._args, self._ends_args):
            args.pad, args.pad_stride = address(pad), 0 if pad is None else pad.stride(0)
        self._held = (buffers, pad)

    def set_ends(self, embedding: Tensor, head_t: Tensor, head_bias: Tensor | None) -> None:
        """A language model's ends for calls with ``ends=True``: the embedding table ``[vocab_in, input_size]``
        and the output layer's weight stored ``[width, vocab_out]`` and bias ``[vocab_out]`` (float32, CPU,
        contiguous; kept alive here)."""
        for name, tensor in (("embedding", embedding), ("head_t", head_t), ("head_bias", head_bias)):
            if tensor is not None and not _kernel_ready(tensor):
                raise ValueError(f"`{name}` must be a contiguous float32 CPU tensor")
        args = self._ends_args
        args.embedding, args.head_t, args.head_bias = address(embedding), address(head_t), address(head_bias)
        args.vocab_in, args.vocab_out = embedding.shape[0], head_t.shape[1]
        self.vocab_out = head_t.shape[1]
        self._ends = (embedding, head_t, head_bias)

    def __call__(
        self, x: Tensor, c_in: Tensor, c_out: Tensor, out: Tensor, start: int, end: int, ends: bool = False
    ) -> None:
        """Write position ``end`` of every cache, attend to ``start..end``, and write ``c_out`` ``[layers, B,
        hidden]`` and ``out`` from ``x`` and ``c_in`` (all contiguous): ``x`` ``[B, input_size]`` floats and
        ``out`` the last layer's ``[B, hidden]``, or with ``ends`` ``x`` ``[B]`` int64 token ids and ``out`` the
        log-softmax ``[B, vocab_out]`` of the output layer."""
        status = self._run(
            self._refs[ends], x.data_ptr(), c_in.data_ptr(), c_out.data_ptr(), out.data_ptr(), start, end
        )
        if status == -2:
            raise IndexError(f"a token id is out of range [0, {self._ends_args.vocab_in})")
        if status != 0:
            raise MemoryError("the one-token decoding kernel could not allocate its scratch memory")


def token_kernel(
    *,
    in_norm: tuple | None,
    wq_t: Tensor,
    wkv_t: Tensor | None,
    alpha: Tensor | None,
    norm: tuple,
    wo_t: Tensor,
    u_bias: Tensor,
    gate_v: Tensor,
    heads: int,
    project_skip: bool,
) -> TokenKernel | None:
    """Bind a unidirectional SRU++ layer's weights for the compiled one-token step (float32 on the CPU,
    contiguous; layer norms as ``(shape, weight, bias, eps)``, weights stored ``[in, out]``), or None where the
    kernel is not loaded or a tensor does not qualify (the caller keeps its torch ops then)."""
    norms = [t for norm in (in_norm, norm) if norm is not None for t in norm[1:3] if t is not None]
    tensors = tuple(t for t in (wq_t, wkv_t, alpha, wo_t, u_bias, gate_v, *norms) if t is not None)
    if kernel() is None or not all(map(_kernel_ready, tensors)):
        return None
    proj, out = wq_t.shape[1], wo_t.shape[1]
    layer = TokenLayer(
        address(in_norm[1]) if in_norm else None,
        address(in_norm[2]) if in_norm else None,
        address(wq_t),
        address(wkv_t),
        address(alpha),
        address(norm[1]),
        address(norm[2]),
        address(wo_t),
        address(u_bias),
        address(gate_v),
        in_norm[3] if in_norm else 0.0,
        norm[3],
        wq_t.shape[0],
        proj,
        out,
        gate_v.shape[-1],
        heads,
        int(in_norm is not None),
        int(project_skip),
    )
    return TokenKernel(layer, tensors)
