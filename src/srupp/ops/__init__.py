"""The SRU recurrence: a plain-PyTorch spec (``naive``) and fused backends behind one function.

Modules: ``recurrence`` (the public function, backend names and their resolution), ``naive`` (the spec),
``cpu`` and ``triton_kernel`` (the fused backends, sharing ``fused``), ``library`` (loading the compiled CPU
library), ``output_cache`` (reused storage for large CPU outputs), ``decode_kernel`` (the compiled one-token
decoding step) and ``onnx_translation``.
"""

from srupp.ops.library import bf16_matmul, cpu_kernel_info
from srupp.ops.naive import sru_recurrence_naive
from srupp.ops.output_cache import cached_linear, empty_cpu_cache
from srupp.ops.recurrence import BACKENDS, resolve_backend, sru_recurrence

__all__ = [
    "BACKENDS",
    "bf16_matmul",
    "cached_linear",
    "cpu_kernel_info",
    "empty_cpu_cache",
    "resolve_backend",
    "sru_recurrence",
    "sru_recurrence_naive",
]
