"""The public op and its fused CPU backend against the naive spec."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from srupp.ops import library, output_cache, recurrence, sru_recurrence
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
    upstream = [
        torch.randn(steps, batch, hidden, generator=gen, dtype=dtype),
        torch.randn(batch, hidden, generator=gen, dtype=dtype),
    ]

    def run(backend):
        def fn(u, x, v, b, c0):
            return sru_recurrence(
                u, x, v, b, c0 if use_c0 else None, mask_pad=mask_pad, mask_c=mask_c, reverse=reverse, backend=backend
            )

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_registered_ops_pass_opcheck(dtype):
    u, x, v, b, c0 = make_inputs(4, 2, 5)
    u, x = (t.to(dtype).requires_grad_() for t in (u, x))
    v, b, c0 = (t.requires_grad_() for t in (v, b, c0))
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
    monkeypatch.setattr(library, "_KERNEL", None)
    monkeypatch.setattr(library, "_LOAD_ERROR", "the compiled kernel is missing")
    u, x, v, b, c0 = make_inputs(3, 1, 4)
    with pytest.raises(RuntimeError, match=r"'cpu' backend is unavailable.*pip install"):
        sru_recurrence(u, x, v, b, backend="cpu")
    monkeypatch.setattr(recurrence, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, _ = sru_recurrence(u, x, v, b, backend="auto")
        sru_recurrence(u, x, v, b, backend="auto")
    assert [str(w.message).count("falling back") for w in caught] == [1], "auto must warn exactly once"
    torch.testing.assert_close(h, sru_recurrence(u, x, v, b, backend="naive")[0])


# ---- instruction-set variants of the CPU kernel -------------------------------------------------------------


@pytest.fixture
def force_isa(monkeypatch):
    """Switch the CPU kernel to one variant for a test, and back to the default after it."""

    def force(isa):
        if isa not in library.cpu_kernel_info()["available"]:
            pytest.skip(f"this CPU cannot run the {isa} variant")
        monkeypatch.setenv("SRUPP_CPU_ISA", isa)
        library.reset()
        assert library.cpu_kernel_info()["isa"] == isa

    yield force
    monkeypatch.delenv("SRUPP_CPU_ISA", raising=False)
    library.reset()


# The full grid above runs on the variant this CPU picks by default (the widest); every variant it can
# run gets this representative subset, in both precisions, plus pre-activations far into the saturated
# range of the sigmoids (the vectorised exp clamps its input there).
ISA_CASES = {
    "all_T7_D130": dict(steps=7, batch=3, hidden=130, option="all"),
    "plain_T1_D5": dict(steps=1, batch=2, hidden=5, option="plain"),
    "mask_c_T256_D64": dict(steps=256, batch=1, hidden=64, option="mask_c"),
    "reverse_T9_D300": dict(steps=9, batch=2, hidden=300, option="reverse"),
    # the forward's outputs of 8 MiB and more go out through non-temporal stores, with plain copies for the
    # unaligned head and tail of each row (D odd); masks, c0 and reverse along
    "streamed_all_T257_D1031": dict(steps=257, batch=8, hidden=1031, option="all"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(ISA_CASES), ids=list(ISA_CASES))
@pytest.mark.parametrize("isa", library.ISAS)
def test_every_isa_variant_matches_naive(isa, case, dtype, force_isa):
    force_isa(isa)
    c = ISA_CASES[case]
    fast, spec = compare_backends(c["steps"], c["batch"], c["hidden"], dtype=dtype, **OPTIONS[c["option"]])
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    assert_all_close(NAMES, fast, spec, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("isa", library.ISAS)
def test_every_isa_variant_saturates_like_naive(isa, dtype, force_isa):
    force_isa(isa)
    u, x, v, b, c0 = make_inputs(5, 3, 37, dtype=dtype)
    u = u * 300  # pre-activations up to about +-1000: exp over- and underflows in both precisions
    u[0, 0, 37 : 37 + 3] = torch.tensor([float("inf"), float("-inf"), 1e30], dtype=dtype)  # forget gate
    u[1, 0, 74 : 74 + 3] = torch.tensor([float("inf"), float("-inf"), -1e30], dtype=dtype)  # reset gate
    h, c_last = sru_recurrence(u, x, v, b, c0, backend="cpu")
    h_ref, c_ref = sru_recurrence(u, x, v, b, c0, backend="naive")
    finite = torch.isfinite(h_ref)
    assert torch.equal(torch.isfinite(h), finite)
    # values reach ~300 here, so the float32 tolerances are relative to that scale
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(h[finite], h_ref[finite], **tol)
    torch.testing.assert_close(c_last, c_ref, equal_nan=True, **tol)


@pytest.mark.parametrize("gate", ["forget", "reset"])
@pytest.mark.parametrize("isa", library.ISAS)
def test_nan_in_real_input_propagates(isa, gate, force_isa):
    """A NaN pre-activation of a real step reaches the outputs and gradients the spec's does (the exp's clamp
    must not turn it into a number), in every variant, forward and backward."""
    force_isa(isa)
    u, x, v, b, c0 = make_inputs(4, 2, 19)
    u[1, 0, 19 * (1 if gate == "forget" else 2) + 3] = float("nan")
    upstream = [torch.randn(4, 2, 19, generator=torch.Generator().manual_seed(1)), torch.ones(2, 19)]
    fast, spec = (
        outputs_and_grads(lambda *a, backend=backend: sru_recurrence(*a, backend=backend), [u, x, v, b, c0], upstream)
        for backend in ("cpu", "naive")
    )
    h, c_last = fast[:2]
    if gate == "forget":
        assert torch.isnan(h[1:, 0, 3]).all() and torch.isnan(c_last[0, 3])
    else:
        assert torch.isnan(h[1, 0, 3]) and torch.isfinite(h[2:, 0, 3]).all()
    assert torch.isfinite(h[:, 1]).all() and torch.isfinite(c_last[1]).all()
    for name, got, want in zip(NAMES, fast, spec, strict=True):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN in other places than the spec's"
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=2e-5, rtol=1e-4, msg=name)


# bfloat16 and float16 storage: u, x, h and their gradients in 16 bits, the state, the gates' parameters and every
# sum in float32. The spec runs in float32 on the same rounded inputs and upstream gradients, so what is left is the
# kernel's one rounding of each 16-bit result, at most half a unit in the last place (2^-9 of the value for
# bfloat16, 2^-12 for float16); the tolerance is a whole unit (2^-8, 2^-11) over float32's. The outputs from 8 MiB
# up (the streamed case's, here in 16 bits) go out through non-temporal stores.
HALF_RTOL = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
HALF_CASES = {**ISA_CASES, "streamed_all_T257_D1031": dict(steps=257, batch=16, hidden=1031, option="all")}


@functools.cache
def half_case(case: str, dtype: torch.dtype, backend: str) -> list[Tensor]:
    """Outputs and gradients of one HALF_CASES case, its inputs rounded to ``dtype``: the kernel's (on the variant
    in use) with 16-bit u, x and upstream gradients, or the float32 spec's (once for all variants) on their values."""
    c = HALF_CASES[case]
    steps, batch, hidden, option = c["steps"], c["batch"], c["hidden"], OPTIONS[c["option"]]
    u, x, v, b, c0 = make_inputs(steps, batch, hidden)
    mask_pad = make_mask_pad(steps, batch) if option["pad"] else None
    mask_c = make_mask_c(batch, hidden) if option["drop"] else None
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(steps, batch, hidden, generator=gen), torch.randn(batch, hidden, generator=gen)]
    storage = dtype if backend == "cpu" else torch.float32
    u, x, *upstream = (t.to(dtype).to(storage) for t in (u, x, *upstream))  # c_last comes back in u's dtype

    def fn(u, x, v, b, c0):
        return sru_recurrence(
            u,
            x,
            v,
            b,
            c0 if option["use_c0"] else None,
            mask_pad=mask_pad,
            mask_c=mask_c,
            reverse=option["reverse"],
            backend=backend,
        )

    return outputs_and_grads(fn, [u, x, v, b, c0], upstream)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", list(HALF_CASES), ids=list(HALF_CASES))
