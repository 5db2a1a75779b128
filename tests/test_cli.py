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
