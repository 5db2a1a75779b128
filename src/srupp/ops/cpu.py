"""The fused CPU backend: a C kernel (csrc/sru_cpu.c) called through ctypes, registered with torch.library."""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from srupp.errors import ConfigError
from srupp.ops.fused import fake_backward, register_autograd, run_forward

_HERE = Path(__file__).resolve().parent
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_FORWARD_ARGS = [_P] * 10 + [_I64, _I64, _I64, _INT, _INT]
_BACKWARD_ARGS = [_P] * 14 + [_I64, _I64, _I64, _INT, _INT]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ABI_VERSION = 6
# Instruction-set variants compiled into the library, best last; the bit each has in its masks.
ISAS = ("baseline", "avx2", "avx512")
_ISA_BITS = {"baseline": 1, "avx2": 2, "avx512": 4}


class TokenLayer(ctypes.Structure):
    """One layer's weights for the one-token decoding kernel (``struct srupp_token_layer`` in csrc/sru_cpu.c)."""

    _fields_ = [(name, _P) for name in ("in_norm_w", "in_norm_b", "wq_t", "wkv_t", "alpha", "norm_w", "norm_b",
                                        "wo_t", "u_bias", "gate_v")]  # fmt: skip
    _fields_ += [("in_norm_eps", ctypes.c_float), ("norm_eps", ctypes.c_float)]
    _fields_ += [(name, _I64) for name in ("in_", "proj", "out", "hidden", "heads")]
    _fields_ += [("has_in_norm", _INT), ("project_skip", _INT)]


class TokenRunArgs(ctypes.Structure):
    """A whole stack's decoding run for the one-token kernel (``struct srupp_token_run`` in csrc/sru_cpu.c)."""

    _fields_ = [("layers", ctypes.POINTER(TokenLayer)), ("windows", ctypes.POINTER(_P)),
                ("strides", ctypes.POINTER(_I64)), ("pad", _P)]  # fmt: skip
    _fields_ += [(name, _I64) for name in ("pad_stride", "num_layers", "batch", "width")]
    _fields_ += [(name, _P) for name in ("embedding", "head_t", "head_bias")]
    _fields_ += [(name, _I64) for name in ("vocab_in", "vocab_out")]


@dataclass
class _Kernel:
    lib: ctypes.CDLL
    isa: str
    available: tuple[str, ...]
    forward: dict[torch.dtype, Callable[..., None]]
    backward: dict[torch.dtype, Callable[..., None]]
    token_run: Callable[..., int]
    threading: str  # "openmp" (torch's own thread team) or "pthreads" (threads started per call)


_KERNEL: _Kernel | None = None
_LOAD_ERROR: str | None = None


def _supported_mask(lib: ctypes.CDLL) -> int:
    """Bit mask of the variants this CPU can run (cpuid, asked in C; tests replace this)."""
    return lib.srupp_isa_supported()


def _torch_openmp() -> Path | None:
    """The OpenMP runtime library torch's parallel ops run on, as mapped into this process (Linux), or None.

    The kernel's threads join that runtime's team instead of starting threads of their own beside it: torch's
    workers spin for a while after each of its parallel ops, and threads started then share the cores with them.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    fields = (line.split(None, 5) for line in maps.splitlines())
    paths = {Path(parts[5]) for parts in fields if len(parts) == 6}
    runtimes = [p for p in paths if p.name.startswith(("libgomp", "libiomp5", "libomp")) and p.exists()]
    torch_dir = Path(torch.__file__).resolve().parent
    # torch's own first: in torch/lib, or in torch.libs beside it (where auditwheel puts it, e.g. on aarch64)
    homes = (torch_dir, torch_dir.parent / "torch.libs")
    return min(runtimes, key=lambda p: (not any(p.resolve().is_relative_to(h) for h in homes), str(p)), default=None)


def _bind_threading(lib: ctypes.CDLL, use_openmp: bool) -> str:
    """Point the library at torch's OpenMP runtime (or at threads of its own); returns the mode in use."""
    lib.srupp_use_openmp.argtypes, lib.srupp_use_openmp.restype = [_P, _P, _P], _INT
    runtime = _torch_openmp() if use_openmp else None
    entry = [None, None, None]
    if runtime is not None:
        try:
            omp = ctypes.CDLL(str(runtime))
            entry = [ctypes.cast(getattr(omp, name), _P).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]  # fmt: skip
        except (OSError, AttributeError):
            entry = [None, None, None]
    return "openmp" if lib.srupp_use_openmp(*entry) else "pthreads"