@pytest.mark.parametrize("isa", library.ISAS)
def test_every_isa_variant_stores_half_precision(isa, case, dtype, force_isa):
    force_isa(isa)
    fast = half_case.__wrapped__(case, dtype, "cpu")
    spec = half_case(case, dtype, "naive")
    assert [t.dtype for t in fast] == [dtype] * 4 + [torch.float32] * 3  # h, c_last, grad_u, grad_x; the rest
    stored, summed = [0, 1, 2, 3], [4, 5, 6]
    assert_all_close(
        [NAMES[i] for i in stored],
        [fast[i] for i in stored],
        [spec[i] for i in stored],
        atol=2e-5,
        rtol=HALF_RTOL[dtype],
    )
    assert_all_close(
        [NAMES[i] for i in summed], [fast[i] for i in summed], [spec[i] for i in summed], atol=1e-4, rtol=1e-4
    )


def test_forced_isa_is_checked(monkeypatch, force_isa):
    monkeypatch.setenv("SRUPP_CPU_ISA", "sse9")
    library.reset()
    with pytest.raises(
        ValueError, match=r"`SRUPP_CPU_ISA` must be one of \('baseline', 'avx2', 'avx512', 'avx512bf16'\).*'sse9'"
    ):
        library.cpu_kernel_info()
    # a CPU that can only run the baseline: asking for AVX-512 fails in one line, and by default it
    # gets the baseline
    monkeypatch.setattr(library, "_supported_mask", lambda lib: 1)
    monkeypatch.setenv("SRUPP_CPU_ISA", "avx512")
    library.reset()
    u, x, v, b, _ = make_inputs(3, 1, 4)
    with pytest.raises(ValueError, match=r"asks for 'avx512', which this CPU cannot run; it can run \('baseline',\)"):
        sru_recurrence(u, x, v, b, backend="cpu")
    monkeypatch.delenv("SRUPP_CPU_ISA")
    library.reset()
    info = library.cpu_kernel_info()
    assert info["isa"] == "baseline" and info["available"] == ["baseline"] and info["loaded"]
    assert info["threads"] == torch.get_num_threads() and info["reason"] is None


