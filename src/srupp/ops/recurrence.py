"""The public SRU recurrence: validation, dtype handling and dispatch to a backend by name."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from srupp.ops import cpu as _cpu
from srupp.ops.naive import sru_recurrence_naive

BACKENDS = ("auto", "naive", "cpu", "triton")
_warned_fallback = False


def _shape(tensor: Tensor) -> list[int]:
    return list(tensor.shape)


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], labels: str) -> None:
    if tensor.shape != expected:
        raise ValueError(f"`{name}` must have shape {labels} = {list(expected)}, got {_shape(tensor)}")


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # `.to` of a tensor already in `dtype` returns it, after a dispatch that costs as much as a small kernel.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def resolve_backend(backend: str, device: torch.device) -> Callable[..., tuple[Tensor, Tensor]]:
    """The recurrence function that backend ``backend`` runs for tensors on ``device``.

    Raises:
        ValueError: ``backend`` is not one of ``BACKENDS``, or ``"cpu"`` with tensors elsewhere.
        RuntimeError: ``backend`` names a fused backend that is not available here, saying how to get it.
    ``"auto"`` falls back to the naive spec where no fused backend runs, with one warning per process.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "naive":
        return sru_recurrence_naive
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        available, reason, run = _cpu.is_available(), _cpu.unavailable_reason, _cpu.sru_recurrence_cpu
    elif backend == "triton" or device.type == "cuda":
        from srupp.ops import triton_kernel  # imports without triton; is_available() says whether it runs

        available = triton_kernel.is_available(device)
        # "auto" survives a GPU that Triton cannot compile for: it warns once and runs the naive spec.
        run = (
            triton_kernel.sru_recurrence_triton if backend == "triton" else triton_kernel.sru_recurrence_triton_or_naive
        )
        reason = lambda: triton_kernel.unavailable_reason(device)  # noqa: E731
    else:
        return _fallback(f"no fused backend for {device.type} tensors")
    if available:
        return run
    if backend == "auto":
        return _fallback(reason())
    raise RuntimeError(reason())


def _fallback(reason: str) -> Callable[..., tuple[Tensor, Tensor]]:
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn(f"{reason}; falling back to the slow 'naive' backend", RuntimeWarning, stacklevel=4)
        _warned_fallback = True
    return sru_recurrence_naive


