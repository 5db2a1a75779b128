"""The Triton backend: forward and backward kernels fused over the sequence, registered with torch.library.

Each program owns one batch row and a block of features and runs the whole time loop with its state in
registers, so the grid is ``(B, cdiv(D, BLOCK_D))``. Three variants of the kernels (``VARIANTS``) hide the
DRAM round trip of each step's loads differently; tests/ops/test_triton_sm90.py checks the compiled code.
The lean (the default) and legacy loops are ``tl.range`` loops with ``num_stages``: on sm_80+ their loads are
issued ahead as asynchronous copies into shared memory, at least 4 bytes per thread per load. The prefetch
loops (opt-in) use plain loads into registers, one lane per thread whatever the dtype, issued one block of
steps ahead. Activations (u, x, h) are read and written in their own dtype; state and sums are float32
(float64 for float64 input). CPU tensors run through Triton's interpreter when ``TRITON_INTERPRET=1`` (how
the tests check these kernels without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
from torch import Tensor

from srupp.ops.fused import BACKWARD_SCHEMA, FORWARD_SCHEMA, Launchers, fake_backward, register_autograd, run_forward

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
    BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
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
    # The padding flag is loaded as a vector (every lane reads the same int32) so that the pipeliner can
    # issue it asynchronously with the other loads; a scalar load cannot be.
    same = cols * 0

    # Every step's loads depend only on the loop counter, so with num_stages > 1 the compiler issues them
    # STAGES - 1 steps ahead as asynchronous copies into shared memory, hiding DRAM latency.
    for s in tl.range(0, T, num_stages=STAGES):
        t = T - 1 - s if REVERSE else s
        at = t * B + row
        u_c = tl.load(u_ptr + at * 3 * D + cols, mask=keep, other=0).to(c.dtype)
        u_f = tl.load(u_ptr + at * 3 * D + D + cols, mask=keep, other=0).to(c.dtype)
        u_r = tl.load(u_ptr + at * 3 * D + 2 * D + cols, mask=keep, other=0).to(c.dtype)
        x = tl.load(x_ptr + at * D + cols, mask=keep, other=0).to(c.dtype)
        f = 1.0 / (1.0 + tl.exp(-(u_f + v_f * c + b_f)))
        r = 1.0 / (1.0 + tl.exp(-(u_r + v_r * c + b_r)))
        c_new = u_c + f * (c - u_c)
        gate = r * m if HAS_MASK_C else r
        h = x + gate * (c_new - x)
        if HAS_MASK_PAD:
            # Selects, not products: whatever sits in a padded step's u or x (even NaN) cannot leak.
            pad = tl.load(mask_pad_ptr + at + same) != 0
            c_new = tl.where(pad, c, c_new)
            h = tl.where(pad, 0.0, h)
        c = c_new
        tl.store(h_ptr + at * D + cols, h.to(h_ptr.dtype.element_ty), mask=keep)
        if SAVE_C:
            tl.store(c_all_ptr + at * D + cols, c, mask=keep)
    tl.store(c_last_ptr + row * D + cols, c, mask=keep)


def _sru_backward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, c_all_ptr, grad_h_ptr, grad_c_last_ptr,
    grad_u_ptr, grad_x_ptr, grad_vb_ptr, grad_c0_ptr,
    T, B, D,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """One program walks time backwards for one batch row and BLOCK_D features. It is one long body on
    purpose: the reverse-time loop must stay a single pipelined ``tl.range``, and Triton inlines helpers anyway."""
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
    same = cols * 0

    # The derivatives are those of csrc/sru_cpu_impl.h. Walk the forward order backwards: the state after
    # step t is carried from the previous iteration (it was that iteration's c_prev); the state before it
    # is c_all at the step the forward ran just before t, or c0 at the forward's first step. As in the
    # forward, every load depends only on the loop counter, so they are pipelined STAGES deep.
    t_last = 0 if REVERSE else T - 1
    c = tl.load(c_all_ptr + (t_last * B + row) * D + cols, mask=keep, other=0)
    for s in tl.range(0, T, num_stages=STAGES):
        t = s if REVERSE else T - 1 - s
        not_first = same + s < T - 1  # a vector: the interpreter wants tensor masks
        t_prev = tl.minimum(t + 1, T - 1) if REVERSE else tl.maximum(t - 1, 0)
        at = t * B + row
        u_c = tl.load(u_ptr + at * 3 * D + cols, mask=keep, other=0).to(c0.dtype)
        u_f = tl.load(u_ptr + at * 3 * D + D + cols, mask=keep, other=0).to(c0.dtype)
        u_r = tl.load(u_ptr + at * 3 * D + 2 * D + cols, mask=keep, other=0).to(c0.dtype)
        x = tl.load(x_ptr + at * D + cols, mask=keep, other=0).to(c0.dtype)
        grad_h = tl.load(grad_h_ptr + at * D + cols, mask=keep, other=0).to(c0.dtype)
        c_prev = tl.load(c_all_ptr + (t_prev * B + row) * D + cols, mask=keep & not_first, other=0)
        c_prev = tl.where(not_first, c_prev, c0)
        f = 1.0 / (1.0 + tl.exp(-(u_f + v_f * c_prev + b_f)))
        r = 1.0 / (1.0 + tl.exp(-(u_r + v_r * c_prev + b_r)))
        gate = r * m if HAS_MASK_C else r
        grad_c_t = grad_c + grad_h * gate
        grad_ur = grad_h * (gate * (1.0 - r)) * (c - x)
        grad_uf = grad_c_t * (c_prev - u_c) * f * (1.0 - f)
        grad_uc = grad_c_t * (1.0 - f)
        grad_x = grad_h - grad_h * gate
        grad_c_new = grad_c_t * f + grad_uf * v_f + grad_ur * v_r
        if HAS_MASK_PAD:
            # A padded step passed c through and wrote h = 0: its inputs get zero gradient whatever they
            # hold (selects, so a NaN there cannot leak), and the state's gradient passes through unchanged.
            pad = tl.load(mask_pad_ptr + at + same) != 0
            grad_uf = tl.where(pad, 0.0, grad_uf)
            grad_uc = tl.where(pad, 0.0, grad_uc)
            grad_ur = tl.where(pad, 0.0, grad_ur)
            grad_x = tl.where(pad, 0.0, grad_x)
            grad_c_new = tl.where(pad, grad_c, grad_c_new)
        grad_c = grad_c_new
        grad_v_f += grad_uf * c_prev
        grad_v_r += grad_ur * c_prev
        grad_b_f += grad_uf
        grad_b_r += grad_ur
        grad_u_dtype = grad_u_ptr.dtype.element_ty
        tl.store(grad_u_ptr + at * 3 * D + cols, grad_uc.to(grad_u_dtype), mask=keep)
        tl.store(grad_u_ptr + at * 3 * D + D + cols, grad_uf.to(grad_u_dtype), mask=keep)
        tl.store(grad_u_ptr + at * 3 * D + 2 * D + cols, grad_ur.to(grad_u_dtype), mask=keep)
        tl.store(grad_x_ptr + at * D + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=keep)
        c = c_prev

    tl.store(grad_c0_ptr + row * D + cols, grad_c, mask=keep)
    out = grad_vb_ptr + row * 4 * D + cols
    tl.store(out, grad_v_f, mask=keep)
    tl.store(out + D, grad_v_r, mask=keep)
    tl.store(out + 2 * D, grad_b_f, mask=keep)
    tl.store(out + 3 * D, grad_b_r, mask=keep)


# The lean kernels ("lean" variant): the same recurrence with less work per time step. Loops advance offsets
# or pointers instead of recomputing 64-bit addresses; K steps are unrolled per pipelined iteration, so the
# wait and the barriers of the software pipeline are paid once per K steps; a step's loads are one load (one
# commit group) through a tile of pointers into several tensors: u_c, u_f, u_r and x in the forward (its padding
# flag apart), those, grad_h, c_prev and the padding flag in the backward; exp(-z) is exp2 of a pre-scaled argument;
# the backward's chain on grad_c is two fused operations per step. The time loop runs in two parts from one
# source: whole blocks of K steps with no per-step bounds checks, then the remaining steps one at a time (the
# backward keeps at least one there: the forward's first step reads c0). FAST (16-bit activations on a GPU
# only) takes the sigmoid's reciprocal from rcp.approx.ftz.f32. BENCHMARKS.md has the SASS counts.


def _sru_lean_forward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, h_ptr, c_all_ptr, c_last_ptr,
    T, B, D,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, SAVE_C: tl.constexpr,
    BLOCK_D: tl.constexpr, STAGES: tl.constexpr, K: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = cols < D
    c = tl.load(c0_ptr + row * D + cols, mask=keep, other=0)
    # In the state's dtype: a Python float would be a float32 constant, off by 1e-8 for float64.
    scale = tl.full([BLOCK_D], -1.4426950408889634, c.dtype)  # -log2(e)
    # z * -log2(e) = u * -log2(e) + (b * -log2(e)) + (v * -log2(e)) * c: one FFMA per gate on the c chain.
    v_f = tl.load(v_ptr + cols, mask=keep, other=0) * scale
    v_r = tl.load(v_ptr + D + cols, mask=keep, other=0) * scale
    b_f = tl.load(b_ptr + cols, mask=keep, other=0) * scale
    b_r = tl.load(b_ptr + D + cols, mask=keep, other=0) * scale
    if HAS_MASK_C:
        m = tl.load(mask_c_ptr + row * D + cols, mask=keep, other=0)
    first = T - 1 if REVERSE else 0
    step_x = -B * D if REVERSE else B * D
    step_f = -B if REVERSE else B
    o_x = (first * B + row) * D + cols
    o_u = (first * B + row) * 3 * D + cols
    # The padding flag as a vector (every lane reads the same int32) so the pipeliner can copy it asynchronously.
    o_f = (first * B + row) + cols * 0
    rows = tl.arange(0, 4)[:, None]
    keep4 = keep[None, :] & (rows < 4)
    t_main = T - T % K
    for part in tl.static_range(2):
        for _s in tl.range(0 if part == 0 else t_main, t_main if part == 0 else T, K if part == 0 else 1,
                          num_stages=STAGES):  # fmt: skip
            for _k in tl.static_range(K if part == 0 else 1):
                # Rows u_c, u_f, u_r, x of one [4, BLOCK_D] load, taken apart in registers.
                ptrs = tl.where(rows == 3, x_ptr + o_x[None, :], u_ptr + o_u[None, :] + rows * D)
                pair_a, pair_b = tl.split(tl.reshape(tl.trans(tl.load(ptrs, mask=keep4, other=0)), [BLOCK_D, 2, 2]))
                u_c, u_r = tl.split(pair_a.to(c.dtype))
                u_f, x = tl.split(pair_b.to(c.dtype))
                e_f = 1.0 + tl.exp2(u_f * scale + b_f + v_f * c)
                e_r = 1.0 + tl.exp2(u_r * scale + b_r + v_r * c)
                if FAST:
                    f = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_f], tl.float32, True, 1)
                    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_r], tl.float32, True, 1)
                else:
                    f = 1.0 / e_f
                    r = 1.0 / e_r
                c_new = u_c + f * (c - u_c)
                gate = r * m if HAS_MASK_C else r
                h = x + gate * (c_new - x)
                if HAS_MASK_PAD:
                    pad = tl.load(mask_pad_ptr + o_f) != 0
                    h = tl.where(pad, 0.0, h)
                    c = tl.where(pad, c, c_new)
                else:
                    c = c_new
                tl.store(h_ptr + o_x, h.to(h_ptr.dtype.element_ty), mask=keep)
                if SAVE_C:
                    tl.store(c_all_ptr + o_x, c, mask=keep)
                o_x += step_x
                o_u += 3 * step_x
                o_f += step_f
    tl.store(c_last_ptr + row * D + cols, c, mask=keep)


def _sru_lean_backward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, c_all_ptr, grad_h_ptr, grad_c_last_ptr,
    grad_u_ptr, grad_x_ptr, grad_vb_ptr, grad_c0_ptr,
    T, B, D,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr, K: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Walks the forward's order backwards. Per step, with slope = (c_prev - u_c) f (1 - f) and
    A = f + slope v_f (neither depends on grad_c): grad_c <- (grad_c + grad_h gate) A + grad_u_r v_r.

    A step's loads are one [8, WORDS] tile of words of the state's dtype (one commit group): rows u_c, u_f, u_r,
    x and grad_h hold PACK lanes per word (2 for 16-bit activations, which the launcher sends here only with D
    even and 4-byte aligned tensors; else 1), row 5 + i holds c_prev's lanes i * WORDS to (i + 1) * WORDS - 1
    for i < PACK, and row 7 the padding flag (mask_pad_ptr: FLAG_COPIES copies of each step's flag in the state's
    dtype, so that the row is as contiguous as the others)."""
    PACK: tl.constexpr = c_all_ptr.dtype.element_ty.primitive_bitwidth // u_ptr.dtype.element_ty.primitive_bitwidth
    tl.static_assert(PACK == 1 or PACK == 2, "u must be as wide as the state, or half as wide")
    WORDS: tl.constexpr = BLOCK_D // PACK
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = cols < D
    c0 = tl.load(c0_ptr + row * D + cols, mask=keep, other=0)
    scale = tl.full([BLOCK_D], -1.4426950408889634, c0.dtype)  # -log2(e), see the forward
    v_f = tl.load(v_ptr + cols, mask=keep, other=0)
    v_r = tl.load(v_ptr + D + cols, mask=keep, other=0)
    vs_f = v_f * scale
    vs_r = v_r * scale
    bs_f = tl.load(b_ptr + cols, mask=keep, other=0) * scale
    bs_r = tl.load(b_ptr + D + cols, mask=keep, other=0) * scale
    if HAS_MASK_C:
        m = tl.load(mask_c_ptr + row * D + cols, mask=keep, other=0)
    grad_c = tl.load(grad_c_last_ptr + row * D + cols, mask=keep, other=0).to(c0.dtype)
    # tl.full rather than tl.zeros: see _sru_backward_kernel.
    grad_v_f = tl.full([BLOCK_D], 0, c0.dtype)
    grad_v_r = tl.full([BLOCK_D], 0, c0.dtype)
    grad_b_f = tl.full([BLOCK_D], 0, c0.dtype)
    grad_b_r = tl.full([BLOCK_D], 0, c0.dtype)
    last = 0 if REVERSE else T - 1
    step_x = B * D if REVERSE else -B * D
    step_f = B if REVERSE else -B
    at = last * B + row
    o_x = at * D + cols
    o_u = at * 3 * D + cols
    # The tile's rows 0-2 read u, 3 x, 4 grad_h, 5 on c_all at the step before in the forward's order, 7 the
    # padding flags. Which tensor a row reads is fixed, so its pointers are chosen once and advanced by their
    # row's stride.
    rows = tl.arange(0, 8)[:, None]
    words = tl.program_id(1) * WORDS + tl.arange(0, WORDS)[None, :]
    d_words = D if PACK == 1 else D >> 1  # a shift keeps D's known divisibility, which // loses
    lanes = tl.program_id(1) * BLOCK_D + tl.arange(0, WORDS)[None, :] + (rows - 5) * WORDS  # c's rows
    tile_ptrs = tl.where(
        rows < 3,
        u_ptr.to(c_all_ptr.dtype, bitcast=True) + (at * 3 * d_words + rows * d_words + words),
        tl.where(
            rows == 3,
            x_ptr.to(c_all_ptr.dtype, bitcast=True) + (at * d_words + words),
            tl.where(
                rows == 4,
                grad_h_ptr.to(c_all_ptr.dtype, bitcast=True) + (at * d_words + words),
                c_all_ptr + (at * D + step_x + lanes),
            ),
        ),
    )
    c_rows = (rows >= 5) & (rows < 5 + PACK)
    tile_keep = ((rows < 5) & (words < d_words)) | (c_rows & (lanes < D))
    if HAS_MASK_PAD:
        tile_ptrs = tl.where(rows == 7, mask_pad_ptr + (at * 16 + words % 16), tile_ptrs)  # 16: FLAG_COPIES
        tile_keep = tile_keep | (rows == 7)
    step_w = B * d_words if REVERSE else -B * d_words
    # Per row: 3 * step_w for u, step_w for x and grad_h, step_x for c, 16 * step_f for the flags. Arithmetic, not
    # a select: Triton takes a select of values that are not contiguous to be aligned to nothing.
    tile_step = (
        3 * step_w * (rows < 3).to(tl.int32)
        + step_w * ((rows >= 3) & (rows < 5)).to(tl.int32)
        + step_x * c_rows.to(tl.int32)
        + 16 * step_f * (rows == 7).to(tl.int32)
    )
    grad_u_f_ptr = grad_u_ptr + D
    grad_u_r_ptr = grad_u_ptr + 2 * D
    # The state after the step being undone; the state before it is c_all one step back in the forward's order.
    c = tl.load(c_all_ptr + o_x, mask=keep, other=0)
    t_main = (T - 1) - (T - 1) % K
    for part in tl.static_range(2):
        for s in tl.range(0 if part == 0 else t_main, t_main if part == 0 else T, K if part == 0 else 1,
                          num_stages=STAGES):  # fmt: skip
            for _k in tl.static_range(K if part == 0 else 1):
                if part == 0:
                    tile = tl.load(tile_ptrs, mask=tile_keep, other=0)
                else:
                    # Only this part reaches the forward's first step, whose state before is c0.
                    later = (words * 0 + s) < T - 1
                    tile = tl.load(tile_ptrs, mask=tile_keep & (~c_rows | later), other=0)
                even, odd = tl.split(tl.reshape(tl.trans(tile), [WORDS, 2, 2, 2]))
                rows_04, rows_26 = tl.split(even)
                rows_15, rows_37 = tl.split(odd)
                word_uc, word_gh = tl.split(rows_04)
                word_ur, word_c1 = tl.split(rows_26)
                word_uf, word_c0 = tl.split(rows_15)
                word_x, word_flag = tl.split(rows_37)
                if PACK == 1:
                    u_c, u_f, u_r, x, grad_h, c_prev = word_uc, word_uf, word_ur, word_x, word_gh, word_c0
                    pad = word_flag != 0
                else:
                    # A word's low half is the even lane, its high half the odd one (little-endian).
                    act = u_ptr.dtype.element_ty
                    bits = tl.join(tl.join(word_uc, word_uf), tl.join(word_ur, word_x)).to(tl.int32, bitcast=True)
                    low = bits.to(tl.int16).to(act, bitcast=True).to(c0.dtype)
                    high = (bits >> 16).to(tl.int16).to(act, bitcast=True).to(c0.dtype)
                    # [word, half, u_c or u_f | u_r or x] -> [lane, u_c or u_f | u_r or x]
                    u_cf, u_rx = tl.split(tl.permute(tl.join(low, high), [0, 3, 1, 2]))
                    u_c, u_f = tl.split(tl.reshape(u_cf, [BLOCK_D, 2]))
                    u_r, x = tl.split(tl.reshape(u_rx, [BLOCK_D, 2]))
                    gh_bits = word_gh.to(tl.int32, bitcast=True)
                    gh_low = gh_bits.to(tl.int16).to(act, bitcast=True).to(c0.dtype)
                    gh_high = (gh_bits >> 16).to(tl.int16).to(act, bitcast=True).to(c0.dtype)
                    grad_h = tl.reshape(tl.join(gh_low, gh_high), [BLOCK_D])
                    c_prev = tl.reshape(tl.permute(tl.join(word_c0, word_c1), [1, 0]), [BLOCK_D])
                    pad = tl.reshape(tl.join(word_flag, word_flag), [BLOCK_D]) != 0
                if part == 1:
                    c_prev = tl.where((cols * 0 + s) < T - 1, c_prev, c0)
                e_f = 1.0 + tl.exp2(u_f * scale + bs_f + vs_f * c_prev)
                e_r = 1.0 + tl.exp2(u_r * scale + bs_r + vs_r * c_prev)
                if FAST:
                    f = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_f], tl.float32, True, 1)
                    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_r], tl.float32, True, 1)
                else:
                    f = 1.0 / e_f
                    r = 1.0 / e_r
                gate = r * m if HAS_MASK_C else r
                grad_h_gate = grad_h * gate
                grad_x = grad_h - grad_h_gate
                grad_ur = (grad_h_gate - grad_h_gate * r) * (c - x)
                slope = (c_prev - u_c) * (f - f * f)
                grad_c_t = grad_c + grad_h_gate
                grad_uf = grad_c_t * slope
                grad_uc = grad_c_t - grad_c_t * f
                grad_c_new = grad_c_t * (f + slope * v_f) + grad_ur * v_r
                if HAS_MASK_PAD:
                    # A padded step passed c through and wrote h = 0: zero gradient for what it holds (selects,
                    # so a NaN there cannot leak), and grad_c passes through unchanged.
                    grad_uf = tl.where(pad, 0.0, grad_uf)
                    grad_uc = tl.where(pad, 0.0, grad_uc)
                    grad_ur = tl.where(pad, 0.0, grad_ur)
                    grad_x = tl.where(pad, 0.0, grad_x)
                    grad_c = tl.where(pad, grad_c, grad_c_new)
                else:
                    grad_c = grad_c_new
                grad_v_f += grad_uf * c_prev
                grad_v_r += grad_ur * c_prev
                grad_b_f += grad_uf
                grad_b_r += grad_ur
                grad_u_dtype = grad_u_ptr.dtype.element_ty
                tl.store(grad_u_ptr + o_u, grad_uc.to(grad_u_dtype), mask=keep)
                tl.store(grad_u_f_ptr + o_u, grad_uf.to(grad_u_dtype), mask=keep)
                tl.store(grad_u_r_ptr + o_u, grad_ur.to(grad_u_dtype), mask=keep)
                tl.store(grad_x_ptr + o_x, grad_x.to(grad_x_ptr.dtype.element_ty), mask=keep)
                c = c_prev
                o_x += step_x
                o_u += 3 * step_x
                tile_ptrs += tile_step
    tl.store(grad_c0_ptr + row * D + cols, grad_c, mask=keep)
    out = grad_vb_ptr + row * 4 * D + cols
    tl.store(out, grad_v_f, mask=keep)
    tl.store(out + D, grad_v_r, mask=keep)
    tl.store(out + 2 * D, grad_b_f, mask=keep)
    tl.store(out + 3 * D, grad_b_r, mask=keep)