def test_kernel_info_when_missing(monkeypatch):
    monkeypatch.setattr(library, "_KERNEL", None)
    monkeypatch.setattr(library, "_LOAD_ERROR", "the compiled kernel is missing")
    info = library.cpu_kernel_info()
    info.pop("cache_bytes")
    assert info.pop("bf16_matmul") in ("amx", "avx512_bf16", None)  # torch's answer, without the library
    assert info == {
        "loaded": False,
        "isa": None,
        "available": [],
        "threads": torch.get_num_threads(),
        "threading": None,
        "reason": "the compiled kernel is missing",
    }


# ---- padding holds garbage --------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", ["cpu", "naive"])
def test_nan_in_padding_reaches_nothing(backend, reverse):
    """NaN and inf in padded entries of u, x and of the upstream gradient of h leave every output and
    gradient equal to the spec's on clean (zero) padding."""
    steps, batch, hidden = 9, 4, 13
    u, x, v, b, c0 = make_inputs(steps, batch, hidden)
    mask_pad = make_mask_pad(steps, batch)
    gen = torch.Generator().manual_seed(3)
    upstream = [torch.randn(steps, batch, hidden, generator=gen), torch.randn(batch, hidden, generator=gen)]
    dirty_u, dirty_x, dirty_up = u.clone(), x.clone(), [upstream[0].clone(), upstream[1]]
    dirty_u[mask_pad] = float("nan")
    dirty_u[mask_pad.nonzero()[0].tolist()][:hidden] = float("inf")
    dirty_x[mask_pad] = float("-inf")
    dirty_up[0][mask_pad] = float("nan")
    clean_u, clean_x, clean_up = u.clone(), x.clone(), [upstream[0].clone(), upstream[1]]
    clean_u[mask_pad], clean_x[mask_pad], clean_up[0][mask_pad] = 0.0, 0.0, 0.0

    def run(backend):
        def fn(u, x, v, b, c0):
            return sru_recurrence(u, x, v, b, c0, mask_pad=mask_pad, reverse=reverse, backend=backend)

        return fn

    dirty = outputs_and_grads(run(backend), [dirty_u, dirty_x, v, b, c0], dirty_up)
    spec = outputs_and_grads(run("naive"), [clean_u, clean_x, v, b, c0], clean_up)
    for name, tensor in zip(NAMES, dirty, strict=True):
        assert torch.isfinite(tensor).all(), f"{name} holds NaN or inf"
    assert_all_close(NAMES, dirty, spec, atol=2e-5, rtol=1e-4)
    assert torch.all(dirty[2][mask_pad] == 0) and torch.all(dirty[3][mask_pad] == 0)


# ---- the registered ops called directly ------------------------------------------------------------------


