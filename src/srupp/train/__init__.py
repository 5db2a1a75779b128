"""Training: the config, the loop, schedules, checkpoints, evaluation and distributed setup."""

from srupp.train.checkpoint import load_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from srupp.train.config import TrainConfig, apply_overrides, load_preset
from srupp.train.evaluate import bpc, evaluate, ppl
from srupp.train.loop import TrainResult, learning_rate, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "bpc",
    "evaluate",
    "learning_rate",
    "load_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "load_preset",
    "ppl",
    "save_checkpoint",
    "train",
]