# The prefetch kernels ("prefetch" variant): one lane per thread whatever the dtype. An asynchronous copy moves
# at least 4 bytes per thread, so a 16-bit lane per thread cannot use one; these kernels issue plain loads a block
# of K steps (STAGES blocks) before the block that uses them, into registers, by hand, and carry them around the
# loop as a ring of tuples (num_stages=1: no shared memory, no barriers, no waits but each load's own). B and D
# are compile-time constants, so every access of a block is one base address per tensor plus an immediate offset.
# The time loop runs in two parts from one source, as the lean loop: whole blocks, then the remaining steps, all
# fetched at once. The compute sits behind a branch (the first iterations only fill the ring): without one ptxas
# hoists it above the loads and sinks them to the end of the iteration. BENCHMARKS.md has the SASS counts.


def _sru_prefetch_forward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, h_ptr, c_all_ptr, c_last_ptr,
    T, B: tl.constexpr, D: tl.constexpr,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, SAVE_C: tl.constexpr,
    BLOCK_D: tl.constexpr, STAGES: tl.constexpr, K: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    # Loads are never masked (a masked load costs a register clear): lanes past D read column D - 1 and only
    # their stores are masked, and not at all when BLOCK_D divides D.
    keep = None if D % BLOCK_D == 0 else cols < D
    inside = tl.minimum(cols, D - 1)
    c = tl.load(c0_ptr + row * D + inside)
    scale = tl.full([BLOCK_D], -1.4426950408889634, c.dtype)  # -log2(e), see the lean forward
    v_f = tl.load(v_ptr + inside) * scale
    v_r = tl.load(v_ptr + D + inside) * scale
    b_f = tl.load(b_ptr + inside) * scale
    b_r = tl.load(b_ptr + D + inside) * scale
    if HAS_MASK_C:
        m = tl.load(mask_c_ptr + row * D + inside)
    S: tl.constexpr = -B * D if REVERSE else B * D  # elements from one step to the next
    TAIL: tl.constexpr = K - 1 if K > 1 else 1
    t_main = T - T % K
    blank = tl.full([BLOCK_D], 0, u_ptr.dtype.element_ty)
    flag = cols * 0
    for part in tl.static_range(2):
        n = K if part == 0 else 1  # steps per iteration
        ahead = (STAGES * K) if part == 0 else TAIL  # steps from a fetch to its use
        start = 0 if part == 0 else t_main
        stop = t_main if part == 0 else T
        at = (T - 1 - (start - ahead) if REVERSE else start - ahead) * B + row  # where the filling starts
        o_x = at * D + inside
        o_u = at * 3 * D + inside
        o_f = at + flag
        ring = ()
        for _j in tl.static_range(STAGES if part == 0 else TAIL):
            block = ()
            for _k in tl.static_range(K if part == 0 else 1):
                block = block + ((blank, blank, blank, blank, flag),)
            ring = ring + (block,)
        # The first iterations only fill the ring; an empty part runs none.
        for s in tl.range(start - ahead, stop if stop > start else start - ahead, n, num_stages=1):
            # The last iterations fetch this part's last block again: every address stays inside.
            dist = tl.minimum(ahead, stop - n - s)
            p_u = u_ptr + o_u + dist * 3 * S
            p_x = x_ptr + o_x + dist * S
            p_f = mask_pad_ptr + o_f + dist * (S // D)
            # This iteration's values, taken from the ring (waiting for them) before its slots are refilled.
            now = ()
            for k in tl.static_range(K if part == 0 else 1):
                got = ring[0][k]
                now = now + (
                    (got[0].to(c.dtype), got[1].to(c.dtype), got[2].to(c.dtype), got[3].to(c.dtype), got[4] != 0),
                )
            fresh = ()
            for k in tl.static_range(K if part == 0 else 1):
                flag_k = flag
                if HAS_MASK_PAD:
                    flag_k = tl.load(p_f + k * (S // D))
                fresh = fresh + ((
                    tl.load(p_u + k * 3 * S),
                    tl.load(p_u + k * 3 * S + D),
                    tl.load(p_u + k * 3 * S + 2 * D),
                    tl.load(p_x + k * S),
                    flag_k,
                ),)  # fmt: skip
            if s >= start:
                for k in tl.static_range(K if part == 0 else 1):
                    u_c, u_f, u_r, x, pad = now[k]
                    e_f = 1.0 + tl.exp2(u_f * scale + b_f + v_f * c)
                    e_r = 1.0 + tl.exp2(u_r * scale + b_r + v_r * c)
                    if FAST:
                        f = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_f], tl.float32, True, 1)
                        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_r], tl.float32, True, 1)
                    else:
                        f = 1.0 / e_f
                        r = 1.0 / e_r
                    c_new = u_c + f * (c - u_c)
                    gate = r * m if HAS_MASK_C else r
                    h = x + gate * (c_new - x)
                    if HAS_MASK_PAD:
                        h = tl.where(pad, 0.0, h)
                        c = tl.where(pad, c, c_new)
                    else:
                        c = c_new
                    tl.store(h_ptr + o_x + k * S, h.to(h_ptr.dtype.element_ty), mask=keep)
                    if SAVE_C:
                        tl.store(c_all_ptr + o_x + k * S, c, mask=keep)
            rest = ()
            for j in tl.static_range(1, STAGES if part == 0 else TAIL):
                rest = rest + (ring[j],)
            ring = rest + (fresh,)
            o_x += n * S
            o_u += n * 3 * S
            o_f += n * (S // D)
    tl.store(c_last_ptr + row * D + inside, c, mask=keep)


def _sru_prefetch_backward_kernel(
    u_ptr, x_ptr, v_ptr, b_ptr, c0_ptr, mask_pad_ptr, mask_c_ptr, c_all_ptr, grad_h_ptr, grad_c_last_ptr,
    grad_u_ptr, grad_x_ptr, grad_vb_ptr, grad_c0_ptr,
    T, B: tl.constexpr, D: tl.constexpr,
    HAS_MASK_PAD: tl.constexpr, HAS_MASK_C: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr, K: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """The lean backward's arithmetic on the prefetch forward's loop. It walks the forward's order backwards;
    the state before each step (c_all one step further on the walk, c0 at its end) comes with the step's loads."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = None if D % BLOCK_D == 0 else cols < D  # see the forward
    inside = tl.minimum(cols, D - 1)
    c0 = tl.load(c0_ptr + row * D + inside)
    scale = tl.full([BLOCK_D], -1.4426950408889634, c0.dtype)  # -log2(e), see the lean forward
    v_f = tl.load(v_ptr + inside)
    v_r = tl.load(v_ptr + D + inside)
    vs_f = v_f * scale
    vs_r = v_r * scale
    bs_f = tl.load(b_ptr + inside) * scale
    bs_r = tl.load(b_ptr + D + inside) * scale
    if HAS_MASK_C:
        m = tl.load(mask_c_ptr + row * D + inside)
    grad_c = tl.load(grad_c_last_ptr + row * D + inside).to(c0.dtype)
    grad_v_f = tl.full([BLOCK_D], 0, c0.dtype)
    grad_v_r = tl.full([BLOCK_D], 0, c0.dtype)
    grad_b_f = tl.full([BLOCK_D], 0, c0.dtype)
    grad_b_r = tl.full([BLOCK_D], 0, c0.dtype)
    S: tl.constexpr = B * D if REVERSE else -B * D  # elements from one step of the walk to the next
    TAIL: tl.constexpr = K  # the rest holds 1 to K steps, the forward's first among them
    t_main = (T - 1) - (T - 1) % K
    # The state after the step being undone: c_all where the walk starts.
    c = tl.load(c_all_ptr + ((0 if REVERSE else T - 1) * B + row) * D + inside)
    blank = tl.full([BLOCK_D], 0, u_ptr.dtype.element_ty)
    flag = cols * 0
    for part in tl.static_range(2):
        n = K if part == 0 else 1
        ahead = (STAGES * K) if part == 0 else TAIL
        start = 0 if part == 0 else t_main
        stop = t_main if part == 0 else T
        at = (start - ahead if REVERSE else T - 1 - (start - ahead)) * B + row  # where the filling starts
        o_x = at * D + inside
        o_u = at * 3 * D + inside
        o_f = at + flag
        ring = ()
        for _j in tl.static_range(STAGES if part == 0 else TAIL):
            block = ()
            for _k in tl.static_range(K if part == 0 else 1):
                block = block + ((blank, blank, blank, blank, blank, c0, flag),)
            ring = ring + (block,)
        for s in tl.range(start - ahead, stop if stop > start else start - ahead, n, num_stages=1):
            dist = tl.minimum(ahead, stop - n - s)  # the last iterations fetch the last block again
            # The state before a step is one step further on the walk; the walk's last step reads its own.
            before = dist + 1 if part == 0 else tl.minimum(dist + 1, T - 1 - s)
            p_u = u_ptr + o_u + dist * 3 * S
            p_x = x_ptr + o_x + dist * S
            p_g = grad_h_ptr + o_x + dist * S
            p_c = c_all_ptr + o_x + before * S
            p_f = mask_pad_ptr + o_f + dist * (S // D)
            now = ()
            for k in tl.static_range(K if part == 0 else 1):
                got = ring[0][k]
                now = now + ((
                    got[0].to(c0.dtype), got[1].to(c0.dtype), got[2].to(c0.dtype), got[3].to(c0.dtype),
                    got[4].to(c0.dtype), got[5], got[6] != 0,
                ),)  # fmt: skip
            fresh = ()
            for k in tl.static_range(K if part == 0 else 1):
                flag_k = flag
                if HAS_MASK_PAD:
                    flag_k = tl.load(p_f + k * (S // D))
                fresh = fresh + ((
                    tl.load(p_u + k * 3 * S),
                    tl.load(p_u + k * 3 * S + D),
                    tl.load(p_u + k * 3 * S + 2 * D),
                    tl.load(p_x + k * S),
                    tl.load(p_g + k * S),
                    tl.load(p_c + k * S),
                    flag_k,
                ),)  # fmt: skip
            if s >= start:
                for k in tl.static_range(K if part == 0 else 1):
                    u_c, u_f, u_r, x, grad_h, c_prev, pad = now[k]
                    if part == 1:
                        c_prev = tl.where(s == T - 1, c0, c_prev)  # the forward's first step began at c0
                    e_f = 1.0 + tl.exp2(u_f * scale + bs_f + vs_f * c_prev)
                    e_r = 1.0 + tl.exp2(u_r * scale + bs_r + vs_r * c_prev)
                    if FAST:
                        f = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_f], tl.float32, True, 1)
                        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e_r], tl.float32, True, 1)
                    else:
                        f = 1.0 / e_f
                        r = 1.0 / e_r
                    gate = r * m if HAS_MASK_C else r
                    grad_h_gate = grad_h * gate
                    grad_x = grad_h - grad_h_gate
                    grad_ur = (grad_h_gate - grad_h_gate * r) * (c - x)
                    slope = (c_prev - u_c) * (f - f * f)
                    grad_c_t = grad_c + grad_h_gate
                    grad_uf = grad_c_t * slope
                    grad_uc = grad_c_t - grad_c_t * f
                    grad_c_new = grad_c_t * (f + slope * v_f) + grad_ur * v_r
                    if HAS_MASK_PAD:
                        grad_uf = tl.where(pad, 0.0, grad_uf)
                        grad_uc = tl.where(pad, 0.0, grad_uc)
                        grad_ur = tl.where(pad, 0.0, grad_ur)
                        grad_x = tl.where(pad, 0.0, grad_x)
                        grad_c = tl.where(pad, grad_c, grad_c_new)
                    else:
                        grad_c = grad_c_new
                    grad_v_f += grad_uf * c_prev
                    grad_v_r += grad_ur * c_prev
                    grad_b_f += grad_uf
                    grad_b_r += grad_ur
                    grad_u_dtype = grad_u_ptr.dtype.element_ty
                    tl.store(grad_u_ptr + o_u + k * 3 * S, grad_uc.to(grad_u_dtype), mask=keep)
                    tl.store(grad_u_ptr + o_u + k * 3 * S + D, grad_uf.to(grad_u_dtype), mask=keep)
                    tl.store(grad_u_ptr + o_u + k * 3 * S + 2 * D, grad_ur.to(grad_u_dtype), mask=keep)
                    tl.store(grad_x_ptr + o_x + k * S, grad_x.to(grad_x_ptr.dtype.element_ty), mask=keep)
                    c = c_prev
            rest = ()
            for j in tl.static_range(1, STAGES if part == 0 else TAIL):
                rest = rest + (ring[j],)
            ring = rest + (fresh,)
            o_x += n * S
            o_u += n * 3 * S
            o_f += n * (S // D)
    tl.store(grad_c0_ptr + row * D + inside, grad_c, mask=keep)
    out = grad_vb_ptr + row * 4 * D + inside
    tl.store(out, grad_v_f, mask=keep)
    tl.store(out + D, grad_v_r, mask=keep)
    tl.store(out + 2 * D, grad_b_f, mask=keep)
    tl.store(out + 3 * D, grad_b_r, mask=keep)


def _sum_rows_kernel(partial_ptr, grad_v_ptr, grad_b_ptr, B, W, BLOCK: tl.constexpr):
    """grad_v, grad_b = the sums over B of the backward's [B, 4, D] partial sums, cast to their dtypes: one
    launch where torch needs a sum and a cast for each."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < W
    total = tl.load(partial_ptr + cols, mask=keep, other=0)
    for i in range(1, B):
        total += tl.load(partial_ptr + i * W + cols, mask=keep, other=0)
    half = W // 2
    tl.store(grad_v_ptr + cols, total.to(grad_v_ptr.dtype.element_ty), mask=cols < half)
    tl.store(grad_b_ptr + cols - half, total.to(grad_b_ptr.dtype.element_ty), mask=keep & (cols >= half))


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton's own minimum for NVIDIA GPUs; the asynchronous copies the kernels are written for need sm_80.
_MIN_CAPABILITY = (7, 5)


def is_available(device: torch.device) -> bool:
    """Whether Triton is installed and can run on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and _capability(device) >= _MIN_CAPABILITY
    return _interpreting(device)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unavailable_reason(device: torch.device) -> str:
    """Why the Triton backend cannot run on ``device``, with how to get it."""
    if triton is None:
        return (
            f"srupp's 'triton' backend is unavailable: triton does not import ({_IMPORT_ERROR}); "
            "install it with `pip install triton` (PyTorch's CUDA wheels bring it), or pass backend='naive'"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "srupp's 'triton' backend needs a working CUDA GPU, and torch.cuda.is_available() is False"
        major, minor = _capability(device)
        return (
            f"srupp's 'triton' backend needs a GPU of compute capability >= "
            f"{_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]}, got {major}.{minor} on {device}"
        )
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
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Launch parameters. STAGES: the legacy loop's pipeline depth in steps. The lean loop runs STEPS time steps
# per iteration and issues its loads LEAN_STAGES - 1 iterations ahead. The prefetch loops run PREFETCH_STEPS
# (forward) or PREFETCH_BACKWARD_STEPS steps per iteration with PREFETCH_STAGES iterations of loads in flight:
# about 500 instructions between a load and its use either way.
# Benchmarks may override any of them, and the variant, for a while with `launch_overrides`. The prefetch
# kernels take B and D as compile-time constants, so they compile once per (B, D): every new batch size (a last
# short batch, generation) costs a compilation. That, until a GPU has measured them, keeps them opt-in.
STAGES = 8
STEPS = 8
LEAN_STAGES = 3
PREFETCH_STEPS = 16
PREFETCH_BACKWARD_STEPS = 8
PREFETCH_STAGES = 1
VARIANTS = ("lean", "legacy", "prefetch")
_STEPS = {"lean": STEPS, "prefetch": PREFETCH_STEPS}
_STAGES = {"lean": LEAN_STAGES, "prefetch": PREFETCH_STAGES}
VARIANT = "lean"
_OVERRIDES: dict[str, int | str] = {}
_OVERRIDABLE = ("stages", "block_d", "num_warps", "steps", "variant")


@contextlib.contextmanager
def launch_overrides(**values: int | str | None):
    """Temporarily fix launch parameters for tuning and A/B benchmarks: ``variant`` ("lean", "legacy" or
    "prefetch"), ``stages`` (the loop's ``num_stages``: steps ahead for legacy, iterations of ``steps`` steps for
    lean; for prefetch, iterations of loads in flight), ``steps`` (lean, and both prefetch kernels), ``block_d``,
    ``num_warps``. None leaves a parameter as it is. The prefetch kernels compile once per (B, D), so each new
    batch size costs a compilation."""
    unknown = set(values) - set(_OVERRIDABLE)
    if unknown:
        raise ValueError(f"`launch_overrides` takes {', '.join(_OVERRIDABLE)}; got {sorted(unknown)}")
    if values.get("variant") not in (None, *VARIANTS):
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {values['variant']!r}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _launch_config(batch: int, hidden: int, element_size: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_D, num_warps, STAGES) for activations of ``element_size`` bytes (STAGES of the legacy loop); 4 for
    one lane per thread whatever the dtype."""
    if device.type == "cpu":
        # The interpreter runs programs one after another, so fewer and wider programs are faster.
        block, warps = min(triton.next_power_of_2(hidden), 1024), 1
    else:
        # Each thread loads at least 4 bytes per row (the smallest asynchronous copy), and the block is the
        # largest that still gives every SM two programs: B * D is all the parallelism there is.
        per_thread = max(1, 4 // element_size)
        smallest = 32 * per_thread
        programs_wanted = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        block = smallest
        for candidate in (4 * smallest, 2 * smallest):
            if batch * triton.cdiv(hidden, candidate) >= programs_wanted:
                block = candidate
                break
        warps = block // smallest
    block = _OVERRIDES.get("block_d", block)
    warps = _OVERRIDES.get("num_warps", warps)
    return block, warps, _OVERRIDES.get("stages", STAGES)


def _variant(u: Tensor, variant: str | None) -> str:
    """The variant a launch runs: the argument, else the override, else VARIANT; lean or prefetch only while
    their int32 offsets (which run up to ``steps * stages`` steps past either end) cannot overflow."""
    chosen = variant or _OVERRIDES.get("variant", VARIANT)
    if chosen not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {chosen!r}")
    if chosen == "legacy":
        return chosen
    steps, batch, width = u.shape
    ahead = 2 * _OVERRIDES.get("steps", _STEPS[chosen]) * _OVERRIDES.get("stages", _STAGES[chosen])
    return "legacy" if (steps + ahead) * batch * width >= 2**31 else chosen


def _lean_options(u: Tensor, variant: str, fn) -> tuple[dict, int]:
    """The constants of lean or prefetch kernel ``fn``, and its STAGES."""
    # The fast reciprocal is PTX: 16-bit activations on a GPU only; fp32, fp64 and the interpreter divide.
    fast = u.is_cuda and u.dtype in (torch.float16, torch.bfloat16)
    steps = _OVERRIDES.get("steps", PREFETCH_BACKWARD_STEPS if fn is _sru_prefetch_backward_kernel else _STEPS[variant])
    return {"K": steps, "FAST": fast}, _OVERRIDES.get("stages", _STAGES[variant])


# Copies of each step's padding flag for the lean backward, which reads them as a row of its tile of loads.
FLAG_COPIES = 16


def _flag_pointer(fn, mask_pad: Tensor | None, fallback: Tensor, state: torch.dtype) -> Tensor:
    """The padding flags as kernel ``fn`` reads them; ``fallback`` where there are none."""
    if mask_pad is None:
        return fallback
    if fn is _sru_lean_backward_kernel:
        # A tile row must be contiguous in runs of 16 words to keep its 16-byte copies (see the kernel).
        return mask_pad[..., None].expand(*mask_pad.shape, FLAG_COPIES).to(state)
    # int32 so that each lane's copy of a step's flag is 4 bytes, the smallest asynchronous copy.
    return mask_pad.to(torch.int32)


def _on_device(tensor: Tensor):
    # Launches go to the current device; tensors on another GPU would be read at illegal addresses.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch(fn, variant: str, inputs: tuple, tensors: tuple, **constants) -> None:
    """Launch recurrence kernel ``fn`` of ``variant`` over a grid of (batch rows, blocks of D): the inputs
    ``(u, x, v, b, c0, mask_pad, mask_c)``, then the kernel's own ``tensors``, the sizes and ``constants``."""
    u, x, v, b, c0, mask_pad, mask_c = inputs
    steps, batch, hidden = x.shape
    # The prefetch kernels run one lane per thread: their plain loads have no 4-byte minimum.
    element_size = 4 if variant == "prefetch" else u.element_size()
    block, warps, stages = _launch_config(batch, hidden, element_size, u.device)
    extra = {}
    if variant != "legacy":
        extra, stages = _lean_options(u, variant, fn)
    _kernel(fn, u.device)[(batch, triton.cdiv(hidden, block))](
        u,
        x,
        v,
        b,
        c0,
        _flag_pointer(fn, mask_pad, x, c0.dtype),
        x if mask_c is None else mask_c,
        *tensors,
        steps,
        batch,
        hidden,
        HAS_MASK_PAD=mask_pad is not None,
        HAS_MASK_C=mask_c is not None,
        **constants,
        BLOCK_D=block,
        STAGES=stages,
        num_warps=warps,
        **extra,
    )


_FORWARD_KERNELS = {
    "lean": _sru_lean_forward_kernel,
    "legacy": _sru_forward_kernel,
    "prefetch": _sru_prefetch_forward_kernel,
}
_BACKWARD_KERNELS = {
    "lean": _sru_lean_backward_kernel,
    "legacy": _sru_backward_kernel,
    "prefetch": _sru_prefetch_backward_kernel,
}


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
    *,
    variant: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel on contiguous inputs: ``(h, c_last, c_all)``, c_all empty unless ``save_c``.
    ``variant`` picks the kernels ("lean", "legacy" or "prefetch"; None: the default, or `launch_overrides`)."""
    h = torch.empty(x.shape, dtype=u.dtype, device=u.device)
    c_last = torch.empty_like(c0)
    c_all = torch.empty(x.shape, dtype=c0.dtype, device=u.device) if save_c else c0.new_empty(0)
    if h.numel() == 0:
        c_last.copy_(c0)
        return h, c_last, c_all
    chosen = _variant(u, variant)
    with _on_device(u):
        _launch(
            _FORWARD_KERNELS[chosen],
            chosen,
            (u, x, v, b, c0, mask_pad, mask_c),
            (h, c_all if save_c else h, c_last),
            REVERSE=reverse,
            SAVE_C=save_c,
        )
    return h, c_last, c_all


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
    *,
    variant: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel on contiguous inputs: the gradients of ``(u, x, v, b, c0)``. The lean and prefetch
    variants sum the per-row partial sums of v's and b's gradients in one small kernel; legacy with torch. 16-bit
    activations run legacy in place of lean unless the lean tile can read them (see `_tile_readable`)."""
    _, batch, hidden = x.shape
    grad_u = torch.empty_like(u)
    grad_x = torch.empty_like(x)
    grad_c0 = torch.empty_like(c0)
    if grad_x.numel() == 0:
        # No step ran: v and b had no effect, and the state's gradient passes through.
        grad_c0.copy_(grad_c_last)
        return grad_u, grad_x, torch.zeros_like(v), torch.zeros_like(b), grad_c0
    # One row of partial sums per batch row, summed over B after: no two programs write one address.
    grad_vb = c0.new_empty(batch, 4, hidden)
    chosen = _variant(u, variant)
    if chosen == "lean" and not _tile_readable(u, x, grad_h, mask_pad):
        chosen = "legacy"
    with _on_device(u):
        _launch(
            _BACKWARD_KERNELS[chosen],
            chosen,
            (u, x, v, b, c0, mask_pad, mask_c),
            (c_all, grad_h, grad_c_last, grad_u, grad_x, grad_vb, grad_c0),
            REVERSE=reverse,
        )
        grad_v, grad_b = _sum_vb(grad_vb, v, b, lean=chosen != "legacy")
    return grad_u, grad_x, grad_v, grad_b, grad_c0


def _tile_readable(u: Tensor, x: Tensor, grad_h: Tensor, mask_pad: Tensor | None) -> bool:
    """Whether the lean backward's tile can read these: one dtype for u and grad_h (the tile reads both as u's),
    two 16-bit values loaded as one 4-byte word (so D even and the tensors 4-byte aligned), and int32 offsets
    that reach FLAG_COPIES per padding flag."""
    if grad_h.dtype != u.dtype:
        return False
    if mask_pad is not None and mask_pad.numel() * FLAG_COPIES >= 2**31:
        return False
    if u.element_size() != 2:
        return True
    return x.shape[-1] % 2 == 0 and all(tensor.data_ptr() % 4 == 0 for tensor in (u, x, grad_h))


def _sum_vb(grad_vb: Tensor, v: Tensor, b: Tensor, *, lean: bool) -> tuple[Tensor, Tensor]:
    """The gradients of v and b from the per-row partial sums ``grad_vb`` ([B, 4, D]): summed over B by one
    small kernel (lean), else by torch."""
    if not lean:
        return grad_vb[:, :2].sum(0).to(v.dtype), grad_vb[:, 2:].sum(0).to(b.dtype)
    grad_v = torch.empty_like(v)
    grad_b = torch.empty_like(b)
    batch, width = grad_vb.shape[0], grad_vb.shape[1] * grad_vb.shape[2]
    block = min(triton.next_power_of_2(width), 1024 if grad_vb.device.type == "cpu" else 256)
    _kernel(_sum_rows_kernel, grad_vb.device)[(triton.cdiv(width, block),)](
        grad_vb, grad_v, grad_b, batch, width, BLOCK=block, num_warps=max(1, block // 128)
    )
    return grad_v, grad_b


@torch.library.custom_op("srupp::sru_triton_forward", mutates_args=(), schema=FORWARD_SCHEMA)
def sru_triton_forward(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c):
    return launch_forward(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c)


@sru_triton_forward.register_fake
def _(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c):
    h = torch.empty(x.shape, dtype=u.dtype, device=u.device)
    c_all = torch.empty(x.shape, dtype=c0.dtype, device=u.device) if save_c else c0.new_empty(0)
    return h, torch.empty_like(c0), c_all


@torch.library.custom_op("srupp::sru_triton_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def sru_triton_backward(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse):
    return launch_backward(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse)


sru_triton_backward.register_fake(fake_backward)
register_autograd(sru_triton_forward, sru_triton_backward)
LAUNCHERS = Launchers(launch_forward, launch_backward)


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
    return run_forward(sru_triton_forward, u, x, v, b, c0, mask_pad, mask_c, reverse, LAUNCHERS)


sru_recurrence_triton.native_half = True


_compile_failure: str | None = None


def sru_recurrence_triton_or_naive(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None = None,
    mask_c: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """What ``backend="auto"`` runs on a GPU: the Triton kernels, or the naive spec (with one warning) from
    the first time Triton fails to compile them for this GPU. Errors raised while running stay errors."""
    global _compile_failure
    if _compile_failure is None:
        try:
            return sru_recurrence_triton(u, x, v, b, c0, mask_pad, mask_c, reverse)
        except Exception as err:
            if not type(err).__module__.startswith("triton"):
                raise
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _compile_failure = f"{type(err).__name__}: {first_line}"
            warnings.warn(
                f"srupp's Triton kernels failed to compile for {u.device} ({_compile_failure}); "
                "falling back to the slow 'naive' backend",
                RuntimeWarning,
                stacklevel=3,
            )
    from srupp.ops.naive import sru_recurrence_naive

    compute = c0.dtype  # half activations are computed in float32, as the other backends do
    return sru_recurrence_naive(u.to(compute), x.to(compute), v, b, c0, mask_pad, mask_c, reverse)


sru_recurrence_triton_or_naive.native_half = True
