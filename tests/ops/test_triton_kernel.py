"""The Triton backend against the naive spec: on CPU through Triton's interpreter, and on a CUDA GPU when present.

The kernels pick the interpreter per call for CPU tensors, so TRITON_INTERPRET only has to be set while a
test runs (the `device` fixture does it with monkeypatch); it never leaks into other test files.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from srupp.ops import sru_recurrence, sru_recurrence_naive, triton_kernel  # noqa: E402
from tests.helpers import assert_all_close  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
NO_CUDA = not torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="interpret"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")]),
]
SHAPES = [(steps, batch, hidden) for steps in (1, 5) for batch in (1, 3) for hidden in (1, 5, 33)]
OPTIONS = {
    "plain": dict(),
    "c0-pad-maskc": dict(with_c0=True, with_pad=True, with_mask_c=True),
    "c0-pad-maskc-reverse": dict(with_c0=True, with_pad=True, with_mask_c=True, reverse=True),
}


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> torch.device:
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device(request.param)


def make_case(
    steps: int,
    batch: int,
    hidden: int,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype | None = None,
    with_c0: bool = False,
    with_pad: bool = False,
    with_mask_c: bool = False,
    reverse: bool = False,
    seed: int = 0,
) -> dict:
    """Inputs and upstream gradients; activations in `dtype`, parameters and state in `param_dtype`."""
    generator = torch.Generator().manual_seed(seed)
    compute = torch.float32 if dtype in HALF else dtype
    param_dtype = param_dtype or compute

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    mask_pad = None
    if with_pad:
        # Row 0 has padded steps between real ones, row 1 is all padding, row 2 has a padded tail.
        mask_pad = torch.zeros(steps, batch, dtype=torch.bool)
        mask_pad[1::3, 0] = True
        if batch > 1:
            mask_pad[:, 1] = True
        if batch > 2:
            mask_pad[steps // 2 + 1 :, 2] = True
        mask_pad = mask_pad.to(device)
    mask_c = None
    if with_mask_c:
        keep = torch.rand(batch, hidden, generator=generator) > 0.3
        mask_c = (keep / 0.7).to(device=device, dtype=param_dtype)
    return {
        "u": randn(steps, batch, 3 * hidden, dtype=dtype),
        "x": randn(steps, batch, hidden, dtype=dtype),
        "v": randn(2, hidden, dtype=param_dtype) * 0.5,
        "b": randn(2, hidden, dtype=param_dtype) * 0.5,
        "c0": randn(batch, hidden, dtype=param_dtype) if with_c0 else None,
        "mask_pad": mask_pad,
        "mask_c": mask_c,
        "reverse": reverse,
        # Rounded to the activation dtype so both sides see the very same upstream gradients.
        "grad_h": randn(steps, batch, hidden, dtype=dtype).to(compute),
        "grad_c": randn(batch, hidden, dtype=dtype).to(compute),
    }


NAMES = ["h", "c_last", "grad_u", "grad_x", "grad_v", "grad_b", "grad_c0"]


def run(case: dict, *, backend: str, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Forward and backward through one backend, inputs cast to `dtype` (None keeps them); values in NAMES order."""
    leaves = []
    for name in ("u", "x", "v", "b", "c0"):
        tensor = case[name]
        if name == "c0" and tensor is None:
            tensor = torch.zeros_like(case["grad_c"], dtype=case["v"].dtype)
        leaves.append((tensor if dtype is None else tensor.to(dtype)).detach().requires_grad_())
    mask_c = case["mask_c"] if dtype is None or case["mask_c"] is None else case["mask_c"].to(dtype)
    if backend == "naive":
        h, c_last = sru_recurrence_naive(*leaves, case["mask_pad"], mask_c, case["reverse"])
    else:
        h, c_last = sru_recurrence(
            *leaves, mask_pad=case["mask_pad"], mask_c=mask_c, reverse=case["reverse"], backend=backend
        )
    grad_h, grad_c = case["grad_h"], case["grad_c"]
    loss = (h.to(grad_h.dtype) * grad_h).sum() + (c_last.to(grad_c.dtype) * grad_c).sum()
    return [h.detach(), c_last.detach(), *torch.autograd.grad(loss, leaves)]


