"""Checkpoints: one safetensors file per checkpoint, written atomically, never unpickled.

Tensors (weights under ``model/``, optimizer state under ``optim/``) live in the safetensors body; the
resolved config, vocabulary and trainer state are JSON strings in its metadata. A sha256 over every tensor
(name, dtype, shape, bytes) and every metadata string is stored beside them and checked on loading, so a
flipped bit anywhere is a clear error. Each DDP rank's RNG and carried recurrent state go to a small file of
its own (see :func:`carry_to_tensors`), so the shared file does not grow with the number of ranks.

Files are written to a temporary name of this process beside the target, fsynced and renamed over it: a
crash mid-write leaves the previous checkpoint whole. This module is also the one place that builds a model
for ``train/`` (:func:`build_model`), so the runtime backend choice lives here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from srupp.errors import CheckpointError, UnavailableError
from srupp.files import replacing
from srupp.models import LMConfig, SRUppLM
from srupp.nn import SRUppState

FORMAT = "srupp-checkpoint/2"
_METADATA_KEYS = ("format", "config", "vocab", "trainer")
# safetensors headers list names, dtypes, shapes and offsets: a few KB for any real model.
_MAX_HEADER_BYTES = 16 << 20


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


def _digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        # Length-prefixed fields, so no two different files hash the same byte stream.
        for part in (json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode(), data):
            digest.update(len(part).to_bytes(8, "little") + part)
    for key in _METADATA_KEYS:
        part = f"{key}={metadata.get(key, '')}".encode()
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


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
    """Write a checkpoint atomically (a temporary file of this process + fsync + ``os.replace``).

    Raises:
        OSError: the folder is not writable or the disk is full (naming the file); the previous file at
            ``path`` is untouched and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        **{k: json.dumps(v) for k, v in (("config", config), ("vocab", vocab), ("trainer", trainer))},
    }
    metadata["sha256"] = _digest(tensors, metadata)
    with replacing(path) as (fd, tmp):
        mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask, as the system applied it
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors reports I/O failures (a full disk) as its own error
            raise OSError(errno.EIO, f"cannot write checkpoint ({err})", str(path)) from err
        os.chmod(tmp, mode)  # safetensors writes the file anew with mode 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    _fsync_dir(path.parent)
    return path


def _check_header(path: Path) -> None:
    """Refuse a file whose safetensors header claims more than the file (or a sane header) holds."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {size} bytes")
    length = int.from_bytes(head, "little")
    if length > min(size - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted: its header claims {length:,} bytes of a {size:,}-byte file"
        )


def _read(path: Path, *, with_tensors: bool) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The header's metadata of an srupp checkpoint of this format and, if asked, its tensors: one opening of
    the file, the format checked before any tensor is read."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is not an srupp checkpoint of this version (format {metadata.get('format')!r}, "
                    f"expected {FORMAT!r})"
                )
            names = f.keys() if with_tensors else []
            tensors = {name: f.get_tensor(name) for name in names}
    except CheckpointError:
        raise
    except (SafetensorError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted and cannot be read ({err})") from err
    return metadata, tensors


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[dict, dict, dict]:
    try:
        config, vocab, trainer = (json.loads(metadata[k]) for k in ("config", "vocab", "trainer"))
    except (KeyError, ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path} has corrupted metadata ({err})") from err
    if not all(isinstance(part, dict) for part in (config, vocab, trainer)):
        raise CheckpointError(f"checkpoint {path} has corrupted metadata (config, vocab and trainer must be objects)")
    return config, vocab, trainer


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The training config stored in a checkpoint, read from its header alone (no tensor is loaded, and the
    sha256 over the whole file is not checked: ``load_checkpoint`` checks it when the run resumes)."""
    path = Path(path)
    return _parse_metadata(path, _read(path, with_tensors=False)[0])[0]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Memory use is bounded by the file's size; nothing is unpickled.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError (a ValueError): the file is not an srupp checkpoint, or is truncated or corrupted.
    """
    path = Path(path)
    metadata, tensors = _read(path, with_tensors=True)
    if _digest(tensors, metadata) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted: its contents do not match the stored sha256")
    return Checkpoint(path, tensors, *_parse_metadata(path, metadata))


def build_model(config: LMConfig, *, backend: str = "auto", device: torch.device | str | None = None) -> SRUppLM:
    """The one place ``train/`` builds a model: ``backend`` is a runtime choice, never read from a file.

    Raises:
        UnavailableError: ``backend`` names a recurrence backend this machine cannot run.
    """
    from srupp.ops import resolve_backend

    try:
        resolve_backend(backend, torch.device(device or "cpu"))  # fail before training, not at the first step
    except RuntimeError as err:
        raise UnavailableError(f"`backend` {backend!r} is not available: {err}") from err
    return SRUppLM(config, backend=backend, device=device)


def carry_to_tensors(carry: SRUppState | None) -> dict[str, Tensor]:
    """The recurrent state carried between training segments as named tensors (empty for None)."""
    return {} if carry is None else carry.to_tensors()


def carry_from_tensors(tensors: dict[str, Tensor], device: torch.device) -> SRUppState | None:
    """Inverse of :func:`carry_to_tensors`, on ``device``."""
    return SRUppState.from_tensors(tensors).to(device) if "c" in tensors else None


def check_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``weights`` has exactly ``model``'s names and shapes (``model`` may be
    on the meta device, so a file that claims a huge architecture is refused before anything is allocated)."""
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
        raise CheckpointError(f"checkpoint {source} was saved for a different architecture: {details}")


def load_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)`` with an error that names the architecture mismatch."""
    check_weights(model, weights, source)
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


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else the run folder's ``checkpoints/best.safetensors`` (else ``last``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("best.safetensors", "last.safetensors"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    raise CheckpointError(f"run folder {path} has no checkpoints/best.safetensors or checkpoints/last.safetensors")


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", *, backend: str = "auto"):
    """Rebuild the model a checkpoint was trained as, from the checkpoint's own config.

    The architecture is checked against the file's tensor shapes on the meta device first, so a damaged or
    hostile file cannot make this allocate more than the file holds. ``backend`` is this run's choice: a
    model trained with ``"triton"`` evaluates on a CPU-only machine.

    Returns:
        ``(model, TrainConfig, Vocab, Checkpoint)`` with the model in eval mode on ``device``.

    Raises:
        CheckpointError: the file is damaged or its config, vocabulary and tensors disagree.
    """
    from srupp.data import Vocab
    from srupp.train.config import TrainConfig

    ckpt = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ckpt.config)
        vocab = Vocab.from_dict(ckpt.vocab)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid config or vocabulary: {err}") from err
    if vocab.size != cfg.model.vocab_size:
        raise CheckpointError(
            f"checkpoint {path} is inconsistent: a {vocab.kind!r} vocabulary of {vocab.size} tokens for a model "
            f"with `vocab_size` {cfg.model.vocab_size}"
        )
    weights = ckpt.prefixed("model/")
    check_weights(SRUppLM(cfg.model, device="meta"), weights, path)
    model = build_model(cfg.model, backend=backend, device=device)
    model.load_state_dict(weights)
    return model.eval(), cfg, vocab, ckpt
