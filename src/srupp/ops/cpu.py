"""The fused CPU backend: a C kernel (csrc/sru_cpu.c) called through ctypes, registered with torch.library."""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import torch
from torch import Tensor

from srupp.ops.fused import fake_backward, register_autograd, run_forward

_HERE = Path(__file__).resolve().parent
_LIB: ctypes.CDLL | None = None
_LOAD_ERROR: str | None = None
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_FORWARD_ARGS = [_P] * 10 + [_I64, _I64, _I64, _INT, _INT]
_BACKWARD_ARGS = [_P] * 14 + [_I64, _I64, _I64, _INT, _INT]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _library() -> ctypes.CDLL | None:
    global _LIB, _LOAD_ERROR
    if _LIB is not None or _LOAD_ERROR is not None:
        return _LIB
    candidates = [
        _HERE / f"_sru_cpu{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES if suffix.endswith(".so")
    ]
    found = [path for path in candidates if path.exists()]
    if not found:
        _LOAD_ERROR = f"the compiled kernel is missing (looked for {candidates[0].name} in {_HERE})"
        return None
    try:
        lib = ctypes.CDLL(str(found[0]))
    except OSError as err:
        _LOAD_ERROR = f"the compiled kernel {found[0]} failed to load: {err}"
        return None
    for dtype_suffix in _SUFFIX.values():
        getattr(lib, f"srupp_sru_forward_{dtype_suffix}").argtypes = _FORWARD_ARGS
        getattr(lib, f"srupp_sru_backward_{dtype_suffix}").argtypes = _BACKWARD_ARGS
    lib.srupp_chunk.restype = _INT
    _LIB = lib
    return _LIB


def is_available() -> bool:
    """Whether the compiled CPU kernel is present and loads."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why the CPU backend cannot be used, with how to get it."""
    _library()
    return (
        f"srupp's 'cpu' backend is unavailable: {_LOAD_ERROR}. Reinstall the package from source with a C compiler "
        "present (`pip install -e .` in the srupp checkout, or `make test`), or pass backend='naive'."
    )


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _threads(lib: ctypes.CDLL, batch: int, hidden: int) -> int:
    """The kernel splits work into (batch row, feature chunk) items; more threads than items would idle."""
    chunk = lib.srupp_chunk()
    return max(1, min(torch.get_num_threads(), batch * ((hidden + chunk - 1) // chunk)))


@torch.library.custom_op("srupp::sru_cpu_forward", mutates_args=(), device_types="cpu")
def sru_cpu_forward(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None,
    mask_c: Tensor | None,
    reverse: bool,
    save_c: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    lib = _library()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    steps, batch, hidden = x.shape
    h = torch.empty_like(x)
    c_last = torch.empty_like(c0)
    c_all = torch.empty_like(x) if save_c else x.new_empty(0)
    getattr(lib, f"srupp_sru_forward_{_SUFFIX[x.dtype]}")(
        u.data_ptr(), x.data_ptr(), v.data_ptr(), b.data_ptr(), c0.data_ptr(), _ptr(mask_pad), _ptr(mask_c),
        h.data_ptr(), c_all.data_ptr() if save_c else None, c_last.data_ptr(),
        steps, batch, hidden, int(reverse), _threads(lib, batch, hidden),
    )  # fmt: skip
    return h, c_last, c_all


@sru_cpu_forward.register_fake
def _(u, x, v, b, c0, mask_pad, mask_c, reverse, save_c):
    return torch.empty_like(x), torch.empty_like(c0), torch.empty_like(x) if save_c else x.new_empty(0)


@torch.library.custom_op("srupp::sru_cpu_backward", mutates_args=(), device_types="cpu")
def sru_cpu_backward(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None,
    mask_c: Tensor | None,
    c_all: Tensor,
    grad_h: Tensor,
    grad_c_last: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lib = _library()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    steps, batch, hidden = x.shape
    grad_u = torch.empty_like(u)
    grad_x = torch.empty_like(x)
    grad_vb = x.new_empty(batch, 4, hidden)
    grad_c0 = torch.empty_like(c0)
    getattr(lib, f"srupp_sru_backward_{_SUFFIX[x.dtype]}")(
        u.data_ptr(), x.data_ptr(), v.data_ptr(), b.data_ptr(), c0.data_ptr(), _ptr(mask_pad), _ptr(mask_c),
        c_all.data_ptr(), grad_h.data_ptr(), grad_c_last.data_ptr(),
        grad_u.data_ptr(), grad_x.data_ptr(), grad_vb.data_ptr(), grad_c0.data_ptr(),
        steps, batch, hidden, int(reverse), _threads(lib, batch, hidden),
    )  # fmt: skip
    return grad_u, grad_x, grad_vb[:, :2].sum(0), grad_vb[:, 2:].sum(0), grad_c0


sru_cpu_backward.register_fake(fake_backward)
register_autograd(sru_cpu_forward, sru_cpu_backward)


def sru_recurrence_cpu(
    u: Tensor,
    x: Tensor,
    v: Tensor,
    b: Tensor,
    c0: Tensor,
    mask_pad: Tensor | None = None,
    mask_c: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Host wrapper: float32/float64 tensors of one dtype in, (h, c_last) out."""
    return run_forward(sru_cpu_forward, u, x, v, b, c0, mask_pad, mask_c, reverse)
