"""srupp: SRU++ (Lei, EMNLP 2021) for PyTorch: fused recurrence kernels, layers, language models, training."""

__version__ = "0.1.0"
