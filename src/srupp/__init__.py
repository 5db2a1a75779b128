"""srupp: SRU++ (Lei, EMNLP 2021) for PyTorch: fused recurrence kernels, layers, language models, training."""

__version__ = "0.1.0"

from srupp.models import LMConfig, SRUppLM  # noqa: E402
from srupp.nn import SRU, SRUpp, SRUppState  # noqa: E402
from srupp.ops import sru_recurrence  # noqa: E402

__all__ = ["LMConfig", "SRU", "SRUpp", "SRUppLM", "SRUppState", "__version__", "sru_recurrence"]
