"""The naive spec against an independent scalar computation written from the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch

from srupp.ops import sru_recurrence_naive


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def scalar_reference(u, x, v, b, c0, mask_pad, mask_c, reverse):
    """One python float at a time, straight from the equations: no tensor ops to share bugs with."""
    steps, batch, hidden = len(x), len(x[0]), len(x[0][0])
    h = [[[0.0] * hidden for _ in range(batch)] for _ in range(steps)]
    c_last = [[0.0] * hidden for _ in range(batch)]
    for row in range(batch):
        for j in range(hidden):
            c = c0[row][j]
            for t in reversed(range(steps)) if reverse else range(steps):
                if mask_pad[t][row]:
                    continue
                u_c, u_f, u_r = u[t][row][j], u[t][row][hidden + j], u[t][row][2 * hidden + j]
                f = sigmoid(u_f + v[0][j] * c + b[0][j])
                r = sigmoid(u_r + v[1][j] * c + b[1][j])
                c = f * c + (1 - f) * u_c
                h[t][row][j] = r * c * mask_c[row][j] + (1 - r * mask_c[row][j]) * x[t][row][j]
            c_last[row][j] = c
    return torch.tensor(h, dtype=torch.float64), torch.tensor(c_last, dtype=torch.float64)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_naive_matches_scalar_equations(reverse):
    gen = torch.Generator().manual_seed(3)
    steps, batch, hidden = 6, 3, 4
    u = torch.randn(steps, batch, 3 * hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(steps, batch, hidden, generator=gen, dtype=torch.float64)
    v = torch.rand(2, hidden, generator=gen, dtype=torch.float64) * 2 - 1
    b = torch.randn(2, hidden, generator=gen, dtype=torch.float64)
    c0 = torch.randn(batch, hidden, generator=gen, dtype=torch.float64)
    mask_pad = torch.zeros(steps, batch, dtype=torch.bool)
    mask_pad[4:, 1] = True
    mask_pad[:, 2] = True
    mask_c = (torch.rand(batch, hidden, generator=gen) > 0.5).double() * 2
    h, c_last = sru_recurrence_naive(u, x, v, b, c0, mask_pad, mask_c, reverse)
    h_ref, c_ref = scalar_reference(
        u.tolist(), x.tolist(), v.tolist(), b.tolist(), c0.tolist(), mask_pad.tolist(), mask_c.tolist(), reverse
    )
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c_last, c_ref, atol=1e-12, rtol=1e-12)


def test_known_value_one_step():
    """T=1, D=1 by hand: f = r = sigmoid(0) = 1/2, c = 1/2 * 2 + 1/2 * 4 = 3, h = 1/2 * 3 + 1/2 * 1 = 2."""
    u = torch.tensor([[[4.0, 0.0, 0.0]]])
    x = torch.tensor([[[1.0]]])
    h, c = sru_recurrence_naive(u, x, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([[2.0]]))
    assert h.item() == 2.0 and c.item() == 3.0
