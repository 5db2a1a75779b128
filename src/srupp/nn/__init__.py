"""SRU and SRU++ layers with the nn.LSTM conventions, built on ``srupp.ops.sru_recurrence``."""

from srupp.nn.attention import SRUppAttention, SRUppProjectedLinear
from srupp.nn.convert import c_from_sru, srupp_from_sru
from srupp.nn.decode import SRUppDecoder
from srupp.nn.layer import HIGHWAY_BIAS, SRULayer, attention_layer_indices
from srupp.nn.sru import SRU
from srupp.nn.srupp import SRUpp
from srupp.nn.state import SRUppState

__all__ = [
    "HIGHWAY_BIAS",
    "SRU",
    "SRULayer",
    "SRUpp",
    "SRUppAttention",
    "SRUppDecoder",
    "SRUppProjectedLinear",
    "SRUppState",
    "attention_layer_indices",
    "c_from_sru",
    "srupp_from_sru",
]