def _load() -> _Kernel:
    """Load the library and bind the variant to use; raises OSError (missing or broken library) or
    ConfigError, a ValueError (a bad SRUPP_CPU_ISA: the user's setting, shown by the CLI in one line)."""
    candidates = [
        _HERE / f"_sru_cpu{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES if suffix.endswith(".so")
    ]
    found = [path for path in candidates if path.exists()]
    if not found:
        raise OSError(f"the compiled kernel is missing (looked for {candidates[0].name} in {_HERE})")
    try:
        lib = ctypes.CDLL(str(found[0]))
        abi = lib.srupp_abi_version()
    except (OSError, AttributeError) as err:
        raise OSError(f"the compiled kernel {found[0]} failed to load: {err}") from None
    if abi != _ABI_VERSION:
        raise OSError(f"the compiled kernel {found[0]} is stale (ABI {abi}, expected {_ABI_VERSION}); rebuild it")
    usable = lib.srupp_isa_compiled() & _supported_mask(lib)
    available = tuple(isa for isa in ISAS if usable & _ISA_BITS[isa])
    forced = os.environ.get("SRUPP_CPU_ISA", "").strip().lower()
    if forced and forced not in ISAS:
        raise ConfigError(f"`SRUPP_CPU_ISA` must be one of {ISAS} (or unset), got {forced!r}")
    if forced and forced not in available:
        raise ConfigError(f"`SRUPP_CPU_ISA` asks for {forced!r}, which this CPU cannot run; it can run {available}")
    isa = forced or available[-1]
    forward, backward = {}, {}
    for dtype, name in _SUFFIX.items():
        forward[dtype] = getattr(lib, f"srupp_sru_forward_{name}_{isa}")
        forward[dtype].argtypes, forward[dtype].restype = _FORWARD_ARGS, None
        backward[dtype] = getattr(lib, f"srupp_sru_backward_{name}_{isa}")
        backward[dtype].argtypes, backward[dtype].restype = _BACKWARD_ARGS, None
    token_run = getattr(lib, f"srupp_token_run_f32_{isa}")
    token_run.argtypes, token_run.restype = [ctypes.POINTER(TokenRunArgs), _P, _P, _P, _P, _I64, _I64], _INT
    threads = os.environ.get("SRUPP_CPU_THREADS", "").strip().lower()
    if threads not in ("", "openmp", "pthreads"):
        raise ConfigError(f"`SRUPP_CPU_THREADS` must be 'openmp' or 'pthreads' (or unset), got {threads!r}")
    threading_mode = _bind_threading(lib, threads != "pthreads")
    return _Kernel(lib, isa, available, forward, backward, token_run, threading_mode)


def _kernel() -> _Kernel | None:
    global _KERNEL, _LOAD_ERROR
    if _KERNEL is None and _LOAD_ERROR is None:
        try:
            _KERNEL = _load()
        except OSError as err:
            _LOAD_ERROR = str(err)
    return _KERNEL


def _reset() -> None:
    """Forget the loaded kernel, so the next call reads SRUPP_CPU_ISA again (for tests and benchmarks)."""
    global _KERNEL, _LOAD_ERROR
    _KERNEL, _LOAD_ERROR = None, None


def is_available() -> bool:
    """Whether the compiled CPU kernel is present and loads."""
    return _kernel() is not None


def unavailable_reason() -> str:
    """Why the CPU backend cannot be used, with how to get it."""
    _kernel()
    return (
        f"srupp's 'cpu' backend is unavailable: {_LOAD_ERROR}. Install srupp from source with a C compiler "
        "present (e.g. `apt install gcc`, then `pip install --force-reinstall --no-binary srupp srupp` or "
        "`pip install .` in a checkout), or pass backend='naive'."
    )


