"""The Triton backend: forward and backward kernels fused over the sequence, registered with torch.library.

Each program owns one batch row and a block of features and runs the whole time loop with its state in
registers, so the grid is ``(B, cdiv(D, BLOCK_D))``. Activations (u, x, h) are read and written in their
own dtype; state and sums are float32 (float64 for float64 input). CPU tensors run through Triton's
interpreter when ``TRITON_INTERPRET=1`` (how the tests check these kernels without a GPU).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from srupp.ops.fused import fake_backward, register_autograd, run_forward

try:
    import triton
    import triton.language as tl
except ImportError as err:
    triton = tl = None
    _IMPORT_ERROR: str | None = str(err)
else:
    _IMPORT_ERROR = None


def _sru_forward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, h_ptr, c_all_ptr, c_last_ptr,
    T, B, D,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, SAVE_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = cols < D
    v_f = tl.load(v_ptr + cols, mask=keep, other=0)
    v_r = tl.load(v_ptr + D + cols, mask=keep, other=0)
    b_f = tl.load(b_ptr + cols, mask=keep, other=0)
    b_r = tl.load(b_ptr + D + cols, mask=keep, other=0)
    c = tl.load(c0_ptr + row * D + cols, mask=keep, other=0)
    if HAS_MASK_C:
        m = tl.load(mask_c_ptr + row * D + cols, mask=keep, other=0)

    # Step s's inputs are loaded during step s-1 so that their latency overlaps the arithmetic.
    t0 = T - 1 if REVERSE else 0
    u_c_in = tl.load(u_ptr + (t0 * B + row) * 3 * D + cols, mask=keep, other=0)
    u_f_in = tl.load(u_ptr + (t0 * B + row) * 3 * D + D + cols, mask=keep, other=0)
    u_r_in = tl.load(u_ptr + (t0 * B + row) * 3 * D + 2 * D + cols, mask=keep, other=0)
    x_in = tl.load(x_ptr + (t0 * B + row) * D + cols, mask=keep, other=0)
    if HAS_MASK_PAD:
        pad = tl.load(mask_pad_ptr + t0 * B + row) != 0
    for s in range(T):
        t = T - 1 - s if REVERSE else s
        s_next = tl.minimum(s + 1, T - 1)
        t_next = T - 1 - s_next if REVERSE else s_next
        u_c_next = tl.load(u_ptr + (t_next * B + row) * 3 * D + cols, mask=keep, other=0)
        u_f_next = tl.load(u_ptr + (t_next * B + row) * 3 * D + D + cols, mask=keep, other=0)
        u_r_next = tl.load(u_ptr + (t_next * B + row) * 3 * D + 2 * D + cols, mask=keep, other=0)
        x_next = tl.load(x_ptr + (t_next * B + row) * D + cols, mask=keep, other=0)
        if HAS_MASK_PAD:
            pad_next = tl.load(mask_pad_ptr + t_next * B + row) != 0

        u_c = u_c_in.to(c.dtype)
        x = x_in.to(c.dtype)
        f = 1.0 / (1.0 + tl.exp(-(u_f_in.to(c.dtype) + v_f * c + b_f)))
        r = 1.0 / (1.0 + tl.exp(-(u_r_in.to(c.dtype) + v_r * c + b_r)))
        c_new = u_c + f * (c - u_c)
        gate = r * m if HAS_MASK_C else r
        h = x + gate * (c_new - x)
        if HAS_MASK_PAD:
            c_new = tl.where(pad, c, c_new)
            h = tl.where(pad, 0.0, h)
        c = c_new
        tl.store(h_ptr + (t * B + row) * D + cols, h.to(h_ptr.dtype.element_ty), mask=keep)
        if SAVE_C:
            tl.store(c_all_ptr + (t * B + row) * D + cols, c, mask=keep)

        u_c_in, u_f_in, u_r_in, x_in = u_c_next, u_f_next, u_r_next, x_next
        if HAS_MASK_PAD:
            pad = pad_next
    tl.store(c_last_ptr + row * D + cols, c, mask=keep)


def _sru_backward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, c_all_ptr, grad_h_ptr, grad_c_last_ptr,
    grad_u_ptr, grad_x_ptr, grad_vb_ptr, grad_c0_ptr,
    T, B, D,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = cols < D
    v_f = tl.load(v_ptr + cols, mask=keep, other=0)
    v_r = tl.load(v_ptr + D + cols, mask=keep, other=0)
    b_f = tl.load(b_ptr + cols, mask=keep, other=0)
    b_r = tl.load(b_ptr + D + cols, mask=keep, other=0)
    c0 = tl.load(c0_ptr + row * D + cols, mask=keep, other=0)
    if HAS_MASK_C:
        m = tl.load(mask_c_ptr + row * D + cols, mask=keep, other=0)
    grad_c = tl.load(grad_c_last_ptr + row * D + cols, mask=keep, other=0).to(c0.dtype)
    # tl.full rather than tl.zeros: the latter is a @triton.jit helper whose mode (compiled or interpreted)
    # was fixed when triton was imported, while these kernels run in either mode in one process.
    grad_v_f = tl.full([BLOCK_D], 0, c0.dtype)
    grad_v_r = tl.full([BLOCK_D], 0, c0.dtype)
    grad_b_f = tl.full([BLOCK_D], 0, c0.dtype)
    grad_b_r = tl.full([BLOCK_D], 0, c0.dtype)

    # The derivatives are those of csrc/sru_cpu_impl.h. Walk the forward order backwards: the state after
    # step t is carried from the previous iteration; the state before it is c_all at the step the forward
    # ran just before t, or c0 at the forward's first step. Step s's inputs are prefetched during step s-1.
    t0 = 0 if REVERSE else T - 1
    c = tl.load(c_all_ptr + (t0 * B + row) * D + cols, mask=keep, other=0)
    u_c_in = tl.load(u_ptr + (t0 * B + row) * 3 * D + cols, mask=keep, other=0)
    u_f_in = tl.load(u_ptr + (t0 * B + row) * 3 * D + D + cols, mask=keep, other=0)
    u_r_in = tl.load(u_ptr + (t0 * B + row) * 3 * D + 2 * D + cols, mask=keep, other=0)
    x_in = tl.load(x_ptr + (t0 * B + row) * D + cols, mask=keep, other=0)
    grad_h_in = tl.load(grad_h_ptr + (t0 * B + row) * D + cols, mask=keep, other=0)
    t0_prev = tl.minimum(t0 + 1, T - 1) if REVERSE else tl.maximum(t0 - 1, 0)
    c_prev = tl.load(c_all_ptr + (t0_prev * B + row) * D + cols, mask=keep, other=0)
    if HAS_MASK_PAD:
        pad = tl.load(mask_pad_ptr + t0 * B + row) != 0
    for s in range(T):
        t = s if REVERSE else T - 1 - s
        if s == T - 1:
            c_prev = c0
        s_next = tl.minimum(s + 1, T - 1)
        t_next = s_next if REVERSE else T - 1 - s_next
        t_next_prev = tl.minimum(t_next + 1, T - 1) if REVERSE else tl.maximum(t_next - 1, 0)
        u_c_next = tl.load(u_ptr + (t_next * B + row) * 3 * D + cols, mask=keep, other=0)
        u_f_next = tl.load(u_ptr + (t_next * B + row) * 3 * D + D + cols, mask=keep, other=0)
        u_r_next = tl.load(u_ptr + (t_next * B + row) * 3 * D + 2 * D + cols, mask=keep, other=0)
        x_next = tl.load(x_ptr + (t_next * B + row) * D + cols, mask=keep, other=0)
        grad_h_next = tl.load(grad_h_ptr + (t_next * B + row) * D + cols, mask=keep, other=0)
        c_prev_next = tl.load(c_all_ptr + (t_next_prev * B + row) * D + cols, mask=keep, other=0)
        if HAS_MASK_PAD:
            pad_next = tl.load(mask_pad_ptr + t_next * B + row) != 0

        u_c = u_c_in.to(c0.dtype)
        x = x_in.to(c0.dtype)
        grad_h = grad_h_in.to(c0.dtype)
        if HAS_MASK_PAD:
            grad_h = tl.where(pad, 0.0, grad_h)
        f = 1.0 / (1.0 + tl.exp(-(u_f_in.to(c0.dtype) + v_f * c_prev + b_f)))
        r = 1.0 / (1.0 + tl.exp(-(u_r_in.to(c0.dtype) + v_r * c_prev + b_r)))
        gate = r * m if HAS_MASK_C else r
        grad_c_t = grad_c + grad_h * gate
        grad_ur = grad_h * (gate * (1.0 - r)) * (c - x)
        grad_uf = grad_c_t * (c_prev - u_c) * f * (1.0 - f)
        grad_uc = grad_c_t * (1.0 - f)
        grad_c_new = grad_c_t * f + grad_uf * v_f + grad_ur * v_r
        if HAS_MASK_PAD:
            grad_uf = tl.where(pad, 0.0, grad_uf)
            grad_uc = tl.where(pad, 0.0, grad_uc)
            grad_c_new = tl.where(pad, grad_c, grad_c_new)
        grad_c = grad_c_new
        grad_v_f += grad_uf * c_prev
        grad_v_r += grad_ur * c_prev
        grad_b_f += grad_uf
        grad_b_r += grad_ur
        at = (t * B + row) * 3 * D + cols
        grad_u_dtype = grad_u_ptr.dtype.element_ty
        tl.store(grad_u_ptr + at, grad_uc.to(grad_u_dtype), mask=keep)
        tl.store(grad_u_ptr + at + D, grad_uf.to(grad_u_dtype), mask=keep)
        tl.store(grad_u_ptr + at + 2 * D, grad_ur.to(grad_u_dtype), mask=keep)
        tl.store(
            grad_x_ptr + (t * B + row) * D + cols, (grad_h - grad_h * gate).to(grad_x_ptr.dtype.element_ty), mask=keep
        )

        c = c_prev
        u_c_in, u_f_in, u_r_in, x_in, grad_h_in = u_c_next, u_f_next, u_r_next, x_next, grad_h_next
        c_prev = c_prev_next
        if HAS_MASK_PAD:
            pad = pad_next

    tl.store(grad_c0_ptr + row * D + cols, grad_c, mask=keep)
    out = grad_vb_ptr + row * 4 * D + cols
    tl.store(out, grad_v_f, mask=keep)
    tl.store(out + D, grad_v_r, mask=keep)
    tl.store(out + 2 * D, grad_b_f, mask=keep)
    tl.store(out + 3 * D, grad_b_r, mask=keep)


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available(device: torch.device) -> bool:
    """Whether Triton is installed and can run on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return _interpreting(device)


