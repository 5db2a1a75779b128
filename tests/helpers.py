"""Shared numerical test helpers: run a function with fixed upstream gradients and compare everything."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def outputs_and_grads(
    fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor], upstream: Sequence[Tensor]
) -> list[Tensor]:
    """Call ``fn(*inputs)``, backpropagate ``upstream`` and return the outputs then every input's gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outputs, wanted, upstream, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads, strict=True)]
    return [o.detach() for o in outputs] + list(grads)


def assert_all_close(
    names: Sequence[str], actual: Sequence[Tensor], expected: Sequence[Tensor], *, atol: float, rtol: float
) -> None:
    """Compare tensors pairwise; on failure report the max abs and relative error of every pair."""
    assert len(names) == len(actual) == len(expected), (len(names), len(actual), len(expected))
    report, failed = [], False
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a.shape == e.shape, f"{name}: shape {list(a.shape)} != {list(e.shape)}"
        a64, e64 = a.double(), e.double()
        err = (a64 - e64).abs()
        max_abs = err.max().item() if err.numel() else 0.0
        max_rel = (err / e64.abs().clamp_min(1e-12)).max().item() if err.numel() else 0.0
        ok = torch.allclose(a64, e64, atol=atol, rtol=rtol)
        failed |= not ok
        report.append(f"{name}: max abs {max_abs:.3g}, max rel {max_rel:.3g}{'' if ok else '  <-- FAIL'}")
    assert not failed, f"mismatch (atol={atol}, rtol={rtol}):\n" + "\n".join(report)
