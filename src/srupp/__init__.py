"""srupp: SRU++ (Lei, EMNLP 2021) for PyTorch: fused recurrence kernels, layers, language models, training."""

try:  # the installed distribution's version; a bare source tree (PYTHONPATH=src) has no metadata
    __version__ = __import__("importlib.metadata").metadata.version("srupp")
except Exception:  # noqa: BLE001
    __version__ = "0.1.0+source"