def unavailable_reason(device: torch.device) -> str:
    """Why the Triton backend cannot run on ``device``, with how to get it."""
    if triton is None:
        return (
            f"srupp's 'triton' backend is unavailable: triton does not import ({_IMPORT_ERROR}); "
            "install it with `pip install triton` (PyTorch's CUDA wheels bring it), or pass backend='naive'"
        )
    if device.type == "cuda":
        return "srupp's 'triton' backend needs a working CUDA GPU, and torch.cuda.is_available() is False"
    return (
        f"srupp's 'triton' backend runs on CUDA tensors, got {device.type} tensors; on CPU it runs only in "
        "Triton's interpreter (set TRITON_INTERPRET=1, slow, for testing); use backend='cpu' or 'naive'"
    )


_COMPILED: dict[tuple[str, bool], object] = {}


def _kernel(fn, device: torch.device):
    # Chosen per call rather than by `triton.jit` at import, so that CPU tensors go through the
    # interpreter and CUDA tensors through the compiler whatever TRITON_INTERPRET was at import.
    interpret = device.type == "cpu"
    key = (fn.__name__, interpret)
    if key not in _COMPILED:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _COMPILED[key] = InterpretedFunction(fn)
        else:
            _COMPILED[key] = triton.JITFunction(fn)
    return _COMPILED[key]


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(
        torch.cuda.current_device() if index is None else index
    ).multi_processor_count