def raw_args():
    u, x, v, b, c0 = make_inputs(T, B, D)
    return dict(u=u, x=x, v=v, b=b, c0=c0, mask_pad=torch.zeros(T, B, dtype=torch.bool), mask_c=torch.ones(B, D))


def noncontiguous(tensor):
    return tensor.transpose(0, 1).contiguous().transpose(0, 1)


RAW_BAD = {
    "u_short": (
        dict(u=torch.zeros(T, B, 3 * D - 1)),
        ValueError,
        r"`u` must have shape \[4, 2, 18\], got \[4, 2, 17\]",
    ),
    "x_rank": (dict(x=torch.zeros(T * B * D)), ValueError, r"`x` must have shape \[T, B, D\] \(3 dims\), got \[48\]"),
    "v_short": (dict(v=torch.zeros(2, D - 1)), ValueError, r"`v` must have shape \[2, 6\], got \[2, 5\]"),
    "b_long": (dict(b=torch.zeros(2, D + 1)), ValueError, r"`b` must have shape \[2, 6\], got \[2, 7\]"),
    "c0_batch": (dict(c0=torch.zeros(B - 1, D)), ValueError, r"`c0` must have shape \[2, 6\], got \[1, 6\]"),
    "mask_pad_short": (
        dict(mask_pad=torch.zeros(T - 1, B, dtype=torch.bool)),
        ValueError,
        r"`mask_pad` must have shape \[4, 2\], got \[3, 2\]",
    ),
    "mask_pad_uint8": (
        dict(mask_pad=torch.zeros(T, B, dtype=torch.uint8)),
        TypeError,
        r"`mask_pad` must have dtype torch.bool, got torch.uint8",
    ),
    "mask_c_short": (dict(mask_c=torch.ones(B, D - 1)), ValueError, r"`mask_c` must have shape \[2, 6\], got \[2, 5\]"),
    "c0_float64": (dict(c0=torch.zeros(B, D, dtype=torch.float64)), TypeError, r"`c0` must have dtype torch.float32"),
    "x_int": (
        dict(x=torch.zeros(T, B, D, dtype=torch.int32)),
        TypeError,
        r"`x` must have dtype float32, float64, bfloat16 or float16",
    ),
    # 16-bit activations take float32 state and parameters, not their own dtype
    "c0_bf16": (
        dict(
            u=torch.zeros(T, B, 3 * D, dtype=torch.bfloat16),
            x=torch.zeros(T, B, D, dtype=torch.bfloat16),
            c0=torch.zeros(B, D, dtype=torch.bfloat16),
        ),
        TypeError,
        r"`v` must have dtype torch.float32|`c0` must have dtype torch.float32",
    ),
    "x_noncontiguous": (dict(x=noncontiguous(torch.zeros(T, B, D))), ValueError, r"`x` must be contiguous"),
    "u_noncontiguous": (dict(u=noncontiguous(torch.zeros(T, B, 3 * D))), ValueError, r"`u` must be contiguous"),
}


@pytest.mark.parametrize("case", list(RAW_BAD), ids=list(RAW_BAD))
def test_raw_ops_check_inputs(case):
    override, error, message = RAW_BAD[case]
    args = raw_args() | override
    order = [args[name] for name in ("u", "x", "v", "b", "c0", "mask_pad", "mask_c")]
    with pytest.raises(error, match=message):
        torch.ops.srupp.sru_cpu_forward(*order, False, True)
    good_args = raw_args()
    _, _, c_all = torch.ops.srupp.sru_cpu_forward(
        *(good_args[n] for n in ("u", "x", "v", "b", "c0")), None, None, False, True
    )
    grads = [torch.ones(T, B, D), torch.ones(B, D)]
    with pytest.raises(error, match=message):
        torch.ops.srupp.sru_cpu_backward(*order, c_all, *grads, False)


@pytest.mark.parametrize("name", ["c_all", "grad_h", "grad_c_last"])
def test_raw_backward_checks_its_own_inputs(name):
    args = raw_args()
    order = [args[n] for n in ("u", "x", "v", "b", "c0", "mask_pad", "mask_c")]
    given = {"c_all": torch.zeros(T, B, D), "grad_h": torch.zeros(T, B, D), "grad_c_last": torch.zeros(B, D)}
    given[name] = given[name][:-1]
    with pytest.raises(ValueError, match=rf"`{name}` must have shape"):
        torch.ops.srupp.sru_cpu_backward(*order, given["c_all"], given["grad_h"], given["grad_c_last"], False)
    given[name] = noncontiguous(torch.zeros(T, B, D)) if name != "grad_c_last" else torch.zeros(D, B).t()
    with pytest.raises(ValueError, match=rf"`{name}` must be contiguous"):
        torch.ops.srupp.sru_cpu_backward(*order, given["c_all"], given["grad_h"], given["grad_c_last"], False)


