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
