"""The compiled CPU library (csrc/): finding and loading it, choosing its instruction-set variant and how it runs
its threads. The recurrence op (``cpu.py``) and the decoding kernel (``decode_kernel.py``) bind their functions
from what this module loads."""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from srupp.errors import ConfigError
from srupp.ops.output_cache import held_bytes

_HERE = Path(__file__).resolve().parent
_P = ctypes.c_void_p
_INT = ctypes.c_int
_ABI_VERSION = 7
# Instruction-set variants compiled into the library, best last; the bit each has in its masks. avx512bf16 is
# avx512 with the AVX-512 BF16 instructions converting its bfloat16 outputs.
ISAS = ("baseline", "avx2", "avx512", "avx512bf16")
_ISA_BITS = {"baseline": 1, "avx2": 2, "avx512": 4, "avx512bf16": 8}


def address(tensor: torch.Tensor | None) -> int | None:
    """A tensor's data address for a C argument (None for a missing optional tensor)."""
    return None if tensor is None else tensor.data_ptr()


@dataclass
class Library:
    """The loaded library and the variant in use: ``function`` binds one of that variant's entry points."""

    lib: ctypes.CDLL
    isa: str
    available: tuple[str, ...]
    threading: str  # "openmp" (torch's own thread team) or "pthreads" (threads started per call)
    _functions: dict[str, ctypes._CFuncPtr] = field(default_factory=dict, repr=False)

    def function(self, name: str, argtypes: list, restype: type | None = None) -> ctypes._CFuncPtr:
        """The entry point ``{name}_{isa}`` of the variant in use, with its argument and result types set."""
        bound = self._functions.get(name)
        if bound is None:
            bound = getattr(self.lib, f"{name}_{self.isa}")
            bound.argtypes, bound.restype = argtypes, restype
            self._functions[name] = bound
        return bound


_KERNEL: Library | None = None
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
            entry = [
                ctypes.cast(getattr(omp, name), _P).value
                for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
            ]
        except (OSError, AttributeError):
            entry = [None, None, None]
    return "openmp" if lib.srupp_use_openmp(*entry) else "pthreads"


def _open() -> ctypes.CDLL:
    """The library file beside this module, loaded; OSError where it is missing, broken or stale."""
    # `_sru_cpu.so` (no Python tag: the library has no Python ABI) first; then the names of earlier builds.
    candidates = [_HERE / "_sru_cpu.so"] + [
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
    return lib


def _load() -> Library:
    """Load the library and choose the variant to use; raises OSError (missing or broken library) or
    ConfigError, a ValueError (a bad SRUPP_CPU_ISA: the user's setting, shown by the CLI in one line)."""
    lib = _open()
    usable = lib.srupp_isa_compiled() & _supported_mask(lib)
    available = tuple(isa for isa in ISAS if usable & _ISA_BITS[isa])
    forced = os.environ.get("SRUPP_CPU_ISA", "").strip().lower()
    if forced and forced not in ISAS:
        raise ConfigError(f"`SRUPP_CPU_ISA` must be one of {ISAS} (or unset), got {forced!r}")
    if forced and forced not in available:
        raise ConfigError(f"`SRUPP_CPU_ISA` asks for {forced!r}, which this CPU cannot run; it can run {available}")
    threads = os.environ.get("SRUPP_CPU_THREADS", "").strip().lower()
    if threads not in ("", "openmp", "pthreads"):
        raise ConfigError(f"`SRUPP_CPU_THREADS` must be 'openmp' or 'pthreads' (or unset), got {threads!r}")
    return Library(lib, forced or available[-1], available, _bind_threading(lib, threads != "pthreads"))


def kernel() -> Library | None:
    """The loaded library (loaded on first use), or None where it cannot be loaded (``unavailable_reason``)."""
    global _KERNEL, _LOAD_ERROR
    if _KERNEL is None and _LOAD_ERROR is None:
        try:
            _KERNEL = _load()
        except OSError as err:
            _LOAD_ERROR = str(err)
    return _KERNEL


def require_kernel() -> Library:
    """The loaded library; RuntimeError, saying how to get it, where it cannot be loaded."""
    loaded = kernel()
    if loaded is None:
        raise RuntimeError(unavailable_reason())
    return loaded


def reset() -> None:
    """Forget the loaded kernel, so the next call reads SRUPP_CPU_ISA again (for tests and benchmarks)."""
    global _KERNEL, _LOAD_ERROR
    _KERNEL, _LOAD_ERROR = None, None


def is_available() -> bool:
    """Whether the compiled CPU kernel is present and loads."""
    return kernel() is not None


def unavailable_reason() -> str:
    """Why the CPU backend cannot be used, with how to get it."""
    kernel()
    return (
        f"srupp's 'cpu' backend is unavailable: {_LOAD_ERROR}. Install srupp from source with a C compiler "
        "present (e.g. `apt install gcc`, then `pip install --force-reinstall --no-binary srupp srupp` or "
        "`pip install .` in a checkout), or pass backend='naive'."
    )


def bf16_matmul() -> str | None:
    """What runs bfloat16 matrix products faster than float32 on this CPU, for torch (oneDNN): ``"amx"`` (AMX
    tiles), ``"avx512_bf16"`` (AVX-512 BF16 dot products), or None (bfloat16 then computes through float32, and
    mixed precision saves memory traffic at best)."""
    for name, kind in (("_is_amx_tile_supported", "amx"), ("_is_avx512_bf16_supported", "avx512_bf16")):
        probe = getattr(torch.cpu, name, None)  # private in torch: probe, not assume
        if probe is not None and probe():
            return kind
    return None


def cpu_kernel_info() -> dict[str, object]:
    """What the fused CPU kernel runs with.

    Returns:
        ``{"loaded": bool, "isa": str | None, "available": [str], "threads": int, "threading": str | None,
        "reason": str | None, "cache_bytes": int, "bf16_matmul": str | None}``: the instruction-set variant in use
        (``SRUPP_CPU_ISA=baseline|avx2|avx512|avx512bf16`` forces one; every variant reads and writes bfloat16 and
        float16 itself), the variants this CPU can run, the thread count the
        kernel uses (``torch.get_num_threads()``), how it runs them (``"openmp"``: on the team of torch's own
        OpenMP runtime; ``"pthreads"``: threads started per call, where torch does not run on OpenMP or
        ``SRUPP_CPU_THREADS=pthreads``), why the kernel did not load, if it did not, and the bytes of the output
        buffers it keeps for reuse, in use or free (at most ``SRUPP_CPU_CACHE_MB`` MiB; ``empty_cpu_cache()``
        releases the free ones), and what speeds bfloat16 matrix products here (``bf16_matmul()``: ``"amx"``,
        ``"avx512_bf16"`` or None), which ``srupp train --precision auto`` reads.

    Example:
        >>> cpu_kernel_info()["isa"]  # doctest: +SKIP
        'avx512'
    """
    loaded = kernel()
    return {
        "loaded": loaded is not None,
        "isa": None if loaded is None else loaded.isa,
        "available": [] if loaded is None else list(loaded.available),
        "threads": torch.get_num_threads(),
        "threading": None if loaded is None else loaded.threading,
        "reason": None if loaded is not None else _LOAD_ERROR,
        "cache_bytes": held_bytes(),
        "bf16_matmul": bf16_matmul(),
    }


# Loaded at import, not on first use: traced code (``torch.compile``) asks ``is_available()`` while choosing a
# backend, and tracing the loader's file-system calls fails. A bad setting is reported at first use instead.
try:
    kernel()
except ConfigError:
    reset()
