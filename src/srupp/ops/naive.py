"""The SRU recurrence as a readable time loop: the spec every fast backend is tested against."""

from __future__ import annotations

import torch
from torch import Tensor


def sru_recurrence_naive(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None = None,
    mask_c: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run the SRU recurrence step by step with plain PyTorch ops (autograd gives the gradients).

    With ``u = [u_c | u_f | u_r]`` (planar blocks of D features), ``v = (v_f, v_r)``,
    ``b = (b_f, b_r)`` and ``m = mask_c`` (1 when None), for t = 1..T (T..1 when ``reverse``)::

        f_t = sigmoid(u_f[t] + v_f * c_{t-1} + b_f)
        r_t = sigmoid(u_r[t] + v_r * c_{t-1} + b_r)
        c_t = f_t * c_{t-1} + (1 - f_t) * u_c[t]
        h_t = x[t] + m * r_t * (c_t - x[t])

    At a step where ``mask_pad[t, b]`` is True, ``c`` is carried unchanged and ``h`` is 0, selected
    rather than blended: the padded entries of ``u`` and ``x`` are never read, so whatever they hold
    (NaN included) reaches no output and no gradient but their own (zero).

    Args:
        u: ``[T, B, 3*D]``.  x: ``[T, B, D]``.  v, b: ``[2, D]``.  c0: ``[B, D]``.
        mask_pad: ``[T, B]`` bool or None.  mask_c: ``[B, D]`` or None.
        reverse: run from t = T down to 1.

    Returns:
        ``(h [T, B, D], c_last [B, D])`` in the dtype of ``u``.
    """
    steps, batch, width = u.shape
    hidden = width // 3
    # unbind over time once: indexing u[t] instead would make every step's backward write a
    # gradient the size of the whole of u, O(T^2) work.
    u_steps = u.view(steps, batch, 3, hidden).unbind(0)
    x_steps = x.unbind(0)
    v_f, v_r = v
    b_f, b_r = b
    c = c0
    hs: list[Tensor] = [u.new_zeros(())] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        u_t, x_t = u_steps[t], x_steps[t]
        if mask_pad is not None:
            # Padded entries are replaced before any arithmetic reads them: a NaN or inf there would
            # otherwise reach real outputs through the gradient (0 * NaN is NaN).
            pad = mask_pad[t].unsqueeze(-1)
            u_t = torch.where(pad.unsqueeze(-1), 0.0, u_t)
            x_t = torch.where(pad, 0.0, x_t)
        u_c, u_f, u_r = u_t.unbind(1)
        f = torch.sigmoid(u_f + v_f * c + b_f)
        r = torch.sigmoid(u_r + v_r * c + b_r)
        c_new = f * c + (1 - f) * u_c
        gate = r if mask_c is None else mask_c * r
        h = x_t + gate * (c_new - x_t)
        if mask_pad is not None:
            c_new = torch.where(pad, c, c_new)
            h = torch.where(pad, 0.0, h)
        c = c_new
        hs[t] = h
    return torch.stack(hs), c
