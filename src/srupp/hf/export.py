"""Turn srupp models and training checkpoints into folders that ``from_pretrained`` loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

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
        out_dir: the folder to create; it must not exist or be empty unless ``overwrite``.
        tokenizer: saved with the model (e.g. :func:`srupp.hf.byte_tokenizer`); its pad token becomes the
            generation default.
        overwrite: replace an existing ``out_dir`` (removed only once the new folder is complete).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"`out_dir` {out} already exists and is not empty; pass overwrite=True to replace it")
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
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        old = None
        if out.exists():
            old = out.parent / f"{staging.name}.old"
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None and old.is_dir():
            shutil.rmtree(old)
        elif old is not None:
            old.unlink()
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


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

    model, _, vocab, _ = load_model(resolve_checkpoint(checkpoint))
    tokenizer = tokenizer_for_vocab(vocab) if tokenizer is None else tokenizer
    return export_model(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
