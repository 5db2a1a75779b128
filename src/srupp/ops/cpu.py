"""The fused CPU backend of the recurrence: the C kernel's forward and backward (csrc/sru_cpu.c, loaded by
``library.py``): launchers that trust their inputs, registered with torch.library as custom ops (which check
them) with autograd; eager calls run the launchers through ``fused.FusedRecurrence``."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from srupp.ops.fused import BACKWARD_SCHEMA, FORWARD_SCHEMA, Launchers, fake_backward, register_autograd, run_forward
from srupp.ops.library import address, is_available, require_kernel, unavailable_reason
from srupp.ops.output_cache import new_output

__all__ = ["is_available", "kernel_function", "sru_recurrence_cpu", "unavailable_reason"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_FORWARD_ARGS = [_P] * 10 + [_I64, _I64, _I64, _INT, _INT]
_BACKWARD_ARGS = [_P] * 14 + [_I64, _I64, _I64, _INT, _INT]
_ARGS = {"forward": _FORWARD_ARGS, "backward": _BACKWARD_ARGS}
# The storage types of u, x, h and their gradients the kernels take; beside the 16-bit ones, the state, the gates'
# parameters and every sum stay float32.
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_HALF = (torch.bfloat16, torch.float16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the state, the gates' parameters and the sums beside u and x of ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


_NAMES = {(way, dtype): f"srupp_sru_{way}_{suffix}" for way in _ARGS for dtype, suffix in _SUFFIX.items()}


def kernel_function(direction: str, dtype: torch.dtype):
    """The C kernel's ``"forward"`` or ``"backward"`` pass for u and x of ``dtype``, bound from the
    loaded library (RuntimeError where it is not available): it trusts every pointer and size it is given."""
    return require_kernel().function(_NAMES[direction, dtype], _ARGS[direction])


def _input_pointers(u, x, v, b, c0, mask_pad, mask_c) -> tuple[int | None, ...]:
    """The addresses of the recurrence's inputs, in the order both kernels take them."""
    return u.data_ptr(), x.data_ptr(), v.data_ptr(), b.data_ptr(), c0.data_ptr(), address(mask_pad), address(mask_c)


def _threads() -> int:
    """torch's thread count; the kernel starts fewer where the work is too small to share."""
    return max(1, torch.get_num_threads())


