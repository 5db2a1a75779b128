import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from srupp.models import LMConfig, SRUppLM
from srupp.train import TrainConfig, load_checkpoint, load_model, save_checkpoint
from srupp.train.checkpoint import read_checkpoint_config

VOCAB = {"kind": "byte", "words": []}


def _save(path, cfg: TrainConfig, step=1):
    model = SRUppLM(cfg.model)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    return save_checkpoint(path, tensors, config=cfg.to_dict(), vocab=VOCAB, trainer={"step": step}), model


def _cfg(**model):
    return TrainConfig(model=LMConfig(**{"hidden_size": 32, "proj_size": 8, "num_layers": 2, **model}))


def test_round_trip_rebuilds_from_its_own_config(tmp_path):
    path, model = _save(tmp_path / "a.safetensors", _cfg(num_layers=3))
    loaded, cfg, vocab, ckpt = load_model(path)
    assert cfg.model.num_layers == 3 and vocab.kind == "byte" and ckpt.trainer == {"step": 1}
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, damage):
    path, _ = _save(tmp_path / "a.safetensors", _cfg())
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted|is corrupted"):
        load_checkpoint(path)
    if damage == "flip":  # a tensor byte: the header still reads, so resume finds its config, then refuses
        assert read_checkpoint_config(path)["model"]["num_layers"] == 2
    else:
        with pytest.raises(ValueError, match="truncated or corrupted"):
            read_checkpoint_config(path)


def test_checkpoint_from_another_architecture(tmp_path):
    from srupp.train.checkpoint import load_weights

    path, _ = _save(tmp_path / "a.safetensors", _cfg(hidden_size=48))
    other = SRUppLM(_cfg().model)
    with pytest.raises(ValueError, match="different architecture.*shape mismatch"):
        load_weights(other, load_checkpoint(path).prefixed("model/"), path)


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from srupp.train import save_checkpoint
        path = sys.argv[1]
        big = {"model/w": torch.randn(4_000_000)}
        for step in range(1000):
            print(f"writing {step}", flush=True)
            save_checkpoint(path, big, config={}, vocab={}, trainer={"step": step})
        """
    )
    path = tmp_path / "last.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "writing 2":
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    ckpt = load_checkpoint(path)
    assert ckpt.trainer["step"] in (1, 2)
    assert ckpt.tensors["model/w"].numel() == 4_000_000


def test_carried_state_round_trips_through_tensors():
    from srupp.train.checkpoint import carry_from_tensors, carry_to_tensors
    from tests.models.test_lm import with_attention  # alpha != 0, so the carried memory matters

    model = with_attention(
        SRUppLM(LMConfig(hidden_size=16, proj_size=4, num_layers=3, attention_every_n_layers=2, dropout=0.0))
    ).eval()
    tokens = torch.randint(0, 256, (12, 2))
    _, state = model(tokens[:6])
    tensors = carry_to_tensors(state)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    restored = carry_from_tensors({k: v.clone() for k, v in tensors.items()}, torch.device("cpu"))
    expected, _ = model(tokens[6:], state)
    actual, _ = model(tokens[6:], restored)
    assert torch.equal(actual, expected)
    without_memory, _ = model(tokens[6:], carry_from_tensors({"c": tensors["c"]}, torch.device("cpu")))
    assert not torch.allclose(without_memory, expected)  # the test would notice a lost memory
    assert carry_to_tensors(None) == {} and carry_from_tensors({}, torch.device("cpu")) is None


def test_written_files_get_the_users_umask(tmp_path):
    """Checkpoints and the run's small files get 0666 narrowed by the umask, like any new file of the user
    (not mkstemp's 0600, and not a fixed 0644 that would open a private run to everyone)."""
    from srupp.train.rundir import write_text_atomic

    previous = os.umask(0o027)
    try:
        path, _ = _save(tmp_path / "c.safetensors", _cfg())
        write_text_atomic(tmp_path / "config.json", "{}")
    finally:
        os.umask(previous)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(tmp_path / "config.json").st_mode & 0o777) == oct(0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "config.json"]  # no temporary left