# ---- output buffers kept for reuse ----------------------------------------------------------------------------


@pytest.fixture
def cache(monkeypatch):
    """A fresh output cache (outputs of T=64 B=4 D=1024 are 1 MiB and more, so they go through it)."""
    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    if output_cache._OUTPUTS._use_count is None:
        pytest.skip("this torch has no storage use count; the cache is off")
    monkeypatch.delenv("SRUPP_CPU_CACHE_MB", raising=False)
    fresh = output_cache._OutputCache()
    monkeypatch.setattr(output_cache, "_OUTPUTS", fresh)
    return fresh


def big_case(seed=0):
    u, x, v, b, c0 = make_inputs(64, 4, 1024, seed=seed)
    return [t.requires_grad_() for t in (u, x, v, b, c0)]


def test_outputs_reuse_storage_only_once_released(cache):
    inputs = big_case()
    h, _ = sru_recurrence(*inputs, backend="cpu")
    kept = h.clone()
    h_ptr = h.data_ptr()
    # h alive: the next call must not write into it
    h2, _ = sru_recurrence(*big_case(seed=1), backend="cpu")
    assert h2.data_ptr() != h_ptr and torch.equal(h, kept)
    del h2
    h.backward(torch.ones_like(h))  # frees the saved states; h itself still alive
    assert torch.equal(h, kept)
    grads = [t.grad.clone() for t in inputs[:2]]  # .grad adopted the backward's cached outputs
    del h
    # h released: its storage comes back, and the result is still the spec's
    h3, _ = sru_recurrence(*inputs, backend="cpu")
    assert h3.data_ptr() == h_ptr
    torch.testing.assert_close(h3, kept, rtol=0, atol=0)
    # another backward must not write into gradients still held as .grad
    other = big_case(seed=3)
    h4, _ = sru_recurrence(*other, backend="cpu")
    h4.backward(torch.full_like(h4, 2.0))
    assert all(torch.equal(t.grad, g) for t, g in zip(inputs[:2], grads, strict=True))
    assert library.cpu_kernel_info()["cache_bytes"] == cache.held_bytes() > 0


def test_interleaved_steps_with_cached_outputs_match_naive(cache):
    """Two forwards, then their backwards in the reverse order, twice over: every gradient is the spec's
    even as buffers go back and forth between the calls."""
    for _ in range(2):
        first, second = big_case(0), big_case(1)
        upstream = torch.randn(64, 4, 1024, generator=torch.Generator().manual_seed(2))
        h1, c1 = sru_recurrence(*first, backend="cpu")
        h2, c2 = sru_recurrence(*second, backend="cpu")
        (h2 * upstream).sum().backward()
        (h1 * upstream).sum().backward()
        for inputs, h in ((first, h1), (second, h2)):
            reference = [t.detach().clone().requires_grad_() for t in inputs]
            h_ref, _ = sru_recurrence(*reference, backend="naive")
            (h_ref * upstream).sum().backward()
            assert_all_close(
                ["h", "grad_u", "grad_x", "grad_v", "grad_b", "grad_c0"],
                [h] + [t.grad for t in inputs],
                [h_ref] + [t.grad for t in reference],
                atol=1e-4,
                rtol=1e-4,
            )
        del h1, c1, h2, c2