def _check(name: str, tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tensor.shape == shape and tensor.dtype is dtype and tensor.is_cpu and tensor.is_contiguous():
        return  # the common case in one test: this runs on every eager call
    if tensor.shape != shape:
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}, got {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise ValueError(f"`{name}` must be on the CPU, got {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"`{name}` must be contiguous, got strides {list(tensor.stride())}")


def _check_inputs(u, x, v, b, c0, mask_pad, mask_c) -> tuple[int, int, int]:
    """The raw ops hand data pointers to C, which trusts every size: check them all first (about a
    microsecond per tensor; the public function has already checked, so this only catches direct calls)."""
    if x.dim() != 3:
        raise ValueError(f"`x` must have shape [T, B, D] (3 dims), got {list(x.shape)}")
    steps, batch, hidden = x.shape
    dtype = x.dtype
    if dtype not in _SUFFIX:
        raise TypeError(f"`x` must have dtype float32, float64, bfloat16 or float16, got {dtype}")
    state = state_dtype(dtype)
    _check("x", x, (steps, batch, hidden), dtype)
    _check("u", u, (steps, batch, 3 * hidden), dtype)
    _check("v", v, (2, hidden), state)
    _check("b", b, (2, hidden), state)
    _check("c0", c0, (batch, hidden), state)
    if mask_pad is not None:
        _check("mask_pad", mask_pad, (steps, batch), torch.bool)
    if mask_c is not None:
        _check("mask_c", mask_c, (batch, hidden), state)
    return steps, batch, hidden


def launch_forward(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None,
    mask_c: Tensor | None,
    reverse: bool,
    save_c: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel on inputs ``_check_inputs`` accepts (unchecked here): ``(h, c_last, c_all)``."""
    steps, batch, hidden = x.shape
    forward = kernel_function("forward", x.dtype)
    h = new_output(x)
    c_last = torch.empty_like(c0)
    c_all = new_output(c0, x.shape) if save_c else c0.new_empty(0)
    forward(
        *_input_pointers(u, x, v, b, c0, mask_pad, mask_c),
        h.data_ptr(),
        c_all.data_ptr() if save_c else None,
        c_last.data_ptr(),
        steps,
        batch,
        hidden,
        int(reverse),
        _threads(),
    )
    return h, c_last, c_all


@torch.library.custom_op("srupp::sru_cpu_forward", mutates_args=(), device_types="cpu", schema=FORWARD_SCHEMA)
def sru_cpu_forward(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c):
    _check_inputs(u, x, v, b, c0, mask_pad, mask_c)
    return launch_forward(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c)


@sru_cpu_forward.register_fake
def _(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c):
    return torch.empty_like(x), torch.empty_like(c0), c0.new_empty(x.shape if save_c else (0,))


def launch_backward(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None,
    mask_c: Tensor | None,
    c_all: Tensor,
    grad_h: Tensor,
    grad_c_last: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel on the forward's checked inputs, its ``c_all``, and contiguous gradients of h and c_last
    of their shapes and dtypes (unchecked here): the gradients of ``(u, x, v, b, c0)``."""
    steps, batch, hidden = x.shape
    backward = kernel_function("backward", x.dtype)
    grad_u = new_output(u)
    grad_x = new_output(x)
    grad_vb = c0.new_empty(batch, 4, hidden)
    grad_c0 = torch.empty_like(c0)
    backward(
        *_input_pointers(u, x, v, b, c0, mask_pad, mask_c),
        c_all.data_ptr(),
        grad_h.data_ptr(),
        grad_c_last.data_ptr(),
        grad_u.data_ptr(),
        grad_x.data_ptr(),
        grad_vb.data_ptr(),
        grad_c0.data_ptr(),
        steps,
        batch,
        hidden,
        int(reverse),
        _threads(),
    )
    # One reduction over the batch's partial sums (none for one row); v's and b's gradients are views of it.
    grad_vb = grad_vb[0] if batch == 1 else grad_vb.sum(0)
    return grad_u, grad_x, grad_vb[:2], grad_vb[2:], grad_c0


@torch.library.custom_op("srupp::sru_cpu_backward", mutates_args=(), device_types="cpu", schema=BACKWARD_SCHEMA)
def sru_cpu_backward(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse):
    _check_inputs(u, x, v, b, c0, mask_pad, mask_c)
    _check("c_all", c_all, x.shape, c0.dtype)
    _check("grad_h", grad_h, x.shape, x.dtype)
    _check("grad_c_last", grad_c_last, c0.shape, c0.dtype)
    grad_u, grad_x, grad_v, grad_b, grad_c0 = launch_backward(
        u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse
    )
    # A custom op's outputs may not alias each other.
    return grad_u, grad_x, grad_v.clone(), grad_b.clone(), grad_c0


sru_cpu_backward.register_fake(fake_backward)
register_autograd(sru_cpu_forward, sru_cpu_backward)
LAUNCHERS = Launchers(launch_forward, launch_backward, _check_inputs)


def sru_recurrence_cpu(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None = None,
    mask_c: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Host wrapper: u and x in float32, float64, bfloat16 or float16, the rest in ``state_dtype`` of theirs;
    returns (h in their dtype, c_last in the state's)."""
    return run_forward(sru_cpu_forward, u, x, v, b, c0, mask_pad, mask_c, reverse, LAUNCHERS)


sru_recurrence_cpu.native_half = True  # takes 16-bit u and x as they are (see srupp.ops.recurrence)
