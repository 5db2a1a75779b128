"""Turn srupp models and training checkpoints into folders that ``from_pretrained`` loads."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError
from transformers import GenerationConfig, PreTrainedTokenizerBase

from srupp.files import make_temp_dir_beside, move_aside, refuse_inside, remove_orphans
from srupp.hf.configuration import SRUppConfig
from srupp.hf.modeling import SRUppForCausalLM
from srupp.hf.tokenization import tokenizer_for_vocab
from srupp.models import SRUppLM


def export_model(
    model: SRUppLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face folder: ``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files.

    The folder is written beside ``out_dir`` under a temporary name and renamed into place, so ``out_dir`` is
    never left half-written.

    Args:
        model: the language model (its weights are copied; runtime choices such as the backend are not saved).
        out_dir: the folder to create; it must not exist, be empty, or (with ``overwrite``) hold an earlier
            export (see :func:`check_export_target`).
        tokenizer: saved with the model (e.g. :func:`srupp.hf.byte_tokenizer`); its pad token becomes the
            generation default.
        overwrite: move an earlier export in ``out_dir`` aside into ``<out_dir>.replaced/<UTC time>/`` once the
            new folder is complete (nothing is deleted).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    check_export_target(out, overwrite)
    if not isinstance(model, SRUppLM):
        raise TypeError(f"`model` must be an SRUppLM, got {type(model).__name__}")
    # Built on the CPU and filled from the model's state_dict, so the model itself stays where it is.
    hf_model = SRUppForCausalLM(SRUppConfig.from_lm_config(model.config)).to(dtype=next(model.parameters()).dtype)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.eval()
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    hf_model.generation_config = GenerationConfig(pad_token_id=hf_model.config.pad_token_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent)
    staging = make_temp_dir_beside(out)
    try:
        try:
            hf_model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        except OSError as err:  # a full disk: name the user's folder, not the staging one
            raise type(err)(err.errno, err.strerror or str(err), str(out)) from err
        except SafetensorError as err:  # safetensors reports I/O failures as its own error
            raise OSError(f"cannot write {out}: {err}") from err
        _install(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


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
    ``AutoTokenizer`` load after ``import srupp.hf``.

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
        >>> AutoModelForCausalLM.from_pretrained("demo-hf")
    """
    from srupp.train.checkpoint import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    refuse_inside(out_dir, checkpoint)
    check_export_target(Path(out_dir), overwrite)  # before the model is loaded
    model, _, vocab, _ = load_model(checkpoint)
    tokenizer = tokenizer_for_vocab(vocab) if tokenizer is None else tokenizer
    return export_model(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
