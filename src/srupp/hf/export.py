"""Turn srupp models and training checkpoints into folders that ``from_pretrained`` loads, and read them back."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import GenerationConfig, PreTrainedTokenizerBase

from srupp import __version__
from srupp.errors import CheckpointError, name_path
from srupp.files import make_temp_dir_beside, move_aside, refuse_inside, remove_orphans
from srupp.hf.configuration import SRUppConfig
from srupp.hf.modeling import SRUppForCausalLM
from srupp.hf.tokenization import tokenizer_for_vocab
from srupp.models import SRUppLM

SRUPP_FILE = "srupp.json"
"""srupp's own record in an export: the vocabulary, and the training config and metrics of a checkpoint."""
REMOTE_MODULE = "modeling_srupp"
# The whole of the module `trust_remote_code` runs: the classes live in the installed srupp package.
REMOTE_CODE = '''"""SRU++ for transformers' trust_remote_code: the classes come from srupp (pip install 'srupp[hf]')."""

from srupp.hf import SRUppConfig, SRUppForCausalLM, SRUppForSequenceClassification

__all__ = ["SRUppConfig", "SRUppForCausalLM", "SRUppForSequenceClassification"]
'''
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_MODULE}.SRUppConfig",
    "AutoModelForCausalLM": f"{REMOTE_MODULE}.SRUppForCausalLM",
    "AutoModelForSequenceClassification": f"{REMOTE_MODULE}.SRUppForSequenceClassification",
}
_MAX_SRUPP_FILE = 256 << 20  # a word vocabulary of WikiText-103's size is ~4 MB; refuse absurd files before reading


