"""The two forms of a fused backend (srupp/ops/fused.py): eager calls run the launchers through one plain
autograd.Function, traced ones the registered custom ops; both against the naive spec, every gradient."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from srupp.ops import library, sru_recurrence
from tests.helpers import assert_all_close, outputs_and_grads
from tests.ops.test_recurrence import NAMES, make_inputs, make_mask_c, make_mask_pad

pytest.importorskip("triton")

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not library.is_available(), reason="the CPU kernel is not built")),
    "triton",
]


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: torch's own tracers (FakeTensorMode, make_fx) are such modes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's kernels run on CPU tensors in its interpreter


def nodes_and_results(backend: str, steps: int, batch: int, hidden: int, *, traced: bool, reverse: bool):
    """The autograd node of h and (h, c_last, every gradient) of one call, in float64 with padding and mask_c."""
    u, x, v, b, c0 = make_inputs(steps, batch, hidden, dtype=torch.float64)
    mask_pad, mask_c = make_mask_pad(steps, batch), make_mask_c(batch, hidden).double()
    generator = torch.Generator().manual_seed(1)
    upstream = [
        torch.randn(steps, batch, hidden, generator=generator, dtype=torch.float64),
        torch.randn(batch, hidden, generator=generator, dtype=torch.float64),
    ]
    nodes = []

    def run(u, x, v, b, c0):
        h, c_last = sru_recurrence(u, x, v, b, c0, mask_pad=mask_pad, mask_c=mask_c, reverse=reverse, backend=backend)
        nodes.append(type(h.grad_fn).__name__)
        return h, c_last

    with PassThrough() if traced else contextlib.nullcontext():
        results = outputs_and_grads(run, [u, x, v, b, c0], upstream)
    return nodes[0], results


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_take_the_lean_path_and_traced_ones_the_custom_op(backend, reverse, interpreter):
    """Both forms against the naive spec at odd sizes (T=5, B=3, D=7), padding, mask_c, c0: outputs, final state
    and every gradient."""
    node, eager = nodes_and_results(backend, 5, 3, 7, traced=False, reverse=reverse)
    op_node, traced = nodes_and_results(backend, 5, 3, 7, traced=True, reverse=reverse)
    _, spec = nodes_and_results("naive", 5, 3, 7, traced=False, reverse=reverse)
    assert node == "FusedRecurrenceBackward"
    assert op_node != node and "sru" in op_node.lower(), op_node  # the custom op's autograd node
    assert_all_close(NAMES, eager, spec, atol=1e-10, rtol=1e-9)
    assert_all_close(NAMES, traced, spec, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lean_path_gradcheck_in_float64(backend, interpreter):
    u, x, v, b, c0 = (t.requires_grad_() for t in make_inputs(3, 2, 5, dtype=torch.float64))
    mask_pad = make_mask_pad(3, 2)

    def run(u, x, v, b, c0):
        return sru_recurrence(u, x, v, b, c0, mask_pad=mask_pad, backend=backend)

    assert type(run(u, x, v, b, c0)[0].grad_fn).__name__ == "FusedRecurrenceBackward"
    assert torch.autograd.gradcheck(run, (u, x, v, b, c0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lean_path_with_only_one_output_used(backend, interpreter):
    """Autograd hands None for an output nobody differentiates: the backward takes it as zeros, as the spec does."""
    u, x, v, b, c0 = make_inputs(4, 2, 6, dtype=torch.float64)
    for pick in (0, 1):
        grads = [
            torch.autograd.grad(sru_recurrence(*leaves, backend=name)[pick].sum(), leaves, materialize_grads=True)
            for name in (backend, "naive")
            for leaves in [[t.clone().requires_grad_() for t in (u, x, v, b, c0)]]
        ]
        assert_all_close(NAMES[2:], list(grads[0]), list(grads[1]), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lean_path_refuses_higher_order_gradients(backend, interpreter):
    """The kernels' gradients carry no graph: create_graph=True raises one clear error (it once dropped the
    second-order terms silently), where the naive spec's gradients are differentiable."""
    leaves = [t.requires_grad_() for t in make_inputs(3, 2, 5, dtype=torch.float64)]
    h, _ = sru_recurrence(*leaves, backend="naive")
    assert all(g.requires_grad for g in torch.autograd.grad(h.sum(), leaves, create_graph=True))
    h, _ = sru_recurrence(*leaves, backend=backend)
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='naive'"):
        torch.autograd.grad(h.sum(), leaves, create_graph=True)
