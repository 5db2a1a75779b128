"""Issue 11, item 2: only good checkpoints, and a sha256 over everything in the file."""

import contextlib
import math
import resource

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srupp.cli import main
from srupp.errors import CheckpointError, DivergenceError
from srupp.models import LMConfig, SRUppLM
from srupp.train import TrainConfig, load_checkpoint, load_model, save_checkpoint, train
from srupp.train import loop as loop_module
from srupp.train.checkpoint import read_checkpoint_config

from .conftest import snapshot


def test_nan_valid_loss_keeps_the_last_good_checkpoint(train_args, tmp_path, monkeypatch, capsys):
    assert main(train_args()) == 0
    before = snapshot(tmp_path / "run" / "checkpoints")
    monkeypatch.setattr(loop_module, "evaluate", lambda *args, **kwargs: math.nan)
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "4", "--progress", "false"]) == 3
    err = capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert "step 4: the valid loss is nan" in err and f"The last good checkpoint is {last} (step 2)" in err
    assert snapshot(tmp_path / "run" / "checkpoints") == before


def test_non_finite_parameters_are_never_saved(tiny_cfg_faults, tmp_path, monkeypatch):
    cfg = tiny_cfg_faults(max_steps=6, eval_every=2)
    real_step = torch.optim.RAdam.step
    calls = {"n": 0}

    def step_then_poison(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # a weight blows up while the loss of this step was still finite
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.RAdam, "step", step_then_poison)
    with pytest.raises(DivergenceError, match=r"step 4: the (parameter \S+|loss) is .*last good checkpoint.*step 2"):
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert ckpt.trainer["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt.prefixed("model/").values())


@pytest.fixture
def tiny_cfg_faults(corpus, tmp_path):
    from srupp.train import apply_overrides, load_preset

    def make(**overrides):
        values = {"data": str(corpus), "out_dir": str(tmp_path / "run"), "progress": "false"}
        values.update({k: str(v) for k, v in overrides.items()})
        return apply_overrides(load_preset("tiny"), values)

    return make


def _small_checkpoint(path):
    cfg = TrainConfig(model=LMConfig(hidden_size=16, proj_size=4, num_layers=2))
    model = SRUppLM(cfg.model)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(
        path, tensors, config=cfg.to_dict(), vocab={"kind": "byte", "words": []}, trainer={"step": 12, "lr": 0.00042}
    )
    return model


@pytest.mark.parametrize(
    "edit", [(b'step\\": 12', b'step\\": 92'), (b'lr\\": 0.00042', b'lr\\": 0.00047')], ids=["step", "lr"]
)
def test_a_flipped_digit_in_the_metadata_is_detected(tmp_path, edit):
    path = tmp_path / "a.safetensors"
    _small_checkpoint(path)
    data = path.read_bytes()
    assert data.count(edit[0]) == 1
    path.write_bytes(data.replace(*edit))
    with pytest.raises(CheckpointError, match="do not match the stored sha256"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    model = _small_checkpoint(path)
    return path.read_bytes(), model.state_dict()


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_fuzzed_checkpoints_load_correctly_or_fail_clearly(pristine, tmp_path, flips, cut):
    data, weights = pristine
    damaged = bytearray(data)
    for position, mask in flips:
        damaged[position % len(damaged)] ^= mask
    if cut is not None:
        damaged = damaged[: cut % len(damaged)]
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(damaged))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with contextlib.suppress(CheckpointError):  # the header alone (what `train --resume` reads first)
        assert isinstance(read_checkpoint_config(path), dict)
    try:
        model, _, _, _ = load_model(path)
    except CheckpointError:
        pass
    else:  # only an undamaged file (every flip was a no-op) may load, and then exactly
        assert bytes(damaged) == data
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kb < 200_000, f"loading a {len(damaged)}-byte file raised peak memory by {grown_kb} KB"


def test_a_header_that_claims_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    _small_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[:8] = (1 << 62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header claims"):
        load_checkpoint(path)
