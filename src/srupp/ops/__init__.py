"""The SRU recurrence: a plain-PyTorch spec (``naive``) and fused backends behind one function."""

from srupp.ops.naive import sru_recurrence_naive
from srupp.ops.recurrence import BACKENDS, sru_recurrence

__all__ = ["BACKENDS", "sru_recurrence", "sru_recurrence_naive"]