def check(case: dict, *, atol: float, rtol: float, reference_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Triton against the naive spec (run in `reference_dtype`) on the same inputs and upstream gradients."""
    result = run(case, backend="triton")
    assert_all_close(NAMES, result, run(case, backend="naive", dtype=reference_dtype), atol=atol, rtol=rtol)
    return result


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-B{b}-D{d}" for t, b, d in SHAPES])
def test_matches_naive_over_shapes(device, shape, options):
    check(make_case(*shape, device=device, **options), atol=1e-5, rtol=1e-4)


FLAGS = list(itertools.product((False, True), repeat=4))


@pytest.mark.parametrize(
    "with_c0, with_pad, with_mask_c, reverse",
    FLAGS,
    ids=[
        "-".join(name for name, on in zip(("c0", "pad", "maskc", "reverse"), flags, strict=True) if on) or "none"
        for flags in FLAGS
    ],
)
def test_matches_naive_over_options(device, with_c0, with_pad, with_mask_c, reverse):
    case = make_case(
        5, 3, 33, device=device, with_c0=with_c0, with_pad=with_pad, with_mask_c=with_mask_c, reverse=reverse
    )
    check(case, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_all_padding_single_sequence(device, reverse):
    case = make_case(5, 1, 5, device=device, with_c0=True, reverse=reverse)
    case["mask_pad"] = torch.ones(5, 1, dtype=torch.bool, device=device)
    h, c_last, *_ = check(case, atol=1e-6, rtol=1e-6)
    assert not h.any()
    assert torch.equal(c_last, case["c0"])


HALF_CASES = [
    pytest.param(dtype, param_dtype, id=f"{str(dtype)[6:]}-params-{str(param_dtype)[6:]}")
    for dtype in HALF
    for param_dtype in (torch.float32, dtype)
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype, param_dtype", HALF_CASES)
def test_half_inputs_match_naive_in_float32(device, dtype, param_dtype, reverse):
    case = make_case(
        5,
        3,
        33,
        device=device,
        dtype=dtype,
        param_dtype=param_dtype,
        with_c0=True,
        with_pad=True,
        with_mask_c=True,
        reverse=reverse,
    )
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    h, c_last, grad_u, grad_x, grad_v, grad_b, grad_c0 = check(
        case, atol=tolerance, rtol=tolerance, reference_dtype=torch.float32
    )
    assert h.dtype == c_last.dtype == grad_u.dtype == grad_x.dtype == dtype
    assert grad_v.dtype == grad_b.dtype == grad_c0.dtype == param_dtype


# The lean kernels run whole blocks of `steps` time steps, then the rest one at a time; the backward always
# keeps the forward's first step for the rest. T around multiples of `steps` exercises both parts and the seam.
# The prefetch forward fills its ring before each part (T < steps: only the rest; T=9, steps=3: no rest).
VARIANT_CASES = [
    pytest.param(variant, steps, shape, options, id=f"{variant}-K{steps}-T{shape[0]}-B{shape[1]}-D{shape[2]}-{name}")
    for variant, steps in (("legacy", None), ("lean", 2), ("lean", 3), ("lean", 8), ("prefetch", 3), ("prefetch", 8))
    for shape in ((1, 1, 1), (6, 3, 5), (9, 2, 33))
    for name, options in OPTIONS.items()
]


@pytest.mark.parametrize("variant, steps, shape, options", VARIANT_CASES)
def test_variants_match_naive_in_float64(device, variant, steps, shape, options):
    """Each kernel variant against the spec in float64: outputs, final state and every gradient, to 1e-12."""
    case = make_case(*shape, device=device, dtype=torch.float64, **options)
    with triton_kernel.launch_overrides(variant=variant, steps=steps):
        check(case, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("stages", [2, 3])
def test_prefetch_ring_depths_match_naive_in_float64(device, stages):
    """The prefetch kernels with 2 or 3 blocks of loads in flight: the ring turns over every iteration. D=8: the
    block covers D exactly, so no store is masked (the other cases mask the lanes past D)."""
    case = make_case(11, 3, 8, device=device, dtype=torch.float64, with_c0=True, with_pad=True, with_mask_c=True)
    with triton_kernel.launch_overrides(variant="prefetch", steps=2, stages=stages):
        check(case, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_prefetch_half_inputs_match_naive_in_float32(device, dtype, reverse):
    """The prefetch forward on 16-bit activations (one lane per thread on a GPU): T=11 in blocks of 4 (two whole
    blocks and a rest of 3), odd D, padding, c0 and mask_c, against the spec in float32."""
    case = make_case(
        11, 3, 33, device=device, dtype=dtype, with_c0=True, with_pad=True, with_mask_c=True, reverse=reverse
    )
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    with triton_kernel.launch_overrides(variant="prefetch", steps=4):
        h, c_last, *grads = check(case, atol=tolerance, rtol=tolerance, reference_dtype=torch.float32)
    assert h.dtype == c_last.dtype == dtype


@pytest.mark.parametrize("variant", triton_kernel.VARIANTS)
def test_variant_argument_selects_the_kernels(device, variant, monkeypatch):
    """launch_forward/launch_backward(variant=...) run that variant's kernels whatever the default, and agree with
    the spec."""
    case = make_case(9, 2, 5, device=device, with_c0=True, with_pad=True, with_mask_c=True, reverse=True)
    args = [case[name] for name in ("u", "x", "v", "b", "c0", "mask_pad", "mask_c")]
    other = "legacy" if variant != "legacy" else "lean"
    launched = record_launches(monkeypatch)
    with triton_kernel.launch_overrides(variant=other):
        h, c_last, c_all = triton_kernel.launch_forward(*args, True, True, variant=variant)
        grads = triton_kernel.launch_backward(*args, c_all, case["grad_h"], case["grad_c"], True, variant=variant)
    kernels = {
        "legacy": (triton_kernel._sru_forward_kernel, triton_kernel._sru_backward_kernel),
        "lean": (triton_kernel._sru_lean_forward_kernel, triton_kernel._sru_lean_backward_kernel),
        "prefetch": (triton_kernel._sru_prefetch_forward_kernel, triton_kernel._sru_prefetch_backward_kernel),
    }
    assert launched == list(kernels[variant])
    expected = run(case, backend="naive")
    assert_all_close(NAMES, [h, c_last, *grads], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="`variant` must be one of"):
        triton_kernel.launch_forward(*args, True, True, variant="fast")


def record_launches(monkeypatch) -> list:
    """The kernels launched from now on, in order."""
    launched, launch = [], triton_kernel._launch
    monkeypatch.setattr(
        triton_kernel, "_launch", lambda fn, *rest, **kw: launched.append(fn) or launch(fn, *rest, **kw)
    )
    return launched


# The lean backward reads two 16-bit activations as one 4-byte word: D even (D // 2 words short of the block, and
# D = 2), T around multiples of `steps`, with and without padding, mask_c, c0 and reverse.
WORD_CASES = [
    pytest.param(
        dtype, steps, shape, options, id=f"{str(dtype)[6:]}-K{steps}-T{shape[0]}-B{shape[1]}-D{shape[2]}-{name}"
    )
    for dtype in HALF
    for steps, shape in ((3, (7, 3, 34)), (8, (9, 2, 2)))
    for name, options in OPTIONS.items()
]


@pytest.mark.parametrize("dtype, steps, shape, options", WORD_CASES)
def test_lean_backward_reads_16_bit_words(device, dtype, steps, shape, options, monkeypatch):
    """The lean backward on 16-bit activations against the spec in float32, on the same rounded inputs."""
    launched = record_launches(monkeypatch)
    case = make_case(*shape, device=device, dtype=dtype, **options)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    with triton_kernel.launch_overrides(variant="lean", steps=steps):
        check(case, atol=tolerance, rtol=tolerance, reference_dtype=torch.float32)
    assert launched == [triton_kernel._sru_lean_forward_kernel, triton_kernel._sru_lean_backward_kernel]


def unaligned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `tensor` that starts 2 bytes past a 4-byte boundary."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    return storage[1:].view(tensor.shape).copy_(tensor)


@pytest.mark.parametrize("layout", ["odd-D", "unaligned"])
def test_lean_backward_leaves_16_bit_rows_it_cannot_read_as_words_to_legacy(device, layout, monkeypatch):
    """Odd D, or u that does not start on a 4-byte boundary: the legacy backward runs, and agrees with the spec."""
    launched = record_launches(monkeypatch)
    case = make_case(6, 3, 5 if layout == "odd-D" else 6, device=device, dtype=torch.bfloat16, with_c0=True)
    if layout == "unaligned":
        case["u"] = unaligned(case["u"])
        assert case["u"].data_ptr() % 4 == 2 and case["u"].is_contiguous()
    with triton_kernel.launch_overrides(variant="lean"):
        check(case, atol=2e-2, rtol=2e-2, reference_dtype=torch.float32)
    assert launched == [triton_kernel._sru_lean_forward_kernel, triton_kernel._sru_backward_kernel]


@pytest.mark.parametrize("shape", [(0, 3, 5), (4, 0, 5), (4, 3, 0)], ids=["T0", "B0", "D0"])
def test_backward_with_nothing_to_walk(device, shape):
    """No step, row or feature to run: v and b get zero gradients, c0 gets grad_c_last, and nothing is read from
    memory that no kernel wrote (freed NaN-filled buffers of the partial sums' size are left to be reused). The
    launcher returns before it picks a variant, so there is none to vary."""
    case = make_case(*shape, device=device, with_c0=True)
    junk = torch.full((shape[1], 4, shape[2]), float("nan"), device=device)
    del junk
    args = [case[name] for name in ("u", "x", "v", "b", "c0", "mask_pad", "mask_c")]
    c_all = torch.empty(shape, device=device)
    grads = triton_kernel.launch_backward(*args, c_all, case["grad_h"], case["grad_c"], False)
    expected = [torch.zeros_like(case[name]) for name in ("u", "x", "v", "b")] + [case["grad_c"]]
    assert_all_close(NAMES[2:], list(grads), expected, atol=0, rtol=0)


def test_lean_backward_leaves_grad_h_of_another_dtype_to_legacy(device, monkeypatch):
    """A direct launch_backward with bf16 u and float32 grad_h: the lean tile would read grad_h's bits as bf16, so
    the legacy backward runs, and agrees with the spec."""
    launched = record_launches(monkeypatch)
    case = make_case(6, 3, 6, device=device, dtype=torch.bfloat16, with_c0=True, with_pad=True)
    args = [case[name] for name in ("u", "x", "v", "b", "c0", "mask_pad", "mask_c")]
    assert case["grad_h"].dtype == torch.float32 and triton_kernel._tile_readable(
        case["u"], case["x"], case["grad_h"].to(torch.bfloat16), case["mask_pad"]
    )  # only the dtype keeps the lean tile away
    _, _, c_all = triton_kernel.launch_forward(*args, False, True, variant="lean")
    grads = triton_kernel.launch_backward(*args, c_all, case["grad_h"], case["grad_c"], False, variant="lean")
    assert launched == [triton_kernel._sru_lean_forward_kernel, triton_kernel._sru_backward_kernel]
    assert_all_close(NAMES[2:], list(grads), run(case, backend="naive", dtype=torch.float32)[2:], atol=2e-2, rtol=2e-2)


# Several programs along D (the interpreter's block is otherwise next_pow2(D)): D=33 leaves one lane in the last
# block, D=34 two (one 4-byte word of bf16); T=7 in blocks of 3 steps, both directions.
BLOCK_CASES = [
    pytest.param(variant, dtype, hidden, reverse, id=f"{variant}-{str(dtype)[6:]}-D{hidden}-{direction}")
    for variant in ("lean", "prefetch")
    for dtype in (torch.float64, torch.bfloat16)
    for hidden in (33, 34)
    for reverse, direction in ((False, "forward"), (True, "reverse"))
]


@pytest.mark.parametrize("variant, dtype, hidden, reverse", BLOCK_CASES)
def test_blocks_of_16_features_match_naive(device, variant, dtype, hidden, reverse, monkeypatch):
    """The lean and prefetch kernels with BLOCK_D=16 (three programs per row) against the spec: float64 to 1e-12,
    bf16 against float32 on the same rounded inputs."""
    launched = record_launches(monkeypatch)
    options = dict(with_c0=True, with_pad=True, with_mask_c=True, reverse=reverse)
    case = make_case(7, 3, hidden, device=device, dtype=dtype, **options)
    exact = dtype == torch.float64
    with triton_kernel.launch_overrides(variant=variant, steps=3, block_d=16):
        if exact:
            check(case, atol=1e-12, rtol=1e-10)
        else:
            check(case, atol=2e-2, rtol=2e-2, reference_dtype=torch.float32)
    assert launched[0] is (triton_kernel._FORWARD_KERNELS[variant])


@pytest.mark.parametrize("variant", triton_kernel.VARIANTS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradcheck_float64(device, reverse, variant):
    # Small enough for the full Jacobian in the interpreter; B=3 gives a partly and an all padded row.
    # T=3 with steps=2: the lean and prefetch kernels run one whole block and one step on their own.
    shape = ((2 if variant == "legacy" else 3), 3, 1) if device.type == "cpu" else (4, 3, 5)
    case = make_case(*shape, device=device, dtype=torch.float64, with_c0=True, with_pad=True, with_mask_c=True)
    inputs = tuple(case[name].requires_grad_() for name in ("u", "x", "v", "b", "c0"))

    def function(u, x, v, b, c0):
        return sru_recurrence(
            u, x, v, b, c0, mask_pad=case["mask_pad"], mask_c=case["mask_c"], reverse=reverse, backend="triton"
        )

    with triton_kernel.launch_overrides(variant=variant, steps=2):
        assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-7)


def test_no_grad_forward_equals_grad_forward(device):
    case = make_case(5, 3, 33, device=device, with_c0=True, with_pad=True, with_mask_c=True)
    with torch.no_grad():
        h, c_last = sru_recurrence(
            case["u"],
            case["x"],
            case["v"],
            case["b"],
            case["c0"],
            mask_pad=case["mask_pad"],
            mask_c=case["mask_c"],
            backend="triton",
        )
    result = run(case, backend="triton")
    assert torch.equal(h, result[0]) and torch.equal(c_last, result[1])


def test_opcheck(device):
    case = make_case(3, 2, 5, device=device, with_c0=True, with_pad=True, with_mask_c=True)
    leaves = tuple(case[name].requires_grad_() for name in ("u", "x", "v", "b", "c0"))
    inputs = (*leaves, case["mask_pad"], case["mask_c"])
    everything = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(triton_kernel.sru_triton_forward, (*inputs, False, True), test_utils=everything)
    c_all = triton_kernel.sru_triton_forward(*inputs, False, True)[2].detach()
    inputs = tuple(None if t is None else t.detach() for t in inputs)
    backward_args = (*inputs, c_all, case["grad_h"], case["grad_c"], False)
    torch.library.opcheck(
        triton_kernel.sru_triton_backward, backward_args, test_utils=("test_schema", "test_faketensor")
    )


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case(2, 1, 3, device=torch.device("cpu"))
    assert not triton_kernel.is_available(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sru_recurrence(case["u"], case["x"], case["v"], case["b"], backend="triton")


STAGE_CASES = [
    pytest.param(
        stages, dtype, shape, options, id=f"stages{stages}-{str(dtype)[6:]}-T{shape[0]}-B{shape[1]}-D{shape[2]}-{name}"
    )
    for stages in (1, 4, 8)
    for dtype in (torch.float32, torch.bfloat16)
    for shape in ((1, 3, 5), (7, 3, 33))
    for name, options in OPTIONS.items()
]


@pytest.mark.parametrize("stages, dtype, shape, options", STAGE_CASES)
def test_pipeline_depths_match_naive(device, stages, dtype, shape, options):
    """Every STAGES value computes the same thing (on a GPU the loads run STAGES - 1 steps ahead)."""
    case = make_case(*shape, device=device, dtype=dtype, **options)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with triton_kernel.launch_overrides(stages=stages):
        check(case, atol=tolerance, rtol=tolerance, reference_dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_padded_steps_ignore_what_they_hold(device, poison, dtype, reverse):
    """NaN or inf in a padded step's u or x reaches no output and no gradient: the result equals the naive
    spec's on the same inputs with zeros there (padding selects, it does not multiply)."""
    case = make_case(
        7, 3, 33, device=device, dtype=dtype, with_c0=True, with_pad=True, with_mask_c=True, reverse=reverse
    )
    pad = case["mask_pad"].unsqueeze(-1)
    clean = {**case, "u": case["u"].masked_fill(pad, 0.0), "x": case["x"].masked_fill(pad, 0.0)}
    poisoned = {**case, "u": case["u"].masked_fill(pad, poison), "x": case["x"].masked_fill(pad, poison)}
    result = run(poisoned, backend="triton")
    assert all(torch.isfinite(tensor).all() for tensor in result), "a padded value leaked"
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert_all_close(NAMES, result, run(clean, backend="naive", dtype=torch.float32), atol=tolerance, rtol=tolerance)
    # The forward values of the spec itself are select-based too.
    expected = run(poisoned, backend="naive", dtype=torch.float32)
    assert_all_close(NAMES[:2], result[:2], expected[:2], atol=tolerance, rtol=tolerance)
    assert not result[2].masked_select(pad).any() and not result[3].masked_select(pad).any()


def test_launch_overrides_names_unknown_parameters():
    with pytest.raises(ValueError, match="block_size"), triton_kernel.launch_overrides(block_size=64):
        pass
    with pytest.raises(ValueError, match="`variant` must be one of"), triton_kernel.launch_overrides(variant="old"):
        pass


def test_auto_falls_back_once_when_triton_cannot_compile(monkeypatch):
    """A compile failure (an exception from triton) makes "auto" warn once and run the spec from then on;
    any other error is raised."""
    case = make_case(4, 2, 5, device=torch.device("cpu"), dtype=torch.bfloat16, with_c0=True, with_pad=True)
    args = (case["u"], case["x"], case["v"], case["b"], case["c0"], case["mask_pad"], None, False)
    failing = type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})
    calls = []

    def broken(*args):
        calls.append(1)
        raise failing("ptxas: unsupported gpu architecture")

    monkeypatch.setattr(triton_kernel, "_compile_failure", None)
    monkeypatch.setattr(triton_kernel, "sru_recurrence_triton", broken)
    with pytest.warns(RuntimeWarning, match="failed to compile.*unsupported gpu"):
        h, c_last = triton_kernel.sru_recurrence_triton_or_naive(*args)
    again = triton_kernel.sru_recurrence_triton_or_naive(*args)
    assert len(calls) == 1
    expected = sru_recurrence_naive(*(t.float() for t in args[:5]), case["mask_pad"])
    assert torch.equal(h, expected[0]) and torch.equal(c_last, expected[1])
    assert torch.equal(again[0], h)

    def bug(*args):
        raise IndexError("an internal bug")

    monkeypatch.setattr(triton_kernel, "_compile_failure", None)
    monkeypatch.setattr(triton_kernel, "sru_recurrence_triton", bug)
    with pytest.raises(IndexError, match="internal bug"):
        triton_kernel.sru_recurrence_triton_or_naive(*args)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 16, 1000), (300, 2, 4099), (17, 129, 512)], ids=str)