def export_model(
    model: SRUppLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vocab: Any = None,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face folder: ``config.json``, ``model.safetensors``,
    ``generation_config.json``, the tokenizer files, a model card (``README.md``), ``srupp.json`` and the small
    ``modeling_srupp.py`` that ``config.json``'s ``auto_map`` names, so ``from_pretrained(folder,
    trust_remote_code=True)`` works in a process that never imported ``srupp.hf``.

    The folder is written beside ``out_dir`` under a temporary name and renamed into place, so ``out_dir`` is
    never left half-written; its files get the permissions of any new file of the user (the umask's).

    Args:
        model: the language model (its weights are copied; runtime choices such as the backend are not saved).
        out_dir: the folder to create; it must not exist, be empty, or (with ``overwrite``) hold an earlier
            export (see :func:`check_export_target`).
        tokenizer: saved with the model (default: the tokenizer of ``vocab``, if given); its pad and end
            tokens become ``config.json``'s ``pad_token_id`` and ``eos_token_id``.
        vocab: the srupp ``Vocab`` the model was trained on (lets ``srupp eval``/``generate`` read the folder).
        training: ``{"config": TrainConfig dict, "trainer": {...}, "metrics": {...}}`` for the model card.
        overwrite: move an earlier export in ``out_dir`` aside into ``<out_dir>.replaced/<UTC time>/`` once the
            new folder is complete (nothing is deleted).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    check_export_target(out, overwrite)
    if not isinstance(model, SRUppLM):
        raise TypeError(f"`model` must be an SRUppLM, got {type(model).__name__}")
    if tokenizer is None and vocab is not None:
        tokenizer = tokenizer_for_vocab(vocab)
    hf_model = _hf_model(model, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent)
    staging = make_temp_dir_beside(out)
    try:
        try:
            hf_model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            _write_srupp_files(staging, hf_model.config, vocab, training)
        except OSError as err:  # a full disk: name the user's folder, not the staging one
            raise name_path(err, out, replace=True) from err
        except SafetensorError as err:  # safetensors reports I/O failures as its own error
            raise OSError(f"cannot write {out}: {err}") from err
        _umask_permissions(staging)
        _install(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _write_srupp_files(folder: Path, config: SRUppConfig, vocab: Any, training: dict[str, Any] | None) -> None:
    """The auto_map module, ``srupp.json`` and the model card."""
    (folder / f"{REMOTE_MODULE}.py").write_text(REMOTE_CODE, encoding="utf-8")
    record = {"srupp_version": __version__, "vocab": None if vocab is None else vocab.to_dict(), **(training or {})}
    (folder / SRUPP_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    (folder / "README.md").write_text(model_card(config, vocab, training), encoding="utf-8")


def _hf_model(model: SRUppLM, tokenizer: PreTrainedTokenizerBase | None) -> SRUppForCausalLM:
    """The Hugging Face model of a copy of ``model``'s weights, built on the CPU (``model`` stays where it is)."""
    specials = {}
    if tokenizer is not None:
        specials = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = SRUppConfig.from_lm_config(model.config, **specials)
    config.auto_map = dict(AUTO_MAP)
    hf_model = SRUppForCausalLM(config).to(dtype=next(model.parameters()).dtype)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.eval()
    hf_model.generation_config = GenerationConfig(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    return hf_model


def _umask_permissions(folder: Path) -> None:
    """Give the files under ``folder`` the mode a new file of the user gets: ``folder`` was made by ``mkdir``
    (0777 less the umask), and libraries write some files 0600 (safetensors)."""
    dir_mode = folder.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        os.chmod(path, dir_mode if path.is_dir() else dir_mode & 0o666)


def model_card(config: SRUppConfig, vocab: Any = None, training: dict[str, Any] | None = None) -> str:
    """The ``README.md`` of an export: what the model is, how it was trained, and how to load it."""
    lm = config.to_lm_config()
    kind = {"byte": "byte-level", "word": "word-level", "bpe": "BPE"}.get(getattr(vocab, "kind", None), "")
    layers = lm.attention_layer_indices
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [srupp, sru, recurrent]",
        "---",
        "",
        "# SRU++ language model",
        "",
        f"A {kind + ' ' if kind else ''}SRU++ language model (Lei, 2021, *When Attention Meets Fast Recurrence*), "
        f"exported by srupp {__version__}: {lm.num_layers} layers, hidden size d = {lm.hidden_size}, attention size "
        f"d' = {lm.proj_size}, attention in layers {list(layers)}, {lm.vocab_size:,} token ids, "
        f"{lm.num_parameters / 1e6:.2f}M parameters. It is a recurrent model: it reads text left to right with "
        "a state of fixed size plus the attention cache.",
        "",
        "## Load it",
        "",
        "```python",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # pip install "srupp[hf]"',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "PATH is this folder (or its Hub id). `trust_remote_code=True` runs `modeling_srupp.py`, whose only code "
        "is `from srupp.hf import ...`; without it, `import srupp.hf` first.",
    ]
    lines += _training_lines(training or {})
    return "\n".join(lines) + "\n"


def _training_lines(training: dict[str, Any]) -> list[str]:
    config, trainer, metrics = training.get("config"), training.get("trainer") or {}, training.get("metrics") or {}
    if not config:
        return ["", "## Training", "", "Not recorded: this folder was exported from a model, not a checkpoint."]
    tokens = config["batch_size"] * config["unroll_size"] * config.get("grad_accum", 1)
    lines = [
        "",
        "## Training",
        "",
        f"Trained with `srupp train` on `{config['data']}`"
        + (f" ({config['description']})" if config.get("description") else "")
        + ":",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for name in (
        "max_steps",
        "batch_size",
        "unroll_size",
        "lr",
        "optimizer",
        "weight_decay",
        "warmup_steps",
        "precision",
        "time_limit_s",
        "seed",
    ):
        lines.append(f"| {name} | {config.get(name)} |")
    lines.append(f"| tokens per update | {tokens:,} |")
    lines += ["", "| result | value |", "| --- | --- |"]
    if "step" in trainer:
        lines.append(f"| updates done (this checkpoint) | {trainer['step']} |")
    if trainer.get("valid_loss") is not None:
        lines.append(f"| valid loss (nats per token) | {trainer['valid_loss']:.4f} |")
    for name, value in metrics.items():
        lines.append(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")
    return lines


def _run_metrics(checkpoint: Path) -> dict[str, Any]:
    """The last validation record of the run a checkpoint file sits in (``<run>/metrics.jsonl``), if any."""
    path = checkpoint.resolve().parent.parent / "metrics.jsonl"
    last: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line) if line.strip() else {}
                if isinstance(record, dict) and any(key.startswith("valid_") for key in record):
                    last = record
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in last.items() if key.startswith("valid_") or key == "step"}


_RUN_OR_CORPUS = ("checkpoints", "metrics.jsonl", "meta.json", ".srupp.lock", "train.bin")


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier export: a ``config.json`` of model type srupp, files only (a run
    folder, a corpus or a folder of runs has subfolders or their files)."""
    try:
        entries = list(os.scandir(folder))
        config_file = folder / "config.json"
        if config_file.is_symlink() or config_file.stat().st_size > 1 << 20:
            return False
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if any(e.is_dir(follow_symlinks=False) or e.is_symlink() or e.name in _RUN_OR_CORPUS for e in entries):
        return False
    return isinstance(config, dict) and config.get("model_type") == SRUppConfig.model_type


def check_export_target(out: Path, overwrite: bool) -> None:
    """Raise FileExistsError unless ``out`` is new, an empty folder, or (with ``overwrite``) an earlier export.

    An export writes only into a folder it creates or one that holds an earlier export, which it moves aside
    into ``<out>.replaced/<UTC time>/``; any other folder is never replaced, with or without ``overwrite``."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"`out_dir` {out} exists and is not a folder; choose a new folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not _is_export(out):
        raise FileExistsError(
            f"`out_dir` {out} holds files that are not an srupp export, which an export never replaces (even with "
            f"overwrite); choose a new folder"
        )
    if not overwrite:
        raise FileExistsError(
            f"`out_dir` {out} holds an earlier export; pass overwrite=True (--overwrite) to move it aside"
        )


def _install(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete ``staging`` folder to ``out``, moving an earlier export there aside first."""
    check_export_target(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        moved = move_aside([out], Path(f"{out}.replaced"))
        print(f"srupp export: moved the previous export in {out} to {moved / out.name}", file=sys.stderr)
    elif out.is_dir():
        out.rmdir()
    os.replace(staging, out)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a training checkpoint (``srupp train``) into a folder that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load (with ``trust_remote_code=True``, or after ``import srupp.hf``).

    Args:
        checkpoint: a ``.safetensors`` checkpoint, or a run folder (its ``checkpoints/best.safetensors``, else
            ``last.safetensors``).
        out_dir: the folder to create (see :func:`export_model`).
        tokenizer: the tokenizer to save; default the checkpoint vocabulary's (:func:`tokenizer_for_vocab`).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Example:
        >>> export_checkpoint("runs/demo", "demo-hf")
        >>> AutoModelForCausalLM.from_pretrained("demo-hf", trust_remote_code=True)
    """
    from srupp.train.checkpoint import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    refuse_inside(out_dir, checkpoint)
    check_export_target(Path(out_dir), overwrite)  # before the model is loaded
    model, cfg, vocab, ckpt = load_model(checkpoint)
    training = {"config": cfg.to_dict(), "trainer": ckpt.trainer, "metrics": _run_metrics(checkpoint)}
    return export_model(model, out_dir, tokenizer=tokenizer, vocab=vocab, training=training, overwrite=overwrite)


def load_export(folder: str | os.PathLike, device: torch.device | str = "cpu", *, backend: str = "auto"):
    """The srupp model of an export folder, for ``srupp eval`` and ``srupp generate``.

    Returns:
        ``(SRUppLM in eval mode on device, TrainConfig or None, Vocab)``; the config is None for a folder
        exported from a bare model.

    Raises:
        CheckpointError: the folder has no (or a damaged) ``srupp.json`` vocabulary.
    """
    from srupp.data import Vocab
    from srupp.train.config import TrainConfig

    folder = Path(folder)
    record_path = folder / SRUPP_FILE
    if not record_path.is_file():
        raise CheckpointError(f"{folder} has no {SRUPP_FILE} (its srupp vocabulary): export it with `srupp export hf`")
    if record_path.stat().st_size > _MAX_SRUPP_FILE:
        raise CheckpointError(f"{record_path} is larger than {_MAX_SRUPP_FILE >> 20} MiB: not an srupp export")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        vocab = Vocab.from_dict(record["vocab"])
        cfg = TrainConfig.from_dict(record["config"]) if record.get("config") else None
    except (UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{record_path} is damaged or has no vocabulary: {err}") from err
    model = SRUppForCausalLM.from_pretrained(folder).model
    if vocab.size != model.config.vocab_size:
        raise CheckpointError(f"{folder}: a vocabulary of {vocab.size} tokens for a model of {model.config.vocab_size}")
    model.set_backend(backend)
    return model.to(device).eval(), cfg, vocab
