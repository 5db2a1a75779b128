"""Reused storage for large CPU outputs: the recurrence op's results and ``cached_linear``, the layers' U."""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

from srupp.errors import ConfigError

_DTYPES = (torch.float32, torch.float64)


class _OutputCache:
    """Storage for the kernels' large outputs, kept after their last user lets go and handed out again.

    A fresh allocation of tens of MiB is mapped anew by the C library on every call, and the operating
    system zeroes every page of it on first touch, which adds as many writes as a kernel's own output. So
    outputs of at least ``MIN_BYTES`` are carved from storage this cache keeps, as new tensors on it (never
    the same tensor object, so nothing it hands out is a view of anything). A storage is free again when the
    cache holds the only reference to it: once every tensor on it (the caller's, autograd's saved copy, a
    ``.grad`` that adopted it) is gone. The cache holds at most ``SRUPP_CPU_CACHE_MB`` MiB (default 1024; 0
    turns it off), dropping the least recently used free storage to make room, and allocating outside it when
    everything it holds is in use. ``srupp.ops.empty_cpu_cache()`` releases what is free.
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
        if shape is None:
            if like.nbytes < self.MIN_BYTES:  # first: small outputs, most calls, need not read the environment
                return torch.empty_like(like, memory_format=torch.contiguous_format)
            shape = like.shape
        shape = tuple(shape)
        nbytes = math.prod(shape) * like.element_size()
        if nbytes < self.MIN_BYTES:
            return like.new_empty(shape)
        limit = self.limit_bytes()
        if self._use_count is None or nbytes > limit:
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


def new_output(like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """An uninitialised contiguous tensor of ``like``'s dtype and of its shape (or ``shape``), in reused storage
    when it is large (see ``_OutputCache``)."""
    return _OUTPUTS.new(like, shape)


def held_bytes() -> int:
    """Bytes of storage the cache holds, in use or free."""
    return _OUTPUTS.held_bytes()


def empty_cpu_cache() -> None:
    """Release the output buffers the CPU kernel keeps for reuse (see ``cpu_kernel_info()["cache_bytes"]``).

    Buffers still in use (held by tensors, autograd or gradients) are unaffected and freed with them.
    """
    _OUTPUTS.empty()


# glibc serves allocations up to this size from its heap once a block that large has been freed, reusing the
# memory; larger ones are mapped anew every time, and the system zeroes each of their pages on first touch.
_MAPPED_BYTES = 32 << 20


def cached_linear(input: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(input, weight)`` (no bias), with an output of more than 32 MiB in storage from the output cache
    where nothing else is at stake: on the CPU, in eager mode, of plain float32/float64 tensors, without
    autocast, and where autograd needs nothing of the result. Anywhere else, ``F.linear`` itself.

    The layers compute U, the recurrence's input and a layer's largest tensor (T * B * 3 * hidden values), with
    this. glibc maps every allocation above 32 MiB anew (``_MAPPED_BYTES``), so reusing U's storage saves the
    zeroing of its pages; smaller outputs are left to torch, as glibc reuses their memory itself and a cached
    buffer there made some processes slower (BENCHMARKS.md, the layer tables)."""
    if (
        type(input) is not Tensor
        or type(weight) not in (Tensor, torch.nn.Parameter)
        or input.device.type != "cpu"
        or weight.device.type != "cpu"
        or input.dtype not in _DTYPES
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