def cpu_kernel_info() -> dict[str, object]:
    """What the fused CPU kernel runs with.

    Returns:
        ``{"loaded": bool, "isa": str | None, "available": [str], "threads": int, "threading": str | None,
        "reason": str | None, "cache_bytes": int}``: the instruction-set variant in use
        (``SRUPP_CPU_ISA=baseline|avx2|avx512`` forces one), the variants this CPU can run, the thread count the
        kernel uses (``torch.get_num_threads()``), how it runs them (``"openmp"``: on the team of torch's own
        OpenMP runtime; ``"pthreads"``: threads started per call, where torch does not run on OpenMP or
        ``SRUPP_CPU_THREADS=pthreads``), why the kernel did not load, if it did not, and the bytes of the output
        buffers it keeps for reuse, in use or free (at most ``SRUPP_CPU_CACHE_MB`` MiB; ``empty_cpu_cache()``
        releases the free ones).

    Example:
        >>> cpu_kernel_info()["isa"]  # doctest: +SKIP
        'avx512'
    """
    kernel = _kernel()
    return {
        "loaded": kernel is not None,
        "isa": None if kernel is None else kernel.isa,
        "available": [] if kernel is None else list(kernel.available),
        "threads": torch.get_num_threads(),
        "threading": None if kernel is None else kernel.threading,
        "reason": None if kernel is not None else _LOAD_ERROR,
        "cache_bytes": _OUTPUTS.held_bytes(),
    }


