"""Issue 24, items 3, 6 and 7: sizes are bounded before anything is built, config types are strict, a resume
applies changed optimizer hyper-parameters, absurd thread counts are one line."""

import json
import resource
import time

import pytest

from srupp.cli import main
from srupp.errors import CheckpointError, ConfigError
from srupp.models import LMConfig, SRUppLM
from srupp.train import TrainConfig, load_checkpoint, load_model, save_checkpoint

SMALL = LMConfig(hidden_size=16, proj_size=4, num_layers=2)
BYTES = {"kind": "byte", "words": []}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_checkpoint_claiming_ten_million_layers_is_refused_quickly(tmp_path, capsys):
    tensors = {f"model/{k}": v for k, v in SRUppLM(SMALL).state_dict().items()}
    config = TrainConfig(model=SMALL).to_dict()
    config["model"]["num_layers"] = 10**7
    path = save_checkpoint(tmp_path / "x.safetensors", tensors, config=config, vocab=BYTES, trainer={})  # valid digest
    start, peak = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="`num_layers` must be <= 1,024, got 10000000"):
        load_model(path)
    assert main(["eval", "--checkpoint", str(path)]) == 2 and "num_layers" in _one_line(capsys)
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KB


def test_an_hf_config_claiming_ten_million_layers_is_refused_before_building(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from srupp.hf import export_model

    folder = export_model(SRUppLM(SMALL), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 10**7}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="`num_layers` must be <= 1,024"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "model, message",
    [
        pytest.param({"num_layers": 10**7}, "`num_layers` must be <= 1,024, got 10000000", id="layers-1e7"),
        pytest.param({"hidden_size": 1 << 30}, "`hidden_size` must be <= 65,536", id="width-2^30"),
        pytest.param({"layer_norm": "false"}, "`layer_norm` must be true or false, got 'false'", id="bool-string"),
        pytest.param({"num_layers": 2.5}, "`num_layers` must be an int, got 2.5", id="fractional-int"),
        pytest.param({"hidden_size": "64"}, "`hidden_size` must be an int, got '64'", id="string-int"),
        pytest.param({"highway_bias": float("nan")}, "`highway_bias` must be a finite number, got nan", id="nan-bias"),
        pytest.param({"highway_bias": float("inf")}, "`highway_bias` must be a finite number, got inf", id="inf-bias"),
        pytest.param({"dropout": float("nan")}, "`dropout` must be a finite number, got nan", id="nan-dropout"),
        pytest.param({"attention_layers": [0.5]}, "`attention_layers` must be an int", id="fractional-index"),
        pytest.param({"cutoffs": "[10]"}, "`cutoffs` must be a list", id="string-list"),
    ],
)
def test_bad_model_fields_in_a_config_file_are_one_line(train_args, tmp_path, capsys, model, message):
    config = TrainConfig(model=SMALL).to_dict()
    config["model"].update(model)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))  # json writes NaN and Infinity, as a hand-edited file may hold them
    assert main(["train", "--config", str(path), "--out_dir", str(tmp_path / "run")]) == 2
    assert message in _one_line(capsys)


@pytest.mark.parametrize(
    "field, value, message",
    [
        pytest.param("progress", "false", "`progress` must be true or false, got 'false'", id="bool-string"),
        pytest.param("max_steps", 2.5, "`max_steps` must be an int, got 2.5", id="fractional"),
        pytest.param("lr", "0.1", "`lr` must be a finite number, got '0.1'", id="string-float"),
        pytest.param("data", 5, "`data` must be a string, got 5", id="int-path"),
        pytest.param("num_threads", 100000, "`num_threads` must be <= ", id="threads"),
    ],
)
def test_bad_train_fields_are_one_line(tmp_path, capsys, field, value, message):
    config = TrainConfig(model=SMALL, out_dir=str(tmp_path / "run")).to_dict()
    config[field] = value
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path)]) == 2
    assert message in _one_line(capsys)


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["train", "--config", str(path)]) == 2
    assert "invalid JSON" in _one_line(capsys)
    assert main(["train", "--config", "tiny", "--betas", "[" * 100_000]) == 2
    assert "--betas" in _one_line(capsys)


@pytest.mark.parametrize("argv", [["--threads", "100000"], ["--threads", "0"]], ids=["100000", "0"])
def test_absurd_generate_threads_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--checkpoint", "x.safetensors", *argv])
    assert exit_info.value.code == 2 and "argument --threads" in capsys.readouterr().err


def test_train_num_threads_beyond_the_cpu_count_is_one_line(train_args, capsys):
    assert main(train_args("--num_threads", "100000")) == 2
    assert "`num_threads` must be <= " in _one_line(capsys)


def _resave(path, **trainer_changes):
    ckpt = load_checkpoint(path)
    save_checkpoint(
        path, ckpt.tensors, config=ckpt.config, vocab=ckpt.vocab, trainer={**ckpt.trainer, **trainer_changes}
    )


def test_a_crafted_rank_file_template_is_never_formatted(train_args, tmp_path):
    assert main(train_args()) == 0
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    _resave(last, rank_file="{rank:>2000000000}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "3", "--progress", "false"]) == 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # KB; the template took 6 GB
    _resave(last, rank_file="{rank.__class__.__mro__}")
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "4", "--progress", "false"]) == 0
    assert load_checkpoint(last).trainer["step"] == 4


@pytest.mark.parametrize("step", ["3", 2.5, True, -1, None], ids=["string", "fraction", "bool", "negative", "none"])
def test_a_crafted_step_is_one_line(train_args, tmp_path, capsys, step):
    assert main(train_args()) == 0
    _resave(tmp_path / "run" / "checkpoints" / "last.safetensors", step=step)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "4", "--progress", "false"]) == 2
    assert "incomplete trainer state" in _one_line(capsys)


def test_resume_applies_new_optimizer_hyperparameters(train_args, tmp_path, capsys):
    assert main(train_args()) == 0
    run = tmp_path / "run"
    resume = ["train", "--resume", str(run), "--max_steps", "3", "--progress", "false"]
    assert main([*resume, "--weight_decay", "0.5", "--betas", "[0.8, 0.9]"]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    (group,) = ckpt.trainer["optimizer"]["param_groups"]
    assert (group["weight_decay"], group["betas"]) == (0.5, [0.8, 0.9])  # the optimizer used what the config says
    assert (ckpt.config["weight_decay"], ckpt.config["betas"]) == (0.5, [0.8, 0.9])
    capsys.readouterr()
    assert main([*resume, "--max_steps", "4", "--optimizer", "adamw"]) == 2
    assert "`optimizer` cannot change when resuming" in _one_line(capsys)


def test_bad_metrics_lines_do_not_stop_a_resume(train_args, tmp_path):
    assert main(train_args()) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    kept = metrics.read_text()
    metrics.write_text(kept + '[1, 2]\n{"step": "x"}\n"text"\n{"step": 1.5}\n{"no step": 1}\nnot json\n')
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "3", "--progress", "false"]) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert metrics.read_text().startswith(kept) and {r["step"] for r in records} == {1, 2, 3}


def test_a_config_error_is_a_value_error_for_python_callers():
    with pytest.raises(ValueError, match="highway_bias"):
        LMConfig(highway_bias=float("nan"))
    with pytest.raises(TypeError, match="layer_norm"):
        LMConfig(layer_norm="false")
    assert issubclass(ConfigError, ValueError)
