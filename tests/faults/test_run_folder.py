"""Issue 11, item 1: a run folder belongs to one run."""

import errno
import subprocess
import sys
import textwrap

import pytest

from srupp.cli import main
from srupp.train import checkpoint as checkpoint_module
from srupp.train import save_checkpoint

from .conftest import snapshot


def test_new_run_into_an_existing_run_is_refused(train_args, tmp_path, capsys):
    assert main(train_args()) == 0
    before = snapshot(tmp_path / "run")
    assert {"config.json", "metrics.jsonl", "checkpoints/last.safetensors"} <= set(before)
    assert main(train_args("--lr", "0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run" in err[0] and "--overwrite" in err[0] and "--resume" in err[0]
    assert snapshot(tmp_path / "run") == before


def test_overwrite_moves_the_old_run_aside(train_args, tmp_path, capsys):
    assert main(train_args()) == 0
    before = snapshot(tmp_path / "run")
    assert main(train_args("--overwrite", "--max_steps", "1", "--eval_every", "1")) == 0
    moved = list((tmp_path / "run" / "replaced").iterdir())
    assert len(moved) == 1 and "moved the previous run" in capsys.readouterr().err
    old = {k: v for k, v in before.items() if not k.startswith("data/")}
    assert snapshot(moved[0]) == old
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the new run's step 1


def test_second_trainer_on_a_locked_folder_exits_with_a_message(train_args, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = textwrap.dedent(
        """
        import sys
        from srupp.train.rundir import RunFolder
        with RunFolder(sys.argv[1]):
            print("locked", flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert main(train_args()) == 2
    finally:
        proc.communicate("", timeout=30)
    assert "in use by another `srupp train`" in capsys.readouterr().err
    assert snapshot(run) == {}
    assert main(train_args()) == 0  # the lock went with the process that held it


def test_temporary_files_of_another_process_are_left_alone(tmp_path):
    other = tmp_path / ".last.safetensors.999999.abc.tmp"
    other.write_bytes(b"another writer's half-written checkpoint")
    save_checkpoint(tmp_path / "last.safetensors", {}, config={}, vocab={}, trainer={"step": 1})
    assert other.read_bytes() == b"another writer's half-written checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.safetensors"]


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(train_args, tmp_path, monkeypatch, capsys):
    assert main(train_args()) == 0
    before = snapshot(tmp_path / "run" / "checkpoints")
    real = checkpoint_module.save_file

    def disk_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    assert main(["train", "--resume", str(tmp_path / "run"), "--max_steps", "4", "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "checkpoints" in err[0]
    assert snapshot(tmp_path / "run" / "checkpoints") == before  # no temporary file left, nothing replaced


@pytest.mark.parametrize("existing", ["file", "dir-is-file"])
def test_out_dir_that_is_a_file_is_one_line(train_args, tmp_path, capsys, existing):
    target = tmp_path / "taken"
    target.write_text("my notes")
    run = target if existing == "file" else target / "sub"
    assert main(train_args(run=run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0]
    assert target.read_text() == "my notes"
