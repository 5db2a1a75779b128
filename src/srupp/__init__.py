"""srupp: SRU++ (Lei, EMNLP 2021) for PyTorch: fused recurrence kernels, layers, language models, training."""

from importlib import metadata

try:  # the installed distribution's version; a bare source tree (PYTHONPATH=src) has no metadata
    __version__ = metadata.version("srupp")
except metadata.PackageNotFoundError:
    __version__ = "0.1.0+source"

from srupp.models import LMConfig, SRUppLM  # noqa: E402
from srupp.nn import SRU, SRUpp, SRUppState  # noqa: E402
from srupp.ops import sru_recurrence  # noqa: E402

__all__ = ["LMConfig", "SRU", "SRUpp", "SRUppLM", "SRUppState", "__version__", "sru_recurrence"]