def _launch_config(batch: int, hidden: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the largest block that still gives every SM a few programs."""
    if device.type == "cpu":
        # The interpreter runs programs one after another, so fewer and wider programs are faster.
        return min(triton.next_power_of_2(hidden), 1024), 1
    programs_wanted = 4 * _sm_count(device.index)
    block = 32
    for candidate in (256, 128, 64):
        if batch * triton.cdiv(hidden, candidate) >= programs_wanted:
            block = candidate
            break
    block = min(block, max(32, triton.next_power_of_2(hidden)))
    return block, max(1, min(4, block // 32))


def _flag_pointer(mask_pad: Tensor | None, fallback: Tensor) -> Tensor:
    return fallback if mask_pad is None else mask_pad.view(torch.uint8)


@torch.library.custom_op("srupp::sru_triton_forward", mutates_args=())
def sru_triton_forward(
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
    steps, batch, hidden = x.shape
    h = torch.empty(x.shape, dtype=u.dtype, device=u.device)
    c_last = torch.empty_like(c0)
    c_all = torch.empty(x.shape, dtype=c0.dtype, device=u.device) if save_c else c0.new_empty(0)
    if h.numel() == 0:
        c_last.copy_(c0)
        return h, c_last, c_all
    block, warps = _launch_config(batch, hidden, u.device)
    _kernel(_sru_forward_kernel, u.device)[(batch, triton.cdiv(hidden, block))](
        u, x, v, b, c0, _flag_pointer(mask_pad, x), x if mask_c is None else mask_c, h, c_all if save_c else h,
        c_last, steps, batch, hidden,
        HAS_MASK_PAD=mask_pad is not None, HAS_MASK_C=mask_c is not None, REVERSE=reverse, SAVE_C=save_c,
        BLOCK_D=block, num_warps=warps,
    )  # fmt: skip
    return h, c_last, c_all


@sru_triton_forward.register_fake
def _(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c):
    h = torch.empty(x.shape, dtype=u.dtype, device=u.device)
    c_all = torch.empty(x.shape, dtype=c0.dtype, device=u.device) if save_c else c0.new_empty(0)
    return h, torch.empty_like(c0), c_all


@torch.library.custom_op("srupp::sru_triton_backward", mutates_args=())
def sru_triton_backward(
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
    steps, batch, hidden = x.shape
    grad_u = torch.empty_like(u)
    grad_x = torch.empty_like(x)
    grad_c0 = torch.empty_like(c0)
    # One row of partial sums per batch row, summed over B below: no two programs write one address.
    grad_vb = c0.new_empty(batch, 4, hidden)
    if grad_x.numel() == 0:
        grad_u.zero_()
        grad_x.zero_()
        grad_c0.copy_(grad_c_last)
    else:
        block, warps = _launch_config(batch, hidden, u.device)
        _kernel(_sru_backward_kernel, u.device)[(batch, triton.cdiv(hidden, block))](
            u, x, v, b, c0, _flag_pointer(mask_pad, x), x if mask_c is None else mask_c, c_all, grad_h,
            grad_c_last, grad_u, grad_x, grad_vb, grad_c0, steps, batch, hidden,
            HAS_MASK_PAD=mask_pad is not None, HAS_MASK_C=mask_c is not None, REVERSE=reverse,
            BLOCK_D=block, num_warps=warps,
        )  # fmt: skip
    return grad_u, grad_x, grad_vb[:, :2].sum(0).to(v.dtype), grad_vb[:, 2:].sum(0).to(b.dtype), grad_c0


sru_triton_backward.register_fake(fake_backward)
register_autograd(sru_triton_forward, sru_triton_backward)


def sru_recurrence_triton(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None = None,
    mask_c: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Host wrapper: u, x in one dtype (halves allowed); v, b, c0, mask_c in the compute dtype."""
    if triton is None:
        raise RuntimeError(unavailable_reason(u.device))
    return run_forward(sru_triton_forward, u, x, v, b, c0, mask_pad, mask_c, reverse)


sru_recurrence_triton.native_half = True
