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
    save_checkpoint(
        path,
        tensors,
        config=TrainConfig(model=LMConfig(**config)).to_dict(),
        vocab=vocab.to_dict(),
        trainer={"step": 0},
    )
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
    lm = write_checkpoint(
        tmp_path / "run/checkpoints/best.safetensors", "every-second-layer-two-heads-layer-norm", Vocab("byte")
    )
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


# A process that never imports srupp.hf itself: the export's auto_map module does, under trust_remote_code.
REMOTE_CODE_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
try:
    AutoModelForCausalLM.from_pretrained(folder)
    refused = ""
except (ValueError, OSError) as err:
    refused = str(err)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
batch = tokenizer(["hello world", "hé"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
result = {"refused": refused, "ids": batch.input_ids.tolist(), "logits": logits.tolist(),
          "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id}
open(sys.argv[2], "w").write(json.dumps(result))
"""


def test_bpe_export_loads_with_trust_remote_code_in_a_fresh_process_and_pads(tmp_path):
    from srupp.data.corpus import PAD
    from srupp.data.tokenizer import EOD

    vocab = Vocab("bpe", tokenizer=train_bpe("héllo wörld, hello world. " * 30, 290, special_tokens=(EOD, PAD)))
    lm = write_checkpoint(tmp_path / "run/checkpoints/best.safetensors", "bytes", vocab)
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == vocab.pad_id and config["eos_token_id"] == vocab.eod_id
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_srupp.SRUppForCausalLM"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_PROCESS, str(out), str(tmp_path / "result.json")],
        env=env,
        timeout=180,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert "trust_remote_code=True" in result["refused"]
    assert (result["pad"], result["eos"]) == (vocab.pad_id, vocab.eod_id)
    short = vocab.encode("hé")
    assert result["ids"][1] == [vocab.pad_id] * (len(result["ids"][0]) - len(short)) + short  # left padding
    # The padded row gives, at its real positions, what the prompt gives alone (the in-process model).
    with torch.no_grad():
        alone = SRUppForCausalLM.from_lm(lm).eval()(torch.tensor([short])).logits
    torch.testing.assert_close(torch.tensor(result["logits"])[1, -len(short) :], alone[0], rtol=1e-5, atol=1e-5)


def test_export_has_a_model_card_from_the_run(tmp_path):
    write_checkpoint(tmp_path / "run/checkpoints/best.safetensors", "bytes", Vocab("byte"))
    (tmp_path / "run/metrics.jsonl").write_text('{"step": 7, "train_bpc": 3.5}\n{"step": 8, "valid_bpc": 2.25}\n')
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained(" in card and "AutoTokenizer.from_pretrained(" in card
    assert "trust_remote_code=True" in card and "srupp[hf]" in card
    assert "byte-level SRU++" in card and "| max_steps | 1000 |" in card and "| valid_bpc | 2.2500 |" in card
    assert "Not recorded" in (export_model(make_lm(**LM_CONFIGS["bytes"]), tmp_path / "bare") / "README.md").read_text()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_export_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = export_model(make_lm(**LM_CONFIGS["bytes"]), tmp_path / "exported", vocab=Vocab("byte"))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
