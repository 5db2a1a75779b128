"""The public op and its fused CPU backend against the naive spec."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srupp.ops import cpu as cpu_backend
from srupp.ops import recurrence, sru_recurrence
from tests.helpers import assert_all_close, outputs_and_grads

NAMES = ["h", "c_last", "grad_u", "grad_x", "grad_v", "grad_b", "grad_c0"]


def make_inputs(steps, batch, hidden, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(steps, batch, 3 * hidden, generator=gen, dtype=dtype)
    x = torch.randn(steps, batch, hidden, generator=gen, dtype=dtype)
    v = torch.rand(2, hidden, generator=gen, dtype=dtype) * 2 - 1
    b = torch.randn(2, hidden, generator=gen, dtype=dtype)
    c0 = torch.randn(batch, hidden, generator=gen, dtype=dtype)
    return u, x, v, b, c0


def make_mask_pad(steps, batch, seed=0):
    """Row 0 has no padding, row 1 pads its tail (left-aligned), row 2 is all padding, more rows random."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(steps, batch, dtype=torch.bool)
    if batch == 1:
        mask[steps // 2 + 1 :, 0] = True
    for row in range(1, batch):
        if row == 1:
            mask[max(1, steps - steps // 3) :, row] = True
        elif row == 2:
            mask[:, row] = True
        else:
            mask[:, row] = torch.rand(steps, generator=gen) < 0.3
    return mask


def make_mask_c(batch, hidden, p=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, hidden, generator=gen) > p).float() / (1 - p)


def compare_backends(steps, batch, hidden, *, use_c0, pad, drop, reverse, dtype=torch.float32, seed=0):
    u, x, v, b, c0 = make_inputs(steps, batch, hidden, dtype=dtype, seed=seed)
    mask_pad = make_mask_pad(steps, batch, seed) if pad else None
    mask_c = make_mask_c(batch, hidden, seed=seed).to(dtype) if drop else None
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(steps, batch, hidden, generator=gen, dtype=dtype),
                torch.randn(batch, hidden, generator=gen, dtype=dtype)]  # fmt: skip

    def run(backend):
        def fn(u, x, v, b, c0):
            return sru_recurrence(u, x, v, b, c0 if use_c0 else None, mask_pad=mask_pad, mask_c=mask_c,
                                  reverse=reverse, backend=backend)  # fmt: skip

        return outputs_and_grads(fn, [u, x, v, b, c0], upstream)

    return run("cpu"), run("naive")


OPTIONS = {
    "plain": dict(use_c0=False, pad=False, drop=False, reverse=False),
    "c0": dict(use_c0=True, pad=False, drop=False, reverse=False),
    "mask_pad": dict(use_c0=True, pad=True, drop=False, reverse=False),
    "mask_c": dict(use_c0=False, pad=False, drop=True, reverse=False),
    "reverse": dict(use_c0=True, pad=False, drop=False, reverse=True),
    "all": dict(use_c0=True, pad=True, drop=True, reverse=True),
}


@pytest.mark.parametrize("option", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("hidden", [1, 5, 64, 130], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("batch", [1, 3], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("steps", [1, 7, 256], ids=lambda t: f"T{t}")
def test_cpu_matches_naive(steps, batch, hidden, option):
    fast, spec = compare_backends(steps, batch, hidden, **OPTIONS[option])
    assert_all_close(NAMES, fast, spec, atol=2e-5, rtol=1e-4)


def test_padding_semantics():
    """At padded steps h is exactly 0 and c is carried, so c_last is the state after the last real step."""
    u, x, v, b, c0 = make_inputs(9, 3, 6)
    mask_pad = make_mask_pad(9, 3)
    for backend in ("naive", "cpu"):
        h, c_last = sru_recurrence(u, x, v, b, c0, mask_pad=mask_pad, backend=backend)
        assert torch.all(h[mask_pad] == 0)
        assert torch.equal(c_last[2], c0[2])  # all padding: the state never moves
        length = int((~mask_pad[:, 1]).sum())
        _, c_short = sru_recurrence(u[:length, 1:2], x[:length, 1:2], v, b, c0[1:2], backend=backend)
        torch.testing.assert_close(c_last[1:2], c_short)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", ["cpu", "naive"])
def test_gradcheck_float64(backend, reverse):
    u, x, v, b, c0 = make_inputs(5, 3, 7, dtype=torch.float64)
    mask_pad = make_mask_pad(5, 3)
    mask_c = make_mask_c(3, 7).double()
    inputs = [t.requires_grad_() for t in (u, x, v, b, c0)]

    def fn(*args):
        return sru_recurrence(*args, mask_pad=mask_pad, mask_c=mask_c, reverse=reverse, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 20),
    batch=st.integers(1, 5),
    hidden=st.integers(1, 140),
    use_c0=st.booleans(),
    pad=st.booleans(),
    drop=st.booleans(),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_matches_naive(steps, batch, hidden, use_c0, pad, drop, reverse, seed):
    fast, spec = compare_backends(steps, batch, hidden, use_c0=use_c0, pad=pad, drop=drop, reverse=reverse, seed=seed)
    assert_all_close(NAMES, fast, spec, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["cpu", "naive"])
def test_half_inputs_computed_in_float32(dtype, backend):
    u, x, v, b, c0 = (t.to(dtype) for t in make_inputs(11, 3, 37))
    mask_pad = make_mask_pad(11, 3)
    h, c_last = sru_recurrence(u, x, v, b, c0, mask_pad=mask_pad, backend=backend)
    assert h.dtype == dtype and c_last.dtype == dtype
    h_ref, c_ref = sru_recurrence(*(t.float() for t in (u, x, v, b, c0)), mask_pad=mask_pad, backend="naive")
    # the only error left is rounding the result to the half type
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(h.float(), h_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(c_last.float(), c_ref, atol=tol, rtol=tol)


def test_autocast_mix_of_half_activations_and_float32_parameters():
    u, x, v, b, c0 = make_inputs(6, 2, 10)
    leaves = [u.bfloat16().requires_grad_(), x.requires_grad_(), v.requires_grad_(), b.requires_grad_()]
    h, c_last = sru_recurrence(*leaves, backend="cpu")
    assert h.dtype == torch.bfloat16
    (h.float().sum() + c_last.float().sum()).backward()
    assert leaves[0].grad.dtype == torch.bfloat16 and leaves[2].grad.dtype == torch.float32
    h_ref, _ = sru_recurrence(u.bfloat16().float(), x, v, b, backend="naive")
    torch.testing.assert_close(h.float(), h_ref, atol=1e-2, rtol=1e-2)


def test_no_grad_forward_skips_saving_states_and_matches():
    u, x, v, b, c0 = make_inputs(8, 2, 9)
    with torch.no_grad():
        h, c_last = sru_recurrence(u, x, v, b, c0, backend="cpu")
    h_ref, c_ref = sru_recurrence(u, x, v, b, c0, backend="naive")
    assert_all_close(["h", "c_last"], [h, c_last], [h_ref, c_ref], atol=1e-5, rtol=1e-5)


def test_torch_compile_matches_eager():
    u, x, v, b, c0 = make_inputs(12, 3, 20)
    mask_pad = make_mask_pad(12, 3)
    upstream = [torch.randn(12, 3, 20), torch.randn(3, 20)]

    def layer(u, x, v, b, c0):
        h, c = sru_recurrence(u * 1.5, x, v, b, c0, mask_pad=mask_pad, backend="cpu")
        return torch.tanh(h), c

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    eager = outputs_and_grads(layer, [u, x, v, b, c0], upstream)
    traced = outputs_and_grads(compiled, [u, x, v, b, c0], upstream)
    assert_all_close(NAMES, traced, eager, atol=1e-6, rtol=1e-5)


def test_registered_ops_pass_opcheck():
    u, x, v, b, c0 = (t.requires_grad_() for t in make_inputs(4, 2, 5))
    mask_pad = make_mask_pad(4, 2)
    torch.library.opcheck(torch.ops.srupp.sru_cpu_forward.default, (u, x, v, b, c0, mask_pad, None, False, True))


# ---- bad input -------------------------------------------------------------------------------------------

T, B, D = 4, 2, 6


def good():
    u, x, v, b, c0 = make_inputs(T, B, D)
    return dict(u=u, x=x, v=v, b=b, c0=c0, mask_pad=torch.zeros(T, B, dtype=torch.bool), mask_c=torch.ones(B, D))


BAD = {
    "u_rank": (
        dict(u=torch.zeros(T, 3 * D)),
        ValueError,
        r"`u` must have shape \[T, B, 3\*D\] \(3 dims\), got \[4, 18\]",
    ),
    "u_width": (
        dict(u=torch.zeros(T, B, 2 * D)),
        ValueError,
        r"`u` must have shape \[T, B, 3\*D\] = \[4, 2, 18\], got \[4, 2, 12\]",
    ),
    "x_rank": (dict(x=torch.zeros(T, D)), ValueError, r"`x` must have shape \[T, B, D\] \(3 dims\), got \[4, 6\]"),
    "v_shape": (dict(v=torch.zeros(D)), ValueError, r"`v` must have shape \[2, D\] = \[2, 6\], got \[6\]"),
    "b_shape": (dict(b=torch.zeros(3, D)), ValueError, r"`b` must have shape \[2, D\] = \[2, 6\], got \[3, 6\]"),
    "c0_batch": (dict(c0=torch.zeros(B + 1, D)), ValueError, r"`c0` must have shape \[B, D\] = \[2, 6\], got \[3, 6\]"),
    "mask_pad_shape": (
        dict(mask_pad=torch.zeros(B, T, dtype=torch.bool)),
        ValueError,
        r"`mask_pad` must have shape \[T, B\] = \[4, 2\], got \[2, 4\]",
    ),
    "mask_pad_dtype": (
        dict(mask_pad=torch.zeros(T, B)),
        TypeError,
        r"`mask_pad` must be a bool tensor .* got dtype torch.float32",
    ),
    "mask_c_shape": (
        dict(mask_c=torch.ones(D)),
        ValueError,
        r"`mask_c` must have shape \[B, D\] = \[2, 6\], got \[6\]",
    ),
    "dtype_mismatch": (
        dict(x=torch.zeros(T, B, D, dtype=torch.float64)),
        TypeError,
        r"`x` must have dtype torch.float32 .* got torch.float64",
    ),
    "int_u": (
        dict(u=torch.zeros(T, B, 3 * D, dtype=torch.int64)),
        TypeError,
        r"`u` must be a floating-point tensor, got dtype torch.int64",
    ),
    "not_tensor": (dict(v=[[0.0] * D] * 2), TypeError, r"`v` must be a torch.Tensor, got list"),
    "empty_time": (
        dict(u=torch.zeros(0, B, 3 * D), x=torch.zeros(0, B, D), mask_pad=None),
        ValueError,
        r"at least one time step \(T >= 1\), got shape \[0, 2, 6\]",
    ),
    "device_mismatch": (
        dict(c0=torch.zeros(B, D, device="meta")),
        ValueError,
        r"`c0` must be on the device of `u` \(cpu\), got meta",
    ),
    "backend_name": (
        dict(backend="cuda"),
        ValueError,
        r"`backend` must be one of \('auto', 'naive', 'cpu', 'triton'\), got 'cuda'",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_named(case):
    override, error, message = BAD[case]
    kwargs = good() | override
    args = [kwargs.pop(name) for name in ("u", "x", "v", "b", "c0")]
    with pytest.raises(error, match=message):
        sru_recurrence(*args, **kwargs)


def test_missing_cpu_kernel_raises_with_instructions(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_KERNEL", None)
    monkeypatch.setattr(cpu_backend, "_LOAD_ERROR", "the compiled kernel is missing")
    u, x, v, b, c0 = make_inputs(3, 1, 4)
    with pytest.raises(RuntimeError, match=r"'cpu' backend is unavailable.*pip install -e \."):
        sru_recurrence(u, x, v, b, backend="cpu")
    monkeypatch.setattr(recurrence, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, _ = sru_recurrence(u, x, v, b, backend="auto")
        sru_recurrence(u, x, v, b, backend="auto")
    assert [str(w.message).count("falling back") for w in caught] == [1], "auto must warn exactly once"
    torch.testing.assert_close(h, sru_recurrence(u, x, v, b, backend="naive")[0])