def test_cuda_larger_shapes(shape, dtype):
    case = make_case(*shape, device=torch.device("cuda"), dtype=dtype, with_c0=True, with_pad=True, with_mask_c=True)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    check(case, atol=tolerance, rtol=tolerance, reference_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 16, 1000), (300, 2, 4099), (17, 129, 512)], ids=str)
def test_cuda_prefetch_larger_shapes(shape, dtype):
    """The prefetch kernels as compiled (B and D constants, immediate offsets, unmasked loads that read column
    D - 1 past the end of a row, T not a multiple of the block) against the spec, in both directions."""
    for reverse in (False, True):
        options = dict(with_c0=True, with_pad=True, with_mask_c=True, reverse=reverse)
        case = make_case(*shape, device=torch.device("cuda"), dtype=dtype, **options)
        tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
        with triton_kernel.launch_overrides(variant="prefetch"):
            check(case, atol=tolerance, rtol=tolerance, reference_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_fast_sigmoid_error_is_bounded(dtype):
    """16-bit activations take the sigmoid's reciprocal from rcp.approx.ftz.f32 (1 ulp of float32, against 2 for
    the division it replaces): the lean kernels' error against the spec in float64 stays within one rounding of
    the 16-bit output, and they agree with the legacy kernels (exact division) to two roundings."""
    case = make_case(
        256, 4, 96, device=torch.device("cuda"), dtype=dtype, with_c0=True, with_pad=True, with_mask_c=True
    )
    expected = run(case, backend="naive", dtype=torch.float64)
    results = {}
    for variant in triton_kernel.VARIANTS:
        with triton_kernel.launch_overrides(variant=variant):
            results[variant] = run(case, backend="triton")
    unit = torch.finfo(dtype).eps  # one rounding of a value in [1, 2)
    for fast in ("lean", "prefetch"):
        for name, value, legacy, exact in zip(NAMES, results[fast], results["legacy"], expected, strict=True):
            scale = exact.abs().max().item() + 1.0
            assert (value.double() - exact).abs().max().item() <= unit * scale, (fast, name)
            assert (value.double() - legacy.double()).abs().max().item() <= 2 * unit * scale, (fast, name)