class _OutputCache:
    """Storage for the kernels' large outputs, kept after their last user lets go and handed out again.

    A fresh allocation of tens of MiB is mapped anew by the C library on every call, and the operating
    system zeroes every page of it on first touch: in a training step of T=512 B=16 D=512 that is 96 MiB
    of extra writes, a third of what the kernels themselves move. So outputs of at least ``MIN_BYTES`` are carved from
    storage this cache keeps, as new tensors on it (never the same tensor object, so nothing it hands
    out is a view of anything). A storage is free again when the cache holds the only reference to it:
    once every tensor on it (the caller's, autograd's saved copy, a ``.grad`` that adopted it) is gone.
    The cache holds at most ``SRUPP_CPU_CACHE_MB`` MiB (default 1024; 0 turns it off), dropping the
    least recently used free storage to make room, and allocating outside it when everything it holds
    is in use. ``srupp.ops.empty_cpu_cache()`` releases what is free.
    """

    MIN_BYTES = 1 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._storages: list[torch.UntypedStorage] = []  # least recently handed out first
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)  # private in torch: probe, not assume

    @staticmethod
    def limit_bytes() -> int:
        raw = os.environ.get("SRUPP_CPU_CACHE_MB", "").strip()
        try:
            megabytes = float(raw) if raw else 1024.0
        except ValueError:
            megabytes = -1.0
        if not math.isfinite(megabytes) or megabytes < 0:
            raise ConfigError(f"`SRUPP_CPU_CACHE_MB` must be a number of MiB >= 0 (or unset), got {raw!r}")
        return int(megabytes * 2**20)

    def _free(self, storage: torch.UntypedStorage) -> bool:
        return self._use_count(storage._cdata) == 1

    def held_bytes(self) -> int:
        with self._lock:
            return sum(storage.nbytes() for storage in self._storages)

    def empty(self) -> None:
        """Drop every free storage (those in use stay with their users and leave the cache)."""
        with self._lock:
            self._storages = []

    def new(self, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """An uninitialised contiguous tensor of ``like``'s dtype and of its shape, or of ``shape``."""
        shape = tuple(like.shape) if shape is None else tuple(shape)
        nbytes = math.prod(shape) * like.element_size()
        limit = self.limit_bytes()
        if nbytes < self.MIN_BYTES or self._use_count is None or nbytes > limit:
            return like.new_empty(shape)
        with self._lock:
            storage = next((s for s in self._storages if s.nbytes() == nbytes and self._free(s)), None)
            if storage is not None:
                self._storages.remove(storage)
            else:
                held = sum(s.nbytes() for s in self._storages)
                for old in [s for s in self._storages if self._free(s)]:
                    if held + nbytes <= limit:
                        break
                    self._storages.remove(old)
                    held -= old.nbytes()
                if held + nbytes > limit:
                    return like.new_empty(shape)
                storage = torch.UntypedStorage(nbytes)
            self._storages.append(storage)
            return like.new_empty(0).set_(storage, 0, shape)


_OUTPUTS = _OutputCache()


# glibc serves allocations up to this size from its heap once a block that large has been freed, reusing the
# memory; larger ones are mapped anew every time, and the system zeroes each of their pages on first touch.
_MAPPED_BYTES = 32 << 20


def cached_linear(input: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(input, weight)`` (no bias), with an output of more than 32 MiB in storage from the output cache
    where nothing else is at stake: on the CPU, in eager mode, of plain float32/float64 tensors, without
    autocast, and where autograd needs nothing of the result. Anywhere else, ``F.linear`` itself.

    The layers compute U, the recurrence's input and a layer's largest tensor (T * B * 3 * hidden values), with
    this. glibc maps every allocation above 32 MiB anew (``_MAPPED_BYTES``): in inference of a 2-layer SRUpp with
    d=1024, T=256, B=16 (U 48 MiB per layer), the layers ran 6-25% faster when U's buffer was reused (Zen 4, two
    threads, old and new code each in their own processes, alternately). Smaller outputs gain nothing, as glibc
    reuses their memory itself, and at d=512 (U 24 MiB) a cached U made some processes 10% slower (not
    understood; the GEMM and the recurrence alone were not), so they are left to torch."""
    if (
        type(input) is not Tensor
        or type(weight) not in (Tensor, torch.nn.Parameter)
        or input.device.type != "cpu"
        or weight.device.type != "cpu"
        or input.dtype not in _SUFFIX
        or weight.dtype != input.dtype
        or input.dim() < 2
        or weight.dim() != 2
        or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or math.prod(input.shape[:-1]) * weight.shape[0] * input.element_size() <= _MAPPED_BYTES
    ):
        return torch.nn.functional.linear(input, weight)
    out = _OUTPUTS.new(input, (*input.shape[:-1], weight.shape[0]))
    torch.mm(input.reshape(-1, input.shape[-1]), weight.t(), out=out.view(-1, weight.shape[0]))
    return out


def empty_cpu_cache() -> None:
    """Release the output buffers the CPU kernel keeps for reuse (see ``cpu_kernel_info()["cache_bytes"]``).

    Buffers still in use (held by tensors, autograd or gradients) are unaffected and freed with them.
    """
    _OUTPUTS.empty()


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _kernel_ready(tensor: Tensor) -> bool:
    """Whether the one-token kernel can read ``tensor`` as is: float32, on the CPU, contiguous."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


@dataclass
class TokenKernel:
    """One layer's weights bound for the one-token decoding kernel (see ``token_kernel``; ``TokenRun`` runs it)."""

    layer: TokenLayer
    tensors: tuple[Tensor, ...]  # what ``layer`` points into, kept alive with it


class TokenRun:
    """The compiled one-token step of a whole stack (``srupp_token_run_f32_<isa>``) over one decoding run's
    buffers: one call per token for all layers. ``bind`` points it at the run's cache buffers (again whenever
    they are replaced); calling it runs a token. ``set_ends`` adds a language model's embedding and output
    layer, for calls with ``ends=True``: token ids in, log-probabilities out.

    Args:
        kernels: per layer, ``token_kernel``'s binding of its weights.
        batch: rows per token. width: the layers' output size (``hidden_size``).
    """

    def __init__(self, kernels: list[TokenKernel], batch: int, width: int) -> None:
        count = len(kernels)
        self._kernels = kernels
        self._layers = (TokenLayer * count)(*(kernel.layer for kernel in kernels))
        self._windows = (_P * count)()
        self._strides = (_I64 * (4 * count))()
        self._args = TokenRunArgs(self._layers, self._windows, self._strides, None, 0, count, batch, width)
        self._ends_args = TokenRunArgs.from_buffer_copy(self._args)
        self._refs = (ctypes.byref(self._args), ctypes.byref(self._ends_args))
        self._run = _require_kernel().token_run
        self._held: tuple = ()
        self._ends: tuple = ()
        self.vocab_out = 0

    def bind(self, buffers: list[Tensor | None], pad: Tensor | None) -> None:
        """Point the run at per layer its cache buffer ``[B, 2, heads, capacity, head_size]`` (None without
        attention) and at the padding marks ``[B, capacity]`` (bool, True = padding; None when the run has none),
        which the kernel clears at each new position."""
        for index, buffer in enumerate(buffers):
            self._windows[index] = _ptr(buffer)
            self._strides[4 * index : 4 * index + 4] = (0, 0, 0, 0) if buffer is None else buffer.stride()[:4]
        for args in (self._args, self._ends_args):
            args.pad, args.pad_stride = _ptr(pad), 0 if pad is None else pad.stride(0)
        self._held = (buffers, pad)

    def set_ends(self, embedding: Tensor, head_t: Tensor, head_bias: Tensor | None) -> None:
        """A language model's ends for calls with ``ends=True``: the embedding table ``[vocab_in, input_size]``
        and the output layer's weight stored ``[width, vocab_out]`` and bias ``[vocab_out]`` (float32, CPU,
        contiguous; kept alive here)."""
        for name, tensor in (("embedding", embedding), ("head_t", head_t), ("head_bias", head_bias)):
            if tensor is not None and not _kernel_ready(tensor):
                raise ValueError(f"`{name}` must be a contiguous float32 CPU tensor")
        args = self._ends_args
        args.embedding, args.head_t, args.head_bias = _ptr(embedding), _ptr(head_t), _ptr(head_bias)
        args.vocab_in, args.vocab_out = embedding.shape[0], head_t.shape[1]
        self.vocab_out = head_t.shape[1]
        self._ends = (embedding, head_t, head_bias)

    def __call__(self, x: Tensor, c_in: Tensor, c_out: Tensor, out: Tensor, start: int, end: int,
                 ends: bool = False) -> None:  # fmt: skip
        """Write position ``end`` of every cache, attend to ``start..end``, and write ``c_out`` ``[layers, B,
        hidden]`` and ``out`` from ``x`` and ``c_in`` (all contiguous): ``x`` ``[B, input_size]`` floats and
        ``out`` the last layer's ``[B, hidden]``, or with ``ends`` ``x`` ``[B]`` int64 token ids and ``out`` the
        log-softmax ``[B, vocab_out]`` of the output layer."""
        status = self._run(self._refs[ends], x.data_ptr(), c_in.data_ptr(), c_out.data_ptr(), out.data_ptr(),
                           start, end)  # fmt: skip
        if status == -2:
            raise IndexError(f"a token id is out of range [0, {self._ends_args.vocab_in})")
        if status != 0:
            raise MemoryError("the one-token decoding kernel could not allocate its scratch memory")


def token_kernel(
    *,
    in_norm: tuple | None,
    wq_t: Tensor,
    wkv_t: Tensor | None,
    alpha: Tensor | None,
    norm: tuple,
    wo_t: Tensor,
    u_bias: Tensor,
    gate_v: Tensor,
    heads: int,
    project_skip: bool,
) -> TokenKernel | None:
    """Bind a unidirectional SRU++ layer's weights for the compiled one-token step (float32 on the CPU,
    contiguous; layer norms as ``(shape, weight, bias, eps)``, weights stored ``[in, out]``), or None where the
    kernel is not loaded or a tensor does not qualify (the caller keeps its torch ops then)."""
    kernel = _kernel()
    norms = [t for norm in (in_norm, norm) if norm is not None for t in norm[1:3] if t is not None]
    tensors = tuple(t for t in (wq_t, wkv_t, alpha, wo_t, u_bias, gate_v, *norms) if t is not None)
    if kernel is None or not all(map(_kernel_ready, tensors)):
        return None
    proj, out = wq_t.shape[1], wo_t.shape[1]
    layer = TokenLayer(
        _ptr(in_norm[1]) if in_norm else None, _ptr(in_norm[2]) if in_norm else None, _ptr(wq_t), _ptr(wkv_t),
        _ptr(alpha), _ptr(norm[1]), _ptr(norm[2]), _ptr(wo_t), _ptr(u_bias), _ptr(gate_v),
        in_norm[3] if in_norm else 0.0, norm[3], wq_t.shape[0], proj, out, gate_v.shape[-1], heads,
        int(in_norm is not None), int(project_skip),
    )  # fmt: skip
    return TokenKernel(layer, tensors)


def _threads() -> int:
    """torch's thread count; the kernel starts fewer where the work is too small to share."""
    return max(1, torch.get_num_threads())


def _check(name: str, tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tensor.shape != shape:
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}, got {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise ValueError(f"`{name}` must be on the CPU, got {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"`{name}` must be contiguous, got strides {list(tensor.stride())}")


def _check_inputs(u, x, v, b, c0, mask_pad, mask_c) -> tuple[int, int, int]:
    """The raw ops hand data pointers to C, which trusts every size: check them all first (about a
    microsecond per tensor; the public function has already checked, so this only catches direct calls)."""
    if x.dim() != 3:
        raise ValueError(f"`x` must have shape [T, B, D] (3 dims), got {list(x.shape)}")
    steps, batch, hidden = x.shape
    dtype = x.dtype
    if dtype not in _SUFFIX:
        raise TypeError(f"`x` must have dtype float32 or float64, got {dtype}")
    _check("x", x, (steps, batch, hidden), dtype)
    _check("u", u, (steps, batch, 3 * hidden), dtype)
    _check("v", v, (2, hidden), dtype)
    _check("b", b, (2, hidden), dtype)
    _check("c0", c0, (batch, hidden), dtype)
    if mask_pad is not None:
        _check("mask_pad", mask_pad, (steps, batch), torch.bool)
    if mask_c is not None:
        _check("mask_c", mask_c, (batch, hidden), dtype)
    return steps, batch, hidden


def _require_kernel() -> _Kernel:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError(unavailable_reason())
    return kernel


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
    kernel = _require_kernel()
    steps, batch, hidden = _check_inputs(u, x, v, b, c0, mask_pad, mask_c)
    h = _OUTPUTS.new(x)
    c_last = torch.empty_like(c0)
    c_all = _OUTPUTS.new(x) if save_c else x.new_empty(0)
    kernel.forward[x.dtype](
        u.data_ptr(), x.data_ptr(), v.data_ptr(), b.data_ptr(), c0.data_ptr(), _ptr(mask_pad), _ptr(mask_c),
        h.data_ptr(), c_all.data_ptr() if save_c else None, c_last.data_ptr(),
        steps, batch, hidden, int(reverse), _threads(),
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
    kernel = _require_kernel()
    steps, batch, hidden = _check_inputs(u, x, v, b, c0, mask_pad, mask_c)
    _check("c_all", c_all, x.shape, x.dtype)
    _check("grad_h", grad_h, x.shape, x.dtype)
    _check("grad_c_last", grad_c_last, c0.shape, x.dtype)
    grad_u = _OUTPUTS.new(u)
    grad_x = _OUTPUTS.new(x)
    grad_vb = x.new_empty(batch, 4, hidden)
    grad_c0 = torch.empty_like(c0)
    kernel.backward[x.dtype](
        u.data_ptr(), x.data_ptr(), v.data_ptr(), b.data_ptr(), c0.data_ptr(), _ptr(mask_pad), _ptr(mask_c),
        c_all.data_ptr(), grad_h.data_ptr(), grad_c_last.data_ptr(),
        grad_u.data_ptr(), grad_x.data_ptr(), grad_vb.data_ptr(), grad_c0.data_ptr(),
        steps, batch, hidden, int(reverse), _threads(),
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