def sru_recurrence(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor | None = None,
    *,
    mask_pad: Tensor | None = None,
    mask_c: Tensor | None = None,
    reverse: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The SRU recurrence over a whole sequence, time-major like ``nn.LSTM``.

    For t = 1..T (T..1 when ``reverse``), elementwise over batch and features::

        f_t = sigmoid(u_f[t] + v_f * c_{t-1} + b_f)
        r_t = sigmoid(u_r[t] + v_r * c_{t-1} + b_r)
        c_t = f_t * c_{t-1} + (1 - f_t) * u_c[t]
        h_t = x[t] + mask_c * r_t * (c_t - x[t])

    At a padded step (``mask_pad[t, b]`` True) c is carried unchanged and h is 0, so ``c_last``
    holds each sequence's state after its last real step.

    Args:
        u: ``[T, B, 3*D]``, three planar blocks of D features: candidate ``u_c``, forget
            pre-activation ``u_f``, reset pre-activation ``u_r`` (a ``Linear(.., 3*D)`` output as is).
        x: ``[T, B, D]`` the highway input.
        v: ``[2, D]`` = (v_f, v_r).  b: ``[2, D]`` = (b_f, b_r).
        c0: ``[B, D]`` initial state; None means zeros.
        mask_pad: ``[T, B]`` bool, True marks padding.
        mask_c: ``[B, D]`` variational dropout mask on the c-term, constant over time.
        reverse: run the recurrence from the last step to the first.
        backend: ``"auto"`` (CPU -> "cpu", CUDA -> "triton"), ``"naive"``, ``"cpu"`` or ``"triton"``.

    float32 and float64 are computed as given; float16/bfloat16 are computed in float32 and the
    results returned in ``u``'s dtype. ``x``, ``v``, ``b``, ``c0`` and ``mask_c`` may be in
    ``u``'s dtype or in that compute dtype (autocast hands fp32 parameters beside fp16 activations).

    Gradients: first order on every backend; only ``"naive"`` (plain torch ops) also gives higher orders. A fused
    backend refuses more: an eager call raises at ``create_graph=True``, a traced one (torch.compile, torch.func)
    when the second backward reaches its kernels' registered backward.

    Returns:
        ``(h [T, B, D], c_last [B, D])``, both in ``u``'s dtype.

    Example:
        >>> T, B, D = 5, 2, 8
        >>> h, c = sru_recurrence(torch.randn(T, B, 3 * D), torch.randn(T, B, D), torch.rand(2, D), torch.zeros(2, D))
        >>> h.shape, c.shape
        (torch.Size([5, 2, 8]), torch.Size([2, 8]))
    """
    named = {"u": u, "x": x, "v": v, "b": b, "c0": c0, "mask_pad": mask_pad, "mask_c": mask_c}
    for name, tensor in named.items():
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if u.dim() != 3:
        raise ValueError(f"`u` must have shape [T, B, 3*D] (3 dims), got {_shape(u)}")
    if x.dim() != 3:
        raise ValueError(f"`x` must have shape [T, B, D] (3 dims), got {_shape(x)}")
    steps, batch, hidden = x.shape
    if steps == 0:
        raise ValueError(f"`x` must have at least one time step (T >= 1), got shape {_shape(x)}")
    _check_shape("u", u, (steps, batch, 3 * hidden), "[T, B, 3*D]")
    _check_shape("v", v, (2, hidden), "[2, D]")
    _check_shape("b", b, (2, hidden), "[2, D]")
    if c0 is not None:
        _check_shape("c0", c0, (batch, hidden), "[B, D]")
    if mask_c is not None:
        _check_shape("mask_c", mask_c, (batch, hidden), "[B, D]")
    if mask_pad is not None:
        _check_shape("mask_pad", mask_pad, (steps, batch), "[T, B]")
        if mask_pad.dtype != torch.bool:
            raise TypeError(f"`mask_pad` must be a bool tensor (True = padding), got dtype {mask_pad.dtype}")
    if not u.is_floating_point():
        raise TypeError(f"`u` must be a floating-point tensor, got dtype {u.dtype}")
    compute = _cpu.state_dtype(u.dtype)
    device = u.device
    for name in ("x", "v", "b", "c0", "mask_c"):
        tensor = named[name]
        if tensor is None:
            continue
        if tensor.dtype is not u.dtype and tensor.dtype is not compute:
            allowed = str(u.dtype) if compute == u.dtype else f"{u.dtype} or {compute}"
            raise TypeError(f"`{name}` must have dtype {allowed} (that of `u`), got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"`{name}` must be on the device of `u` ({device}), got {tensor.device}")
    if mask_pad is not None and mask_pad.device != device:
        raise ValueError(f"`mask_pad` must be on the device of `u` ({device}), got {mask_pad.device}")
    if not isinstance(reverse, bool):
        raise TypeError(f"`reverse` must be a bool, got {type(reverse).__name__}")

    run = resolve_backend(backend, device)
    if c0 is None:
        c0 = u.new_zeros(batch, hidden, dtype=compute)
    if mask_c is not None:
        mask_c = _cast(mask_c, compute)
    # The Triton kernel reads half-precision activations itself (half the memory traffic) and keeps
    # its state and sums in float32; the other backends compute in `compute` throughout.
    activations = u.dtype if getattr(run, "native_half", False) else compute
    u_in, x_in = _cast(u, activations), _cast(x, activations)
    h, c_last = run(u_in, x_in, _cast(v, compute), _cast(b, compute), _cast(c0, compute), mask_pad, mask_c, reverse)
    return _cast(h, u.dtype), _cast(c_last, u.dtype)
