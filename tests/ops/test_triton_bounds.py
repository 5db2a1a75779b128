"""Every address the Triton kernels load or store (where the access is not masked off) lies inside one of the
tensors of its launch: checked in Triton's interpreter, whose loads and stores this file watches.

On a GPU an access past a tensor reads whatever lies there, or faults only now and then; the spec tests catch
it only where the stray value reaches an output. The prefetch kernels load unmasked (lanes past D read column
D - 1) and issue loads a block of steps ahead, so their addresses are the ones most worth checking. The checker
uses the interpreter's private classes; where they are missing the tests skip (a Triton that renames the
smaller internals it also reads, such as a handle's ``data``, makes them fail instead: a checker to update). An
access that runs past one tensor into another of the same launch passes unseen: the check is "inside some tensor".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

tl = pytest.importorskip("triton.language")
interpreter = pytest.importorskip("triton.runtime.interpreter")

from srupp.ops import triton_kernel  # noqa: E402
from tests.ops.test_triton_kernel import make_case, run  # noqa: E402

INTERNALS = ("InterpreterBuilder", "GridExecutor", "InterpretedFunction")
MISSING = [name for name in INTERNALS if not hasattr(interpreter, name)]
if not MISSING:
    MISSING = [
        f"{owner}.{name}"
        for owner, name in (
            ("InterpreterBuilder", "create_masked_load"),
            ("InterpreterBuilder", "create_masked_store"),
            ("GridExecutor", "_init_args_hst"),
        )
        if not hasattr(getattr(interpreter, owner), name)
    ]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"Triton's interpreter lacks {MISSING}")


class OutOfBounds(AssertionError):
    pass


@pytest.fixture
def bounds(monkeypatch):
    """Makes every interpreted load and store check its unmasked addresses against the byte ranges of the
    tensors the launch was given; yields the list of accesses checked (one entry per load or store)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ranges: list[tuple[int, int]] = []
    checked: list[int] = []
    init_args = interpreter.GridExecutor._init_args_hst

    def recording_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges.clear()
        ranges.extend(extent(arg) for arg in [*args_hst, *kwargs_hst.values()] if isinstance(arg, torch.Tensor))
        return args_hst, kwargs_hst

    def check(ptrs, mask, kind):
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addresses = ptrs.data.astype(np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in ranges:
            inside |= (addresses >= start) & (addresses + size <= end)
        stray = live & ~inside
        if stray.any():
            raise OutOfBounds(
                f"{kind} of {int(stray.sum())} addresses outside every tensor, e.g. {addresses[stray][:4]}"
            )
        checked.append(1)

    load, store = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, other, *args, **kwargs):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *args, **kwargs)

    def checked_store(self, ptrs, value, mask, *args, **kwargs):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", recording_init_args)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", checked_store)
    yield checked


def extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) that ``tensor``'s elements occupy (empty for an empty tensor)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


def _reads_one_past(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets), mask=offsets < N)


def test_the_checker_catches_a_load_past_the_end(bounds):
    """A kernel that loads BLOCK elements of a tensor of BLOCK - 1, unmasked: the checker must raise (else the
    test below proves nothing); masking the store keeps it from flagging the store."""
    kernel = interpreter.InterpretedFunction(_reads_one_past)
    x, out = torch.ones(7), torch.empty(8)
    with pytest.raises(Exception, match="load of 1 addresses outside"):
        kernel[(1,)](x, out, 7, BLOCK=8)
    kernel[(1,)](torch.ones(8), out, 7, BLOCK=8)  # in range: no error
    assert bounds


# T below a block of 3 steps, one and two blocks with 2 and 1 leftover steps (the ring turns over); D below a block,
# exactly a block (no masked store) and past two blocks of 16 (three programs per row, one lane in the last).
STEPS = (1, 2, 5, 7)
WIDTHS = ((5, None), (8, None), (33, 16))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("variant", triton_kernel.VARIANTS)
def test_every_access_lies_inside_a_tensor_of_the_launch(bounds, variant, dtype):
    """Forward and backward of ``variant`` with padding, mask_c and c0, in both directions, over STEPS x WIDTHS:
    no unmasked load or store outside the launch's tensors."""
    device = torch.device("cpu")
    for steps in STEPS:
        for hidden, block in WIDTHS:
            for reverse in (False, True):
                options = dict(with_c0=True, with_pad=True, with_mask_c=True, reverse=reverse)
                case = make_case(steps, 3, hidden, device=device, dtype=dtype, **options)
                with triton_kernel.launch_overrides(variant=variant, steps=3, block_d=block):
                    try:
                        run(case, backend="triton")
                    except Exception as err:
                        raise AssertionError(f"T={steps} D={hidden} reverse={reverse}: {err}") from err
    assert len(bounds) > 0
