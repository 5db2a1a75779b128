"""SRU and SRU++ layers with the nn.LSTM conventions, built on ``srupp.ops.sru_recurrence``."""

from srupp.nn.attention import SRUppAttention, SRUppProjectedLinear
from srupp.nn.convert import c_from_sru, srupp_from_sru
from srupp.nn.sru import SRU, SRUCell
from srupp.nn.srupp import SRUpp, SRUppCell, SRUppDecodeState, SRUppState

__all__ = [
    "SRU",
    "SRUCell",
    "SRUpp",
    "SRUppAttention",
    "SRUppCell",
    "SRUppDecodeState",
    "SRUppProjectedLinear",
    "SRUppState",
    "c_from_sru",
    "srupp_from_sru",
]
