import subprocess
import sys

import pytest

from srupp.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "a.txt").write_text("".join(f"print({i} * {i})  # square\n" for i in range(800)))
    assert main(["data", "prepare", "text", "--source", str(root / "a.txt"), "--out", str(root / "data")]) == 0
    return root / "data"


def test_train_resume_eval_generate(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(corpus), "--out_dir", str(run), "--progress", "false"]
    assert main(["train", "--config", "tiny", *common, "--max_steps", "3", "--eval_every", "3"]) == 0
    assert main(["train", "--resume", str(run), "--max_steps", "4", "--progress", "false"]) == 0
    ckpt = str(run / "checkpoints" / "last.safetensors")
    assert main(["eval", "--checkpoint", ckpt, "--split", "test", "--context", "32", "--max-tokens", "500"]) == 0
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "print(", "--max-new-tokens", "8"]) == 0
    assert main(["train", "--resume", str(run), "--hidden_size", "48", "--max_steps", "5"]) == 2
    out = capsys.readouterr()
    assert "different architecture" in out.err
    assert "done: step 3" in out.out and "done: step 4" in out.out
    assert "test: bpc" in out.out and "context 32" in out.out
    assert "tokens/s" in out.err and "print(" in out.out


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["train", "--config", "tiny", "--hiden_size", "3"], "unknown config key 'hiden_size'", id="key"),
        pytest.param(["train", "--config", "nope"], "no config file or preset", id="preset"),
        pytest.param(["eval", "--checkpoint", "/nonexistent.safetensors"], "no checkpoint", id="checkpoint"),
        pytest.param(
            ["data", "prepare", "text", "--source", "/nonexistent", "--out", "x"], "does not exist", id="data"
        ),
    ],
)
def test_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "srupp", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "generate", "data", "demo"):
        assert command in out.stdout


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    argv = ["train", "--config", "tiny", "--data", str(corpus), "--out_dir", str(run), "--progress", "false"]
    assert main([*argv, "--max_steps", "2", "--eval_every", "2"]) == 0
    return run


def _reference_log_probs(run, ids):
    import torch

    from srupp.train import load_model, resolve_checkpoint

    model, _, _, _ = load_model(resolve_checkpoint(run))
    with torch.no_grad():
        log_probs, _ = model(torch.as_tensor(ids).t())  # time-major [T, B]
    return log_probs


