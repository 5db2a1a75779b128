"""Issue 11, item 5: user errors are one line with a non-zero code; bugs keep their traceback."""

import pytest

from srupp.cli import main
from srupp.models import SRUppLM

from .conftest import snapshot


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--lr", "inf"], "`lr` must be a finite number, got inf", id="lr-inf"),
        pytest.param(["--clip_grad", "nan"], "`clip_grad` must be a finite number, got nan", id="clip-nan"),
        pytest.param(["--time_limit_s", "nan"], "`time_limit_s` must be a finite number, got nan", id="time-nan"),
        pytest.param(["--lr", "-1"], "`lr` must be > 0.0, got -1.0", id="lr-negative"),
        pytest.param(["--betas", "[0.9, 1.5]"], "`betas` must be < 1.0, got 1.5", id="betas"),
        pytest.param(["--vocab_size", "10"], "`vocab_size` must equal the vocabulary size", id="vocab-10-bytes"),
    ],
)
def test_bad_training_options_are_one_line(train_args, tmp_path, capsys, extra, message):
    assert main(train_args(*extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_cpu_isa_variable_is_one_line(train_args, tmp_path, capsys, monkeypatch):
    from srupp.ops import library

    monkeypatch.setenv("SRUPP_CPU_ISA", "sse9")
    library.reset()
    try:
        assert main(train_args("--backend", "cpu")) == 2
    finally:
        monkeypatch.delenv("SRUPP_CPU_ISA")
        library.reset()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`SRUPP_CPU_ISA` must be one of" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unknown_backend_name_exits_with_usage(train_args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(train_args("--backend", "warp"))
    assert exit_info.value.code == 2 and "invalid choice: 'warp'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--context", "0"], "argument --context: must be a finite int >= 1, got '0'", id="context-0"),
        pytest.param(["--max-tokens", "-3"], "argument --max-tokens: must be a finite int >= 1, got '-3'", id="max-3"),
        pytest.param(["--batch-size", "0"], "argument --batch-size: must be a finite int >= 1", id="batch-0"),
    ],
)
def test_bad_eval_options_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", "x.safetensors", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--temperature", "nan"], "argument --temperature: must be a finite float >= 0.0", id="temp-nan"),
        pytest.param(["--top-p", "1.5"], "argument --top-p: must be a finite float > 0.0 and <= 1.0", id="top-p"),
        pytest.param(["--max-new-tokens", "-1"], "argument --max-new-tokens: must be a finite int >= 0", id="new"),
    ],
)
def test_bad_generate_options_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--checkpoint", "x.safetensors", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def finished_run(train_args, tmp_path):
    assert main(train_args()) == 0
    return tmp_path / "run"


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--unroll_size", "8"], "`unroll_size` cannot change when resuming", id="unroll"),
        pytest.param(["--data", "stdlib"], "`data` cannot change when resuming", id="data"),
    ],
)
def test_resume_that_changes_the_data_stream_is_refused(finished_run, capsys, extra, message):
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--max_steps", "4", "--progress", "false", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert snapshot(finished_run) == before


def test_a_no_op_resume_does_not_rewrite_the_checkpoint(finished_run):
    checkpoints = finished_run / "checkpoints"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in checkpoints.iterdir()}
    assert main(["train", "--resume", str(finished_run), "--max_steps", "2", "--progress", "false"]) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in checkpoints.iterdir()} == before


def test_a_bad_json_config_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"lr": 0.001,,}')
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and "invalid JSON" in err[0]


def test_an_unavailable_backend_is_one_line(train_args, capsys, monkeypatch):
    from srupp.ops import triton_kernel

    monkeypatch.setattr(triton_kernel, "is_available", lambda device: False)
    assert main(train_args("--backend", "triton", "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`backend` 'triton' is not available" in err[0]


def test_an_internal_bug_keeps_its_traceback(train_args, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch inside the model (a bug)")

    monkeypatch.setattr(SRUppLM, "forward", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(train_args())
