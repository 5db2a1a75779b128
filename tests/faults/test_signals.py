"""Issue 24, item 4: SIGTERM and SIGINT during `train` finish the step, checkpoint and exit with one line;
during prepare and export they remove the temporary files. Real subprocesses, real signals."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from srupp.train import load_checkpoint

from .conftest import snapshot

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _wait_for(predicate, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_train_checkpoints_the_step_and_exits_with_one_line(corpus, tmp_path, signum):
    run = tmp_path / "run"
    options = ["--progress", "false", "--max_steps", "100000", "--eval_every", "100000", "--num_threads", "1"]
    argv = ["--config", "tiny", "--data", str(corpus), "--out_dir", str(run), *options]
    proc = subprocess.Popen(
        [sys.executable, "-m", "srupp", "train", *argv],
        env=ENV,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    lines = err.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "--resume" in lines[0], err
    step = load_checkpoint(run / "checkpoints" / "last.safetensors").trainer["step"]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert step == logged[-1] >= 3  # every update that was logged is in the checkpoint
    assert f"step {step} saved" in lines[0]
    assert not [p for p in run.rglob("*.tmp")]


HOLD = textwrap.dedent(
    """
    import sys, time
    from srupp.cli import main
    {patch}
    sys.exit(main(sys.argv[1:]))
    """
)


def _signal_midway(tmp_path, patch: str, argv: list[str]) -> tuple[int, str]:
    """Run ``srupp argv`` with ``patch`` making one write print "writing" and wait; SIGTERM it then."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(patch=textwrap.dedent(patch)), *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing", proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigterm_during_prepare_removes_its_temporary_files(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("hello world\n" * 1000)
    patch = """
    from srupp.data import corpus
    real = corpus._write_file
    def slow(path, data):
        real(path, data)
        print("writing", flush=True)
        time.sleep(60)
    corpus._write_file = slow
    """
    code, err = _signal_midway(
        tmp_path, patch, ["data", "prepare", "text", "--source", str(source), "--out", str(tmp_path / "out")]
    )
    assert code == 143 and err.strip().splitlines() == ["srupp data: interrupted by SIGTERM"]
    assert snapshot(tmp_path / "out") == {}


def test_sigterm_during_export_removes_its_temporary_folder(corpus, tmp_path):
    pytest.importorskip("transformers")
    from srupp.cli import main

    run = tmp_path / "run"
    common = ["--config", "tiny", "--data", str(corpus), "--out_dir", str(run), "--progress", "false"]
    assert main(["train", *common, "--max_steps", "1", "--eval_every", "1"]) == 0
    patch = """
    from srupp.hf.modeling import SRUppForCausalLM
    real = SRUppForCausalLM.save_pretrained
    def slow(self, path, **kwargs):
        real(self, path, **kwargs)
        print("writing", flush=True)
        time.sleep(60)
    SRUppForCausalLM.save_pretrained = slow
    """
    out = tmp_path / "exports" / "hf"
    out.parent.mkdir()
    code, err = _signal_midway(tmp_path, patch, ["export", "hf", str(run), str(out)])
    assert code == 143 and err.strip().splitlines()[-1] == "srupp export: interrupted by SIGTERM"  # after a bar
    assert list(out.parent.iterdir()) == []