def test_export_hf_loads_with_auto_classes(trained_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import srupp.hf  # noqa: F401  (registers the Auto classes)

    out = tmp_path / "hf"
    assert main(["export", "hf", str(trained_run), str(out)]) == 0
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["print(3 * 3)"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = _reference_log_probs(trained_run, ids).transpose(0, 1)
    torch.testing.assert_close(torch.log_softmax(logits, -1), expected, rtol=1e-5, atol=1e-5)
    assert main(["export", "hf", str(trained_run), str(out)]) == 2  # an existing folder is never replaced unasked
    assert "overwrite" in capsys.readouterr().err


def test_export_onnx_runs_in_onnxruntime(trained_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np

    out = tmp_path / "model.onnx"
    out.write_bytes(b"\x08 an earlier export")
    assert main(["export", "onnx", str(trained_run), str(out)]) == 2
    assert out.read_bytes() == b"\x08 an earlier export" and "--overwrite" in capsys.readouterr().err
    assert main(["export", "onnx", str(trained_run), str(out), "--overwrite"]) == 0
    session = ort.InferenceSession(str(out))
    for steps, batch in ((9, 2), (4, 3)):
        ids = np.random.default_rng(steps).integers(0, 256, size=(batch, steps))
        (got,) = session.run(None, {session.get_inputs()[0].name: ids.T.astype(np.int64)})
        expected = _reference_log_probs(trained_run, ids).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


BASE_ARGV = {
    "train": [],
    "eval": ["run"],
    "generate": ["run"],
    "demo": [],
    "data prepare": ["text", "--out", "x"],
    "export": ["hf", "run", "out"],
}


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = list(_subparsers(sub))
                yield from ((f"{name} {inner}", p) for inner, p in nested) if nested else [(name, sub)]


def test_every_option_has_both_spellings():
    from srupp.cli import build_parser, normalize_argv

    parser, checked = build_parser(), 0
    for command, sub in _subparsers(parser):
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--") and "-" in o[2:]]
            if not long or action.nargs == 0 and action.const is None:
                continue
            value = [] if action.nargs == 0 else [str(action.default if action.default is not None else 1)]
            dashed = [*command.split(), *BASE_ARGV[command], long[0], *value]
            underscored = [
                *command.split(),
                *BASE_ARGV[command],
                long[0].replace("-", "_").replace("__", "--", 1),
                *value,
            ]
            assert parser.parse_known_args(normalize_argv(underscored)) == parser.parse_known_args(dashed), dashed
            checked += 1
    assert checked >= 10
    # Config fields (overrides) take both spellings too.
    assert main(["train", "--config", "tiny", "--max-steps", "x"]) == 2


def test_train_help_lists_every_config_field_and_preset(capsys):
    import dataclasses

    from srupp.models import LMConfig
    from srupp.train import TrainConfig
    from srupp.train.config import presets_dir

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for cls in (TrainConfig, LMConfig):
        for item in dataclasses.fields(cls):
            if item.name not in ("model", "paper", "description"):
                assert f"--{item.name} " in text, item.name
    assert "--lr FLOAT  (default 0.0003)" in text and "--time_limit_s FLOAT|none  (default none)" in text
    assert "--cutoffs LIST[INT]|none  (default none)" in text and "--progress true|false  (default true)" in text
    for preset in presets_dir().glob("*.json"):
        assert f"  {preset.stem}: " in text


def _greedy_reference(run, prompt: bytes, count: int) -> str:
    """Greedy decoding by full causal forward passes (not the cached path the CLI uses)."""
    import torch

    from srupp.train import load_model, resolve_checkpoint

    model, _, vocab, _ = load_model(resolve_checkpoint(run))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            log_probs, _ = model(torch.tensor(ids)[:, None])
            ids.append(int(log_probs[-1, 0].argmax()))
    return vocab.decode(ids[len(prompt) :])


def test_eval_and_generate_read_a_run_folder_a_checkpoint_and_an_hf_export(trained_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["export", "hf", str(trained_run), str(tmp_path / "hf")]) == 0
    checkpoint = trained_run / "checkpoints" / "best.safetensors"
    models = [[str(trained_run)], ["--checkpoint", str(checkpoint)], [str(tmp_path / "hf")]]
    capsys.readouterr()
    scores, samples = [], []
    for model in models:
        assert main(["eval", *model, "--split", "valid", "--max_tokens", "300", "--context", "16"]) == 0
        scores.append(capsys.readouterr().out.split("(")[0])
        argv = ["generate", *model, "--prompt", "print(", "--max_new_tokens", "12", "--temperature", "0"]
        assert main([*argv, "--seed", str(len(samples))]) == 0  # the seed does not matter when greedy
        samples.append(capsys.readouterr().out)
    assert scores[0].startswith("valid: bpc") and scores.count(scores[0]) == 3, scores
    assert samples.count(samples[0]) == 3, samples
    assert samples[0] == "print(" + _greedy_reference(trained_run, b"print(", 12)
    assert main(["eval", str(trained_run), "--checkpoint", str(checkpoint)]) == 2
    assert "not both" in capsys.readouterr().err


BAD_PREPARE = {
    "bpe-not-a-number": (["--tokenizer", "bpe:abc"], "integer VOCAB"),
    "bpe-too-small": (["--tokenizer", "bpe:100"], "integer VOCAB"),
    "missing-file": (["--tokenizer", "missing/tokenizer.json"], "existing tokenizer.json"),
    "not-json": (["--tokenizer", "{bad}"], "is not a tokenizer.json file"),
    "empty-split": ([], "the valid split of"),
}


@pytest.mark.parametrize(("extra", "message"), BAD_PREPARE.values(), ids=BAD_PREPARE.keys())
def test_prepare_refuses_bad_input_in_one_line(tmp_path, capsys, extra, message):
    pytest.importorskip("tokenizers")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a.txt", "c.txt"):  # both go to the training split by their names' hashes
        (source / name).write_text("some text\n" * 20)
    (tmp_path / "bad.json").write_text("not json")
    extra = [str(tmp_path / "bad.json") if item == "{bad}" else item for item in extra]
    argv = ["data", "prepare", "text", "--source", str(source), "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tiny_learns_in_200_steps(corpus, tmp_path, capsys):
    options = ["--progress", "false", "--max_steps", "200", "--eval_every", "200", "--eval_tokens", "2048"]
    argv = ["train", "--config", "tiny", "--data", str(corpus), "--out_dir", str(tmp_path / "run"), *options]
    assert main(argv) == 0
    bpc = float(capsys.readouterr().out.split("done: step 200, valid bpc ")[1].split(",")[0])
    assert bpc < 5.0  # a uniform guess is 8 bits per byte
