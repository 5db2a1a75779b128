"""Checkpoints: one safetensors file per checkpoint, written atomically, never unpickled.

Tensors (weights under ``model/``, optimizer state under ``optim/``, each rank's RNG and carried recurrent
state under ``rank<r>/``) live in the safetensors body; the resolved config, vocabulary and trainer state are
JSON strings in its metadata, with a sha256 of the tensor bytes that loading checks. The file is written to a
temporary name beside the target, fsynced, and renamed over it, so a crash mid-write leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

FORMAT = "srupp-checkpoint/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors`` by name, ``config`` (a TrainConfig dict), ``vocab`` and ``trainer``."""

    path: Path
    tensors: dict[str, Tensor]
    config: dict[str, Any]
    vocab: dict[str, Any]
    trainer: dict[str, Any]

    def prefixed(self, prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _digest(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    *,
    config: dict[str, Any],
    vocab: dict[str, Any],
    trainer: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically (temporary file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config),
        "vocab": json.dumps(vocab),
        "trainer": json.dumps(trainer),
        "sha256": _digest(tensors),
    }
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an srupp checkpoint, or is truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is truncated or corrupted and cannot be read ({err})") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an srupp checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if _digest(tensors) != metadata.get("sha256"):
        raise ValueError(f"checkpoint {path} is corrupted: its tensors do not match the stored sha256")
    try:
        config, vocab, trainer = (json.loads(metadata[k]) for k in ("config", "vocab", "trainer"))
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path} has corrupted metadata ({err})") from err
    return Checkpoint(path, tensors, config, vocab, trainer)


def load_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)`` with an error that names the architecture mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: {list(weights[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shape mismatch (checkpoint vs model) {wrong[:4]}" if wrong else "",
            )
            if part
        )
        raise ValueError(f"checkpoint {source} was saved for a different architecture: {details}")
    model.load_state_dict(weights)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (param groups, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], extra: dict[str, Any]):
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *extra["scalars"].items()]:
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild the model a checkpoint was trained as, from the checkpoint's own config.

    Returns:
        ``(model, TrainConfig, Vocab, Checkpoint)`` with the model in eval mode on ``device``.
    """
    from srupp.data import Vocab
    from srupp.models import SRUppLM
    from srupp.train.config import TrainConfig

    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt.config)
    model = SRUppLM(cfg.model)
    load_weights(model, ckpt.prefixed("model/"), path)
    vocab = Vocab.from_dict(ckpt.vocab)
    return model.to(device).eval(), cfg, vocab, ckpt