def test_cache_limit_and_release(cache, monkeypatch):
    with torch.no_grad():
        sru_recurrence(*big_case(), backend="cpu")
    assert cache.held_bytes() == 64 * 4 * 1024 * 4  # h only: no state is saved without grad
    output_cache.empty_cpu_cache()
    assert cache.held_bytes() == 0
    monkeypatch.setenv("SRUPP_CPU_CACHE_MB", "0")
    h, _ = sru_recurrence(*big_case(), backend="cpu")
    h.sum().backward()
    assert cache.held_bytes() == 0
    monkeypatch.setenv("SRUPP_CPU_CACHE_MB", "1.5")  # room for one 1 MiB buffer: the least recent free one goes
    with torch.no_grad():
        sru_recurrence(*big_case(), backend="cpu")
        sru_recurrence(*make_inputs(64, 4, 1100), backend="cpu")
    assert cache.held_bytes() == 64 * 4 * 1100 * 4
    monkeypatch.setenv("SRUPP_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match=r"`SRUPP_CPU_CACHE_MB` must be a number of MiB >= 0 \(or unset\), got 'lots'"):
        sru_recurrence(*big_case(), backend="cpu")


def test_cache_in_inference_mode_then_training(cache):
    with torch.inference_mode():
        h, _ = sru_recurrence(*make_inputs(64, 4, 1024), backend="cpu")
        assert h.is_inference()
        del h
    inputs = big_case()
    h, _ = sru_recurrence(*inputs, backend="cpu")
    assert not h.is_inference()
    h.sum().backward()
    assert torch.isfinite(inputs[0].grad).all()


def linear_case():
    """Inputs of a linear map whose output is 33 MiB: above glibc's 32 MiB, so it goes through the cache."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1024, 2, 64, generator=gen), torch.randn(4224, 64, generator=gen)


def test_cached_linear_is_linear_and_reuses_released_storage(cache):
    z, weight = linear_case()
    want = torch.nn.functional.linear(z, weight)
    with torch.no_grad():
        first = output_cache.cached_linear(z, weight)
        held = output_cache.cached_linear(z, weight)  # first is alive: another buffer
        assert held.data_ptr() != first.data_ptr()
        ptr = first.data_ptr()
        del first
        again = output_cache.cached_linear(z * 2, weight)
    assert again.data_ptr() == ptr and cache.held_bytes() == 2 * want.numel() * 4
    torch.testing.assert_close(held, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(again, 2 * want, rtol=1e-6, atol=1e-4)
    assert held.shape == want.shape and held.is_contiguous()


def test_cached_linear_leaves_autograd_autocast_and_smaller_outputs_to_torch(cache):
    z, weight = linear_case()
    weight.requires_grad_()
    out = output_cache.cached_linear(z, weight)  # autograd needs this one
    assert out.grad_fn is not None and cache.held_bytes() == 0
    out.sum().backward()
    torch.testing.assert_close(weight.grad, z.sum((0, 1)).expand(4224, 64), rtol=1e-5, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert output_cache.cached_linear(z, weight).dtype == torch.bfloat16
    with torch.no_grad():
        output_cache.cached_linear(z[:512], weight)  # 16.5 MiB: glibc reuses such blocks itself
    assert cache.held_bytes() == 0


@pytest.mark.parametrize("threading", ["openmp", "pthreads"])
@pytest.mark.parametrize("threads", [1, 3, 7])
def test_work_split_over_threads_matches_naive(threads, threading, monkeypatch):
    """The kernel cuts the B*D lanes into blocks shared out over threads (a block may start mid-row): any
    thread count, on torch's OpenMP team or on threads of its own, gives the spec's results, with masks, c0
    and reverse."""
    if not library.is_available():
        pytest.skip(library.unavailable_reason())
    if threading == "openmp" and library._torch_openmp() is None:
        pytest.skip("torch does not run on an OpenMP runtime here")
    monkeypatch.setenv("SRUPP_CPU_THREADS", threading)
    library.reset()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert library.cpu_kernel_info()["threading"] == threading
        fast, spec = compare_backends(130, 5, 1031, **OPTIONS["all"])
    finally:
        torch.set_num_threads(previous)
        monkeypatch.delenv("SRUPP_CPU_THREADS")
        library.reset()
    assert_all_close(NAMES, fast, spec, atol=2e-5, rtol=1e-4)


def test_threading_setting_is_checked(monkeypatch):
    """A bad ``SRUPP_CPU_THREADS`` is refused in one line naming it; unset, the kernel joins torch's OpenMP team
    where torch has one (Linux wheels do)."""
    monkeypatch.setenv("SRUPP_CPU_THREADS", "fibers")
    library.reset()
    try:
        with pytest.raises(ValueError, match=r"`SRUPP_CPU_THREADS` must be 'openmp' or 'pthreads' .*'fibers'"):
            library.cpu_kernel_info()
    finally:
        monkeypatch.delenv("SRUPP_CPU_THREADS")
        library.reset()
    if library.is_available():
        expected = "openmp" if library._torch_openmp() is not None else "pthreads"
        assert library.cpu_kernel_info()["threading"] == expected
