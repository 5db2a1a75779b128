"""Language models built from srupp.nn: the config dataclass, SRUppLM and generation."""

from srupp.models.config import LMConfig
from srupp.models.decode import SRUppLMDecoder
from srupp.models.generate import generate, sample_next
from srupp.models.lm import SRUppLM, srupp_stack

__all__ = ["LMConfig", "SRUppLM", "SRUppLMDecoder", "generate", "sample_next", "srupp_stack"]
