"""What the fused backends share: the autograd glue around a (forward, backward) pair of kernels, in two forms.

A backend's forward takes ``(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c)`` and returns
``(h, c_last, c_all)``, where ``c_all`` holds every step's state when ``save_c`` (else it is empty);
its backward takes ``(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse)`` and
returns the gradients of ``(u, x, v, b, c0)``.

Each backend registers the pair as custom ops (``torch.library``), which torch.compile, torch.export and ONNX
see and trace. An eager call goes around them: ``FusedRecurrence``, a plain ``autograd.Function``, calls the
same launchers with none of the custom-op machinery (dispatch, schema checks, a second autograd layer), which
cost a call several times the kernels' own time at small sizes. ``run_forward`` picks the form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

# The custom ops' signatures, the same for every fused backend (torch.library's schema syntax).
FORWARD_SCHEMA = (
    "(Tensor u, Tensor x, Tensor v, Tensor b, Tensor c0, Tensor? mask_pad, Tensor? mask_c, bool reverse, "
    "bool save_c) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor u, Tensor x, Tensor v, Tensor b, Tensor c0, Tensor? mask_pad, Tensor? mask_c, Tensor c_all, "
    "Tensor grad_h, Tensor grad_c_last, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def fake_backward(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last, reverse):
    """Shapes and dtypes of a backward op's results, for tracing (``register_fake``)."""
    return torch.empty_like(u), torch.empty_like(x), torch.empty_like(v), torch.empty_like(b), torch.empty_like(c0)


SECOND_ORDER = (
    "the fused recurrence kernels give first-order gradients only (create_graph=True asked for more); "
    "run sru_recurrence with backend='naive' for higher-order gradients"
)


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


@dataclass(frozen=True)
class Launchers:
    """A fused backend's kernels as plain functions: ``forward`` and ``backward`` as described above, on
    contiguous inputs of matching sizes (what ``check`` verifies where the launchers trust them)."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]
    check: Callable[..., object] | None = None


class FusedRecurrence(torch.autograd.Function):
    """The eager form: one autograd node around a backend's launchers.

    ``apply((launchers, reverse), u, x, v, b, c0)``, with ``mask_pad, mask_c`` after ``c0`` where either is
    given, returns ``(h, c_last)``. Each argument costs every call (autograd inspects it going in and takes a
    gradient slot for it coming out), hence one for the two constants and none for two absent masks."""

    @staticmethod
    def forward(ctx, config: tuple[Launchers, bool], u, x, v, b, c0, mask_pad=None, mask_c=None):
        launchers, reverse = config
        h, c_last, c_all = launchers.forward(u, x, v, b, c0, mask_pad, mask_c, reverse, True)
        ctx.config = config
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, x, v, b, c0, c_all, mask_pad, mask_c)
        return h, c_last

    @staticmethod
    def backward(ctx, grad_h, grad_c_last):
        u, x, v, b, c0, c_all, mask_pad, mask_c = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would carry no graph
            raise RuntimeError(SECOND_ORDER)
        grad_h = torch.zeros(x.shape, dtype=u.dtype, device=u.device) if grad_h is None else grad_h.contiguous()
        if grad_c_last is None:
            grad_c_last = torch.zeros_like(c0)
        elif grad_c_last.dtype is not c0.dtype:
            grad_c_last = grad_c_last.to(c0.dtype)
        launchers, reverse = ctx.config
        grads = launchers.backward(u, x, v, b, c0, mask_pad, mask_c, c_all, grad_h, grad_c_last.contiguous(), reverse)
        return (None, *grads, None, None)[: len(ctx.needs_input_grad)]


def traced(tensors) -> bool:
    """Whether this call is being traced or transformed (torch.compile, torch.export, ONNX or TorchScript
    tracing, fake tensors, a dispatch mode, torch.func), where the custom ops must stand in the graph."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or is_in_torch_dispatch_mode()
        or torch._C._are_functorch_transforms_active()
        or any(type(tensor) not in (Tensor, torch.nn.Parameter) for tensor in tensors if tensor is not None)
    )


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
    launchers: Launchers,
) -> tuple[Tensor, Tensor]:
    """Host side of a fused backend: contiguous inputs in, ``(h, c_last)`` out; states are kept for
    the backward pass only when a gradient will be asked for. Eager calls run ``launchers`` through
    ``FusedRecurrence``; anything traced goes through ``forward_op``, the registered custom op."""
    needs_grad = torch.is_grad_enabled() and (
        u.requires_grad or x.requires_grad or v.requires_grad or b.requires_grad or c0.requires_grad
    )
    masks = (None if mask is None else mask.contiguous() for mask in (mask_pad, mask_c))
    inputs = (u.contiguous(), x.contiguous(), v.contiguous(), b.contiguous(), c0.contiguous(), *masks)
    if not traced(inputs):
        if launchers.check is not None:
            launchers.check(*inputs)
        if needs_grad:
            tensors = inputs if mask_pad is not None or mask_c is not None else inputs[:5]
            return FusedRecurrence.apply((launchers, reverse), *tensors)
        h, c_last, _ = launchers.forward(*inputs, reverse, False)
        return h, c_last
    h, c_last, _ = forward_op(*inputs, reverse, needs_grad)
    return h, c_last
