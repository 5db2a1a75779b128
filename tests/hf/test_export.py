import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from srupp.data import Vocab  # noqa: E402
from srupp.data.tokenizer import train_bpe  # noqa: E402
from srupp.errors import CheckpointError
from srupp.hf import SRUppForCausalLM, export_checkpoint, export_model  # noqa: E402
from srupp.models import LMConfig  # noqa: E402
from srupp.train.checkpoint import save_checkpoint  # noqa: E402
from srupp.train.config import TrainConfig  # noqa: E402
from tests.hf.conftest import LM_CONFIGS, make_lm  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"

# Loads the exported folder with the Auto classes only, in a process that never saw the original model.
FRESH_PROCESS = """
import json, pathlib, sys, torch
import srupp.hf
from transformers import AutoModelForCausalLM, AutoTokenizer
results = {}
for folder, ids in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        results[folder] = {"logits": model(torch.tensor(ids)).logits, "type": type(model).__name__}
    if (pathlib.Path(folder) / "tokenizer.json").is_file():
        results[folder]["ids"] = AutoTokenizer.from_pretrained(folder)("héllo").input_ids
torch.save(results, sys.argv[2])
"""


def write_checkpoint(path: Path, name: str, vocab: Vocab) -> torch.nn.Module:
    config = {**LM_CONFIGS[name], "vocab_size": vocab.size}
    lm = make_lm(seed=5, **config)
    tensors = {f"model/{key}": value for key, value in lm.state_dict().items()}
    save_checkpoint(path, tensors, config=TrainConfig(model=LMConfig(**config)).to_dict(), vocab=vocab.to_dict(),
                    trainer={"step": 0})  # fmt: skip
    return lm


def run_fresh(inputs: dict[Path, torch.Tensor], tmp_path: Path) -> dict:
    out = tmp_path / "fresh.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    arguments = json.dumps({str(folder): ids.tolist() for folder, ids in inputs.items()})
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, arguments, str(out)], check=True, env=env, timeout=180)
    return {Path(folder): result for folder, result in torch.load(out).items()}


def in_process_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return SRUppForCausalLM.from_lm(lm).eval()(ids).logits


def test_export_round_trip_in_a_fresh_process(assert_close, tmp_path):
    # Training checkpoints of a byte and a BPE vocabulary (each with its tokenizer), and an adaptive-softmax model.
    lm = write_checkpoint(tmp_path / "run/checkpoints/best.safetensors", "every-second-layer-two-heads-layer-norm",
                          Vocab("byte"))  # fmt: skip
    from_checkpoint = export_checkpoint(tmp_path / "run", tmp_path / "from-checkpoint")
    names = {p.name for p in from_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    bpe_vocab = Vocab("bpe", tokenizer=train_bpe("héllo wörld, hello world. " * 30, 280))
    bpe_lm = write_checkpoint(tmp_path / "bpe.safetensors", "bytes", bpe_vocab)
    from_bpe = export_checkpoint(tmp_path / "bpe.safetensors", tmp_path / "from-bpe")
    adaptive = make_lm(seed=6, **LM_CONFIGS["adaptive"])
    from_model = export_model(adaptive, tmp_path / "from-model")
    ids, bpe_ids, adaptive_ids = (torch.randint(0, n, (2, 7)) for n in (256, bpe_vocab.size, 300))

    results = run_fresh({from_checkpoint: ids, from_bpe: bpe_ids, from_model: adaptive_ids}, tmp_path)

    result = results[from_checkpoint]
    assert result["type"] == "SRUppForCausalLM"
    assert result["ids"] == list("héllo".encode())
    assert torch.equal(result["logits"], in_process_logits(lm, ids))
    with torch.no_grad():
        expected, _ = lm(ids.t())
    assert_close(result["logits"].log_softmax(-1), expected.transpose(0, 1))
    assert results[from_bpe]["ids"] == bpe_vocab.encode("héllo")
    assert torch.equal(results[from_bpe]["logits"], in_process_logits(bpe_lm, bpe_ids))
    assert torch.equal(results[from_model]["logits"], in_process_logits(adaptive, adaptive_ids))


def test_export_never_replaces_a_folder_unasked(tmp_path):
    lm = make_lm(**LM_CONFIGS["bytes"])
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # a folder that is not an earlier export is never replaced
        with pytest.raises(FileExistsError, match="not an srupp export"):
            export_model(lm, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    export_model(lm, out)  # an empty folder is filled
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(lm, out)
    export_model(lm, out, overwrite=True)  # an earlier export is moved aside, not deleted
    (moved,) = (tmp_path / "exported.replaced").iterdir()
    assert (moved / "exported" / "model.safetensors").read_bytes() == first and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "exported.replaced"]  # no staging folder
    with pytest.raises(CheckpointError, match="no checkpoints"):
        export_checkpoint(tmp_path, tmp_path / "other")
