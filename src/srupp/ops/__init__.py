"""The SRU recurrence: a plain-PyTorch spec (``naive``) and fused backends behind one function."""

from srupp.ops.cpu import cpu_kernel_info, empty_cpu_cache
from srupp.ops.naive import sru_recurrence_naive
from srupp.ops.recurrence import BACKENDS, sru_recurrence

__all__ = ["BACKENDS", "cpu_kernel_info", "empty_cpu_cache", "sru_recurrence", "sru_recurrence_naive"]
