"""What the fused backends share: the autograd glue around a (forward, backward) pair of custom ops.

A backend's forward op takes ``(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c)`` and returns
``(h, c_last, c_all)``, where ``c_all`` holds every step's state when ``save_c`` (else it is empty);
its backward op takes ``(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse)`` and
returns the gradients of ``(u, x, v, b, c0)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fake_backward(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse):
    """Shapes and dtypes of a backward op's results, for tracing (``register_fake``)."""
    return torch.empty_like(u), torch.empty_like(x), torch.empty_like(v), torch.empty_like(b), torch.empty_like(c0)


def register_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable through ``backward_op``."""

    def setup_context(ctx, inputs, output):
        u, x, v, b, c0, mask_pad, mask_c, reverse, save_c = inputs
        ctx.reverse = reverse
        # Unused outputs (c_all always, c_last usually) get None, not a zero tensor the size of the sequence.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, x, v, b, c0, mask_pad, mask_c, output[2])

    def backward(ctx, grad_h, grad_c_last, _grad_c_all):
        u, x, v, b, c0, mask_pad, mask_c, c_all = ctx.saved_tensors
        if c_all.numel() == 0 and x.numel() != 0:
            raise RuntimeError(f"{forward_op} ran with save_c=False, so it cannot be differentiated")
        grad_h = torch.zeros(x.shape, dtype=u.dtype, device=u.device) if grad_h is None else grad_h.contiguous()
        grad_c_last = torch.zeros_like(c0) if grad_c_last is None else grad_c_last.to(c0.dtype).contiguous()
        grads = backward_op(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, ctx.reverse)
        return *grads, None, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)


def run_forward(
    forward_op,
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None,
    mask_c: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, Tensor]:
    """Host side of a fused backend: contiguous inputs in, ``(h, c_last)`` out; states are kept for
    the backward pass only when a gradient will be asked for."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, x, v, b, c0))
    h, c_last, _ = forward_op(
        u.contiguous(), x.contiguous(), v.contiguous(), b.contiguous(), c0.contiguous(),
        None if mask_pad is None else mask_pad.contiguous(),
        None if mask_c is None else mask_c.contiguous(),
        reverse, needs_grad,
    )  # fmt: skip
    return h, c_last
